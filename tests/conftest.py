"""Offline fixtures: tiny ViT / GPT-2 / BPE tokenizer saved with save_pretrained, and a Flickr30k-shaped folder."""

import functools
import http.server
import os
import random
import threading
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLORS = {"red": (215, 35, 35), "green": (35, 170, 50), "blue": (40, 70, 220), "yellow": (235, 215, 30)}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("a {c} {s} .", "a {c} {s} on a white background .", "there is a {c} {s} here .",
             "the picture shows a {c} {s} .", "one {c} {s} .")
IMAGE_SIZE = 32
# A caption with a quote: results.csv is not CSV-quoted, so a stray '"' must not swallow rows.
QUOTED_CAPTION = 'a man says " hello " to a red circle .'
BROKEN_ROW_CAPTION = "A dog runs across the grass ."


def draw_shape(color, shape, rng, size=IMAGE_SIZE):
    """A white picture with one colored shape at a random place and size."""
    image = Image.new("RGB", (size, size), "white")
    radius = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(radius, size - radius), rng.randint(radius, size - radius)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=COLORS[color])
    return image


def shape_captions(color, shape):
    return [t.format(c=color, s=shape) for t in TEMPLATES]


def make_flickr_folder(root, n_images, seed=0, quirks=True):
    """A folder shaped like the Kaggle download: flickr30k_images/{results.csv, flickr30k_images/*.jpg}.
    Returns {image name: (color, shape)} of the usable images. With quirks: the row lacking its second '|',
    a quoted caption, a listed image with no file, a corrupt file, grayscale / CMYK / RGBA / palette files."""
    rng = random.Random(seed)
    base = Path(root) / "flickr30k_images"
    images = base / "flickr30k_images"
    images.mkdir(parents=True)
    rows, truth = ["image_name| comment_number| comment"], {}
    for i in range(n_images):
        name = f"{1000 + i}.jpg"
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        picture = draw_shape(color, shape, rng)
        mode = ("L", "CMYK", "RGBA", "P")[i] if quirks and i < 4 else "RGB"
        picture = picture.convert(mode)
        picture.save(images / name, format="PNG" if mode in ("RGBA", "P") else "JPEG")
        truth[name] = (color, shape)
        for k, caption in enumerate(shape_captions(color, shape)):
            rows.append(f"{name}| {k}| {caption}")
    if quirks:
        rows[1] = f"1000.jpg| 0| {QUOTED_CAPTION}"
        rows.append(f"2199200615.jpg| 0| {BROKEN_ROW_CAPTION}")
        rows.append(f"2199200615.jpg| 4   {BROKEN_ROW_CAPTION}")  # the real file's row without its second '|'
        draw_shape("blue", "square", rng).save(images / "2199200615.jpg")
        truth["2199200615.jpg"] = ("blue", "square")
        rows.append("missing.jpg| 0| a picture that is not there .")
        (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        rows.append("corrupt.jpg| 0| a broken picture .")
    (base / "results.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return truth


def write_png_header(path, width, height):
    """A tiny PNG that claims width x height pixels: Pillow refuses it as a decompression bomb on open."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                           + chunk(b"IEND", b""))


def build_tiny_models(folder, hidden=32, layers=2):
    """Tiny ViT (32x32 images, 8x8 patches: 17 prefix tokens) and GPT-2 with a byte-level BPE tokenizer trained
    on the fixture captions, saved like hub models so the scripts load them with from_pretrained."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, ViTConfig,
                              ViTImageProcessor, ViTModel)

    torch.manual_seed(0)
    folder = Path(folder)
    vit = ViTModel(ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=2, intermediate_size=hidden * 2), add_pooling_layer=False)
    vit.save_pretrained(folder / "vit")
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder / "vit")

    from training_script import clean_caption

    texts = [c for color in COLORS for shape in SHAPES for c in shape_captions(color, shape)]
    texts += [QUOTED_CAPTION, BROKEN_ROW_CAPTION, "a picture that is not there .", "a broken picture ."]
    texts = [clean_caption(t) for t in texts]  # what the training script feeds the tokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts * 5, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.save_pretrained(folder / "gpt2")
    eos = tokenizer.eos_token_id
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=hidden, n_layer=layers,
                                      n_head=2, bos_token_id=eos, eos_token_id=eos))
    pretrain_language_model(gpt2, tokenizer, texts)
    gpt2.save_pretrained(folder / "gpt2")
    return folder / "vit", folder / "gpt2"


