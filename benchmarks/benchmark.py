"""Img2GPT speed and size on this machine, printed as a markdown table.

    python benchmarks/benchmark.py            # full size: ViT-B/16 (224) + GPT-2 small, random weights
    python benchmarks/benchmark.py --smoke    # tiny models, one repeat: checks that the benchmark works

Both models are built from their default configs (no download). Every caption decodes exactly
NEW_TOKENS tokens, greedily, so Img2GPT, its peer and the floor do the same amount of decoding. The peer is
HF's VisionEncoderDecoderModel of the same sizes (GPT-2 reading the ViT through cross-attention, the
architecture of nlpconnect/vit-gpt2-image-captioning). Times are medians of REPEATS runs after one warm-up;
compare the ratios, which are measured in the same run, rather than the absolute times.
"""

import argparse
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import training_script as ts  # noqa: E402

NEW_TOKENS = 20
REPEATS = 5
POOLED_GRID = 4  # the PREFIX_POOL_GRID option measured beside the default: 1 + 16 prefix tokens instead of 197


def median_time(function, repeats):
    function()  # warm-up: first-call allocations and lazy inits are not what a user waits for each time
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def configs(smoke):
    from transformers import GPT2Config, ViTConfig

    if smoke:
        return (ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64), GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=500,
                                                                     bos_token_id=499, eos_token_id=499))
    return ViTConfig(), GPT2Config()  # ViT-B/16 at 224 (197 tokens x 768) and GPT-2 small (124M)


def build_img2gpt(vit_config, gpt2_config, merged=True, pool_grid=0):
    """Img2GPT as inference runs it on a CPU (LoRA merged into the base weights), or as training runs it."""
    from transformers import GPT2LMHeadModel, ViTModel

    torch.manual_seed(0)
    vision, lm = ViTModel(vit_config, add_pooling_layer=False), GPT2LMHeadModel(gpt2_config)
    lora = (ts.LORA_R, ts.LORA_ALPHA, ts.LORA_DROPOUT)
    model = ts.Img2GPT(ts.apply_lora(vision, ts.find_lora_targets(vision), *lora),
                       ts.apply_lora(lm, ts.find_lora_targets(lm), *lora),
                       torch.nn.Linear(vit_config.hidden_size, gpt2_config.n_embd), pool_grid)
    return ts.merge_lora(model).eval() if merged else model


def build_peer(vit_config, gpt2_config):
    """VisionEncoderDecoderModel built from parts (from_encoder_decoder_pretrained fails on transformers 5.24)."""
    from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel, ViTModel

    torch.manual_seed(0)
    decoder_config = GPT2Config(**{**gpt2_config.to_dict(), "is_decoder": True, "add_cross_attention": True})
    peer = VisionEncoderDecoderModel(encoder=ViTModel(vit_config, add_pooling_layer=False),
                                     decoder=GPT2LMHeadModel(decoder_config))
    peer.config.decoder_start_token_id = peer.config.pad_token_id = gpt2_config.eos_token_id
    return peer.eval()


def fixed_length_tokenizer(eos):
    """What generate_captions needs of a tokenizer; random-weight GPT-2 has no vocabulary worth decoding."""
    return types.SimpleNamespace(eos_token_id=eos, pad_token_id=eos,
                                 batch_decode=lambda ids, skip_special_tokens: [""] * len(ids))


def caption_time(model, tokenizer, pixels, repeats):
    return median_time(lambda: ts.generate_captions(model, tokenizer, pixels, max_new_tokens=NEW_TOKENS,
                                                    min_new_tokens=NEW_TOKENS), repeats)


