"""Img2GPT inference: caption images from URLs or local paths with a checkpoint from training_script.py.

Edit the constants below or override them from the command line:

    python inference_script.py --weights img2gpt_epoch_3.pth --image https://example.com/dog.jpg --image cat.png

The model is rebuilt from the checkpoint's own config with the code that trained it (4-bit on CUDA,
full precision on the CPU; a checkpoint trained in 4-bit on a GPU captions on a CPU-only machine).
"""

import io
import re
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from training_script import (IMAGE_ERRORS, Img2GPTError, build_model, generate_captions, load_checkpoint,
                             load_image, load_trained_weights, parse_config, preprocess, resolve_device, run_cli)

# --- What to caption ------------------------------------------------------------------------------
MODEL_WEIGHTS_PATH = "img2gpt_epoch_3.pth"  # checkpoint written by training_script.py
IMAGE_URL = "http://images.cocodataset.org/val2017/000000039769.jpg"  # http(s) URL or local image path
REQUEST_TIMEOUT = 30  # seconds a download may take in all before it is given up
MAX_IMAGE_BYTES = 20_000_000  # largest image download accepted, in bytes

# --- Hardware and base models ---------------------------------------------------------------------
DEVICE_CHOICE = "cuda" if torch.cuda.is_available() else "cpu"  # "cuda" (4-bit), "cuda:N" or "cpu"
VIT_MODEL_NAME = None  # vision encoder to load instead of the checkpoint's (e.g. a local copy); None: its own
GPT2_MODEL_NAME = None  # language model to load instead of the checkpoint's; None: its own

# --- Decoding -------------------------------------------------------------------------------------
MAX_NEW_TOKENS = 30  # longest caption, in tokens (generation also stops at EOS)
NUM_BEAMS = 1  # 1: greedy; more: beam search

# Every UPPERCASE name bound to a plain value above is a setting with a flag (imported names are not).
CONSTANTS = {name: value for name, value in dict(globals()).items()
             if name.isupper() and isinstance(value, (bool, int, float, str, type(None)))}
FLAG_ALIASES = {"MODEL_WEIGHTS_PATH": "--weights", "IMAGE_URL": "--image", "DEVICE_CHOICE": "--device",
                "VIT_MODEL_NAME": "--vit-model", "GPT2_MODEL_NAME": "--gpt2-model"}
RULE = "=" * 50


def download(url, timeout, max_bytes):
    """The body of an http(s) URL, streamed so that neither a slow nor a huge answer can hang or fill memory."""
    import time

    import requests

    deadline = time.monotonic() + timeout
    try:
        with requests.get(url, timeout=timeout, stream=True, headers={"User-Agent": "Img2GPT"}) as response:
            if response.status_code >= 400:
                raise Img2GPTError(f"'{url}' answered HTTP {response.status_code} {response.reason}: check the URL")
            if int(response.headers.get("Content-Length") or 0) > max_bytes:
                raise Img2GPTError(f"'{url}' is larger than {max_bytes:,} bytes (--max-image-bytes)")
            body = bytearray()
            for chunk in response.iter_content(chunk_size=1 << 16):
                body += chunk
                if len(body) > max_bytes:
                    raise Img2GPTError(f"'{url}' is larger than {max_bytes:,} bytes (--max-image-bytes)")
                if time.monotonic() > deadline:
                    raise requests.Timeout()
            return bytes(body), response.headers.get("Content-Type", "")
    except requests.Timeout:
        raise Img2GPTError(f"'{url}' did not answer within {timeout} s (--request-timeout)") from None
    except requests.ConnectionError:
        raise Img2GPTError(f"could not connect to '{url}': check the address and your connection") from None
    except requests.RequestException as exc:
        raise Img2GPTError(f"could not download '{url}' ({type(exc).__name__})") from None


def fetch_image(source, timeout, max_bytes):
    """An RGB image from an http(s) URL or a local path; anything else is an Img2GPTError naming the problem."""
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", source)
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        raise Img2GPTError(f"'{source}': only http:// and https:// URLs or local file paths are supported")
    if scheme:
        body, content_type = download(source, timeout, max_bytes)
        what, opened = f"'{source}' (Content-Type: {content_type or 'none'})", io.BytesIO(body)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise Img2GPTError(f"image '{source}' not found: give an existing file or an http(s) URL")
        if path.is_dir():
            raise Img2GPTError(f"'{source}' is a folder: give an image file in it")
        what, opened = f"'{source}'", path
    try:
        return load_image(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Img2GPTError(f"{what} has more pixels than Pillow decodes safely: resize it first") from None
    except UnidentifiedImageError:
        raise Img2GPTError(f"{what} is not an image in any format Pillow reads: give a JPEG, PNG, ...") from None
    except IMAGE_ERRORS as exc:
        raise Img2GPTError(f"{what} is not a readable image ({exc})") from None


def load_model(weights_path, device, vit_model=None, gpt2_model=None):
    """Rebuild the trained model from the checkpoint's config, printing the original design's Step lines."""
    state = load_checkpoint(weights_path)
    config = dict(state["config"])
    config["vit_model"] = vit_model or config["vit_model"]
    config["gpt2_model"] = gpt2_model or config["gpt2_model"]
    steps = {1: f"Loading tokenizer and base models ({'with 4-bit quantization' if device.type == 'cuda' else 'in full precision'})...",
             2: "Applying the exact same LoRA configurations...",
             3: "Initializing the combined Img2GPT model..."}
    model, tokenizer, processor, _ = build_model(config, device, announce=lambda n: print(f"Step {n}: {steps[n]}"))
    print(f"Step 4: Loading trained weights from '{weights_path}'...")
    load_trained_weights(model, state["weights"])
    model.eval()
    print("Model successfully built and ready for inference!")
    return model, tokenizer, processor


def caption_image(model, tokenizer, processor, source, device, cfg):
    kind = "URL" if re.match(r"^https?://", source, re.I) else "path"
    print(f"\nPreprocessing image from {kind}: {source}")
    pixels = preprocess(processor, [fetch_image(source, cfg.request_timeout, cfg.max_image_bytes)]).to(device)
    print("Generating caption...")
    return generate_captions(model, tokenizer, pixels, cfg.max_new_tokens, cfg.num_beams)[0]


def main(argv=None):
    cfg = parse_config(CONSTANTS, argv, FLAG_ALIASES, __doc__, repeatable=("IMAGE_URL",), script=__file__)
    device = resolve_device(cfg.device_choice)
    print(f"Using device: {device}")
    model, tokenizer, processor = load_model(cfg.model_weights_path, device, cfg.vit_model_name,
                                             cfg.gpt2_model_name)
    failed = 0
    for source in cfg.image_url:
        try:
            caption = caption_image(model, tokenizer, processor, source, device, cfg)
        except Img2GPTError as error:  # one bad image does not stop the others
            print(f"error: {error}", file=sys.stderr)
            failed += 1
            continue
        print(f"\n{RULE}\n      INFERENCE RESULT\n{RULE}\nImage URL: {source}\nGenerated Caption: {caption}\n{RULE}")
    if failed:
        sys.exit(f"error: {failed} of {len(cfg.image_url)} images could not be captioned")


if __name__ == "__main__":
    run_cli(main)