def pretrain_language_model(model, tokenizer, texts, steps=200, length=48, seed=0):
    """A few seconds of plain language modelling, so the tiny GPT-2 knows the caption language as the real one
    knows English (a random GPT-2 gives near-uniform logits that LoRA on c_attn alone cannot sharpen). Like
    GPT-2's own training, captions are packed one after another with EOS between them, so every position
    is trained: captions sit after a prefix of image tokens when Img2GPT uses the model."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    rows = []
    for _ in range(64):
        row = []
        while len(row) < length:
            row += rng.choice(encoded)
        rows.append(row[:length])
    input_ids = torch.tensor(rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_other_families(folder, tokenizer_folder, hidden=32):
    """Tiny models of other families, saved like hub models: a DINOv2 encoder (BitImageProcessor: shortest edge
    + center crop), a CLIP checkpoint (text and vision towers), and a Llama-style LM sharing the BPE tokenizer
    of `tokenizer_folder`, pretrained on the captions like the tiny GPT-2."""
    import shutil

    import torch
    from transformers import (AutoTokenizer, BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel,
                              Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM)

    from training_script import clean_caption

    torch.manual_seed(0)
    folder = Path(folder)
    Dinov2Model(Dinov2Config(image_size=IMAGE_SIZE, patch_size=8, hidden_size=hidden, num_hidden_layers=2,
                             num_attention_heads=2, mlp_ratio=2)).save_pretrained(folder / "dinov2")
    BitImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                      do_convert_rgb=True).save_pretrained(folder / "dinov2")
    vision = {"image_size": IMAGE_SIZE, "patch_size": 8, "hidden_size": hidden, "intermediate_size": hidden * 2,
              "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {"hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder / "clip")
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder / "clip")

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    eos = tokenizer.eos_token_id
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=eos, eos_token_id=eos))
    texts = [clean_caption(c) for color in COLORS for shape in SHAPES for c in shape_captions(color, shape)]
    pretrain_language_model(llama, tokenizer, texts)
    llama.save_pretrained(folder / "llama")
    for file in Path(tokenizer_folder).glob("tokenizer*"):
        shutil.copy(file, folder / "llama" / file.name)
    return {name: folder / name for name in ("dinov2", "clip", "llama")}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_models_4bit(tmp_path_factory):
    """The tiny models 64 wide: a whole NF4 quantization block per row, the smallest width at which bitsandbytes'
    packed CPU kernel (AVX512-BF16) runs, so 4-bit tests take the path full-size models take."""
    return build_tiny_models(tmp_path_factory.mktemp("models_4bit"), hidden=64)


@pytest.fixture(scope="session")
def families(tiny_models, tmp_path_factory):
    return build_other_families(tmp_path_factory.mktemp("families"), tiny_models[1])


@pytest.fixture(scope="session")
def flickr_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaggle")
    make_flickr_folder(root, 24)
    return root


@pytest.fixture(scope="session")
def image_server(flickr_dir):
    """http://127.0.0.1:PORT/ serving the fixture images."""
    folder = flickr_dir / "flickr30k_images" / "flickr30k_images"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def run_script(script, *args, cwd=None, timeout=600):
    """Run one of the two scripts as a user would, offline, and return the CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def load_layout(folder):
    """(captions, image folder, rows skipped) of the layout found in folder, as prepare_data reads it."""
    from training_script import find_layout, load_captions

    kind, files = find_layout(folder)
    return load_captions(kind, files, Path(folder))


def train_args(data_dir, models, output_dir, *extra):
    vit, gpt2 = models
    args = ["--data-dir", data_dir, "--vit-model", vit, "--gpt2-model", gpt2, "--output-dir", output_dir,
            "--device", "cpu", "--num-workers", "0", "--warmup-steps", "0", "--no-eval-after-training",
            "--karpathy-split-file", "none", *extra]
    return [str(a) for a in args]