def peer_time(peer, pixels, eos, repeats):
    @torch.inference_mode()
    def run():
        peer.generate(pixel_values=pixels, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1,
                      do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return median_time(run, repeats)


def floor_time(model, pixels, repeats):
    """The least work a caption needs: one ViT forward, one GPT-2 pass over the prefix filling the KV cache,
    then NEW_TOKENS - 1 single-token steps reusing it (argmax only, no generate() machinery)."""
    @torch.inference_mode()
    def run():
        out = model.lm(inputs_embeds=model.prefix(pixels), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(NEW_TOKENS - 1):
            # transformers 5.24 renamed past_key_values to cache; take whichever this version returns
            cache = {"cache": out.cache} if "cache" in out else {"past_key_values": out.past_key_values}
            out = model.lm(input_ids=token, use_cache=True, **cache)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    return median_time(run, repeats)


def stack_pixels(items):
    return torch.stack([pixels for pixels, _ in items])


def data_pipeline(image_size, count, repeats):
    """(images/s through the training loader: decode, RGB, preprocess with NUM_WORKERS workers;
    images/s of JPEG decoding alone in one process)."""
    from PIL import Image
    from transformers import ViTImageProcessor

    folder = Path(tempfile.mkdtemp())
    for i in range(count):  # Flickr30k-sized photos (about 500 x 375)
        Image.effect_noise((500, 375), 60).convert("RGB").save(folder / f"{i}.jpg", quality=90)
    processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    dataset = ts.CaptionDataset([(f"{i}.jpg", "") for i in range(count)], folder, processor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=ts.NUM_WORKERS,
                                         collate_fn=stack_pixels)
    pipeline = median_time(lambda: list(loader), repeats)

    def decode_only():
        for i in range(count):
            with Image.open(folder / f"{i}.jpg") as image:
                image.load()
    return count / pipeline, count / median_time(decode_only, repeats)


def sizes(model):
    """(bytes of an Img2GPT checkpoint, bytes of the whole model's state_dict)."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, full = Path(folder) / "img2gpt_epoch_1.pth", Path(folder) / "full.pth"
        ts.save_checkpoint(checkpoint, model, {}, {"epoch": 1})
        torch.save(model.state_dict(), full)
        return checkpoint.stat().st_size, full.stat().st_size


def training_throughput(model, image_size, batch, repeats):
    """Images/s of full-precision LoRA training steps (forward, backward, AdamW) at this batch size."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 500, (batch, 16))
    inputs = {"pixel_values": torch.rand(batch, 3, image_size, image_size), "input_ids": ids,
              "attention_mask": torch.ones_like(ids), "labels": ids}
    model.train()

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch / median_time(step, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models, one repeat: only checks it runs")
    args = parser.parse_args()
    repeats = 1 if args.smoke else REPEATS
    vit_config, gpt2_config = configs(args.smoke)
    size, eos = vit_config.image_size, gpt2_config.eos_token_id
    model, peer = build_img2gpt(vit_config, gpt2_config), build_peer(vit_config, gpt2_config)
    tokenizer = fixed_length_tokenizer(eos)
    one, eight = torch.rand(1, 3, size, size), torch.rand(8, 3, size, size)

    pool_grid = 2 if args.smoke else POOLED_GRID
    pooled = build_img2gpt(vit_config, gpt2_config, pool_grid=pool_grid)
    latency = caption_time(model, tokenizer, one, repeats)
    peer_latency = peer_time(peer, one, eos, repeats)
    floor = floor_time(model, one, repeats)
    batch8 = caption_time(model, tokenizer, eight, repeats)
    pooled_latency = caption_time(pooled, tokenizer, one, repeats)
    pooled_batch8 = caption_time(pooled, tokenizer, eight, repeats)
    pipeline, decode = data_pipeline(size, 8 if args.smoke else 64, repeats)
    training_model = build_img2gpt(vit_config, gpt2_config, merged=False)
    checkpoint_bytes, full_bytes = sizes(training_model)
    train_rate = training_throughput(training_model, size, 8, repeats)

    name = "tiny smoke-test models" if args.smoke else "ViT-B/16 (224) + GPT-2 small, random weights"
    print(f"Img2GPT benchmark: {name}; CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.machine()}; {NEW_TOKENS} new tokens, greedy; median of {repeats} runs\n")
    print("| measurement | value | compared with | ratio |\n|---|---:|---|---:|")
    rows = [
        ("caption latency, 1 image", f"{latency:.3f} s", f"VisionEncoderDecoder peer: {peer_latency:.3f} s",
         f"{latency / peer_latency:.2f}x"),
        ("caption latency, 1 image", f"{latency:.3f} s",
         f"floor (ViT + prefill + {NEW_TOKENS - 1} cached steps): {floor:.3f} s", f"{latency / floor:.2f}x"),
        ("captions/s, batch 1", f"{1 / latency:.2f}", "", ""),
        ("captions/s, batch 8", f"{8 / batch8:.2f}", "batch 1", f"{latency * 8 / batch8:.2f}x"),
        (f"option PREFIX_POOL_GRID={pool_grid}: caption latency, 1 image", f"{pooled_latency:.3f} s",
         f"VisionEncoderDecoder peer: {peer_latency:.3f} s", f"{pooled_latency / peer_latency:.2f}x"),
        (f"option PREFIX_POOL_GRID={pool_grid}: captions/s, batch 8", f"{8 / pooled_batch8:.2f}",
         f"same option, batch 1: {1 / pooled_latency:.2f}", f"{pooled_latency * 8 / pooled_batch8:.2f}x"),
        (f"data pipeline images/s (decode, RGB, preprocess; {ts.NUM_WORKERS} workers)", f"{pipeline:.1f}",
         f"JPEG decoding alone, 1 process: {decode:.1f}/s", f"{pipeline / decode:.2f}x"),
        ("checkpoint size", f"{checkpoint_bytes / 1e6:.2f} MB", f"full state_dict: {full_bytes / 1e6:.1f} MB",
         f"{checkpoint_bytes / full_bytes:.2%}"),
        ("training images/s, batch 8, fp32 LoRA", f"{train_rate:.2f}", "", ""),
    ]
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
