"""The peer of the whole-process benchmark: a plain script that captions images with HF's
VisionEncoderDecoderModel (ViT encoder, GPT-2 decoder reading it through cross-attention, the architecture of
nlpconnect/vit-gpt2-image-captioning), built from the same local model folders Img2GPT's checkpoint names.

    python benchmarks/peer_caption.py VIT_FOLDER GPT2_FOLDER MAX_NEW_TOKENS IMAGE [IMAGE ...]
"""

import sys

import torch
from PIL import Image
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer,
                          VisionEncoderDecoderModel)
from transformers.utils import logging


def main(vit, gpt2, max_new_tokens, *images):
    logging.set_verbosity_error()  # the cross-attention weights are new: said at every load, nothing to act on
    processor = AutoImageProcessor.from_pretrained(vit)
    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    # From parts: from_encoder_decoder_pretrained fails on transformers 5.24 (GPT2Config has no is_decoder).
    encoder = AutoModel.from_pretrained(vit, add_pooling_layer=False)
    decoder_config = AutoConfig.from_pretrained(gpt2)
    decoder_config.is_decoder = decoder_config.add_cross_attention = True
    decoder = AutoModelForCausalLM.from_pretrained(gpt2, config=decoder_config)
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder).eval()
    pixels = processor(images=[Image.open(path).convert("RGB") for path in images], return_tensors="pt").pixel_values
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        tokens = model.generate(pixels, max_new_tokens=int(max_new_tokens), decoder_start_token_id=eos,
                                pad_token_id=eos, eos_token_id=eos)
    for path, caption in zip(images, tokenizer.batch_decode(tokens, skip_special_tokens=True)):
        print(f"{path}: {caption}")


if __name__ == "__main__":
    main(*sys.argv[1:])
