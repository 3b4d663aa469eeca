"""Img2GPT training: a pretrained ViT -> linear projection -> GPT-2 prefix captioner on Flickr30k.

Edit the constants below or override any of them from the command line
(`python training_script.py --help` lists every flag with its default):

    python training_script.py --epochs 3 --batch-size 16

By default (QUANTIZE "auto") both models are loaded in 4-bit NF4 and fine-tuned with LoRA (QLoRA) on CUDA,
and kept in full precision with the same LoRA on a CPU; "4bit" and "none" choose either on any device. After
each epoch OUTPUT_DIR/img2gpt_epoch_N.pth holds the trained weights and the config that `inference_script.py`
rebuilds the model from.

The file in the order data flows (each section starts with a "# --- Name ---" line):

    Settings (what users edit: hardware, data, model, training, decoding, interruptions): 51 lines
    Internal tables: flag aliases, names the libraries use, layouts, what a run keeps: 75 lines
    Configuration: flags, ranges, device and precision: 169 lines
    Data: caption files in a folder: 349 lines
    Data: streamed WebDataset shards and Hugging Face datasets: 378 lines
    Data: the split: 163 lines
    Data: images, datasets and loaders: 274 lines
    Model: 320 lines
    Captioning: 89 lines
    Checkpoints: 180 lines
    Evaluation: test-split scores and the gallery: 324 lines
    Output folder, log and plot: 159 lines
    Training: 469 lines
    Main: the command line: 110 lines
"""

import argparse
import contextlib
import inspect
import io
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import types
import warnings
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch import nn

# --- Hardware -------------------------------------------------------------------------------------
DEVICE_CHOICE = "cuda" if torch.cuda.is_available() else "cpu"  # "cuda", "cuda:N" or "cpu"
QUANTIZE = "auto"  # "auto" (4-bit on CUDA, none on a CPU), "4bit" (NF4 QLoRA on any device) or "none"
NUM_WORKERS = 2  # DataLoader worker processes decoding images (0: decode in the main process)

# --- Data -----------------------------------------------------------------------------------------
KAGGLE_DATASET = "hsankesara/flickr-image-dataset"  # Kaggle handle downloaded with kagglehub (Flickr8k: adityajn105/flickr8k)
DATA_DIR = None  # captioned images (any layout README "Your own data" lists) or WebDataset .tar shards; None: download
HF_DATASET = None  # a Hugging Face dataset to train on instead: a Hub name or a local folder of parquet/arrow files
IMAGE_COLUMN = None  # HF_DATASET's image column; None: the column of Image type
CAPTION_COLUMN = None  # HF_DATASET's caption column (a string or a list of strings); None: found by name and type
REQUEST_TIMEOUT = 30.0  # seconds a shard URL may send nothing before that shard is left out
KARPATHY_SPLIT_FILE = "auto"  # "auto": the data's own split, else Karpathy's standard one (downloaded); a dataset_*.json path; "none": seeded
ALLOW_OUTSIDE_DATA_DIR = False  # True: caption files may name images outside DATA_DIR (../, absolute paths, links out)
OUTPUT_DIR = "."  # where img2gpt_epoch_N.pth and training_log.jsonl are written
VAL_IMAGES = 1014  # validation images (Karpathy's Flickr30k size); at most 10% of the images on small data
TEST_IMAGES = 1000  # test images held out of training; at most 10% of the images on small data
SEED = 42  # seeds the split, the shuffling and the initial weights

# --- Model ----------------------------------------------------------------------------------------
VIT_MODEL_NAME = "google/vit-base-patch16-224-in21k"  # vision encoder: hub name or local folder
GPT2_MODEL_NAME = "gpt2"  # language model: hub name or local folder
MAX_CAPTION_TOKENS = 40  # caption tokens trained on, EOS included; longer captions are cut
LORA_R = 8  # LoRA rank, on the ViT attention (query, value) and GPT-2 c_attn
LORA_ALPHA = 16.0  # LoRA scaling numerator (scale = alpha / r)
LORA_DROPOUT = 0.05  # dropout on the LoRA input
PREFIX_POOL_GRID = 0  # average-pool the patch tokens to a G x G grid (+ CLS) for a shorter, faster prefix; 0: all
PROJECTOR = "linear"  # bridge from vision to LM: "linear" (the original design) or "mlp" (Linear-GELU-Linear)

# --- Training -------------------------------------------------------------------------------------
BATCH_SIZE = 16  # captions per batch; 16 fits a 16 GB T4 in 4-bit
NUM_EPOCHS = 3  # passes over every training caption
LEARNING_RATE = 2e-4  # AdamW peak learning rate, for LoRA and projection
WARMUP_STEPS = 100  # batches of linear warm-up, then linear decay to 0
EVAL_INTERVAL = 500  # batches between sample-caption rounds (0: none)
NUM_SAMPLE_IMAGES = 4  # validation images captioned at each round (the same ones every time)

# --- Decoding (sample captions and evaluation) and evaluation ------------------------------------
MAX_NEW_TOKENS = 30  # longest caption, in tokens (generation also stops at EOS)
NUM_BEAMS = 1  # 1: greedy; more: beam search
NO_REPEAT_NGRAM_SIZE = 0  # never repeat an n-gram of this many tokens (0: off)
REPETITION_PENALTY = 1.0  # above 1 discourages repeating tokens (1.0: off)
EVAL_AFTER_TRAINING = True  # score the last epoch on the test split when training ends
EVALUATE = None  # checkpoint to score on the test split instead of training; None: train

# --- Interruptions --------------------------------------------------------------------------------
SAVE_INTERVAL = 200  # batches between saves of OUTPUT_DIR/img2gpt_last.pth (a disconnect loses at most these)
RESUME_FROM = None  # img2gpt_last.pth to continue a run from; "auto": OUTPUT_DIR's, if any; None: start afresh
OVERWRITE = False  # start afresh in an OUTPUT_DIR that holds a run, deleting its checkpoints, log and plot
MAX_BAD_BATCHES = 10  # non-finite losses in a row that stop training (each one is skipped, not applied)

# ======================== End of the settings: nothing below this line needs editing ========================

# Every UPPERCASE name bound to a plain value above is a setting with a flag (imported names are not).
CONSTANTS = {name: value for name, value in dict(globals()).items()
             if name.isupper() and isinstance(value, (bool, int, float, str, type(None)))}


# --- Internal tables: flag aliases, names the libraries use, layouts, what a run keeps ------------
# Flags are --kebab-case of the constant; these also answer to the short names users know.
FLAG_ALIASES = {
    "DEVICE_CHOICE": "--device",
    "VIT_MODEL_NAME": "--vit-model",
    "GPT2_MODEL_NAME": "--gpt2-model",
    "NUM_EPOCHS": "--epochs",
    "RESUME_FROM": "--resume",
}

# Leaf names of the attention projections LoRA adapts (query and value, or the fused qkv), across naming
# schemes: ViT since transformers 5.9, DINOv2, CLIP/SigLIP vision, Llama, Mistral, Qwen (q_proj, v_proj),
# older ViT (query, value), GPT-2 (c_attn: q, k and v in one Conv1D), Phi-3 (qkv_proj), GPT-NeoX.
LORA_TARGET_NAMES = ("q_proj", "v_proj", "query", "value", "c_attn", "qkv_proj", "query_key_value")
PROJECTORS = ("linear", "mlp")
QUANTIZE_CHOICES = ("auto", "4bit", "none")
# bitsandbytes' first release with a CPU backend for 4-bit (Linear4bit forward and backward without CUDA).
MIN_BITSANDBYTES_FOR_CPU = "0.46"
CHECKPOINT_FORMAT = "img2gpt-v1"
# How an epoch's batches are formed (EpochBatchSampler): whole images, their captions together. Saved with the
# training state, so that a resume of a run saved by the version that shuffled caption rows one by one says so.
BATCH_ORDER = "images"
# Image members of a WebDataset sample, as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json).
SHARD_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
# Samples shuffled together within a shard or file: a bounded buffer, so memory never grows with the data.
SHUFFLE_BUFFER = 256
# Caption columns of a Hugging Face dataset, by name, when --caption-column is not given.
HF_CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "raw", "alt_text", "txt")
# Names of left-out samples kept per shard for the log (all are counted).
LEFT_OUT_NAMES_PER_UNIT = 100
# The caption layouts DATA_DIR may hold, recognised by content (sniff_layout), in order of preference.
LAYOUTS = {
    "imagefolder": "metadata.jsonl or metadata.csv with file_name and text/caption (Hugging Face imagefolder)",
    "flickr30k": "Flickr30k's results.csv (image_name| comment_number| comment)",
    "csv": "an image,caption CSV such as Flickr8k's captions.txt",
    "coco": "COCO's annotations/captions_*.json",
    "karpathy": "a Karpathy dataset_*.json (images with sentences)",
}
CAPTION_FILE_SUFFIXES = (".csv", ".txt", ".jsonl", ".json")
CAPTION_COLUMNS = {"text", "caption", "captions"}
# Split names as datasets spell them (any case, spaces around), in every reader; others are left out and named.
SPLIT_NAMES = {"train": "train", "training": "train", "restval": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "development": "val", "test": "test", "testing": "test"}
# Kaggle copy of Karpathy's splits: caption_datasets/dataset_{flickr30k,flickr8k,coco}.json.
KARPATHY_SPLITS = "shtvkumar/karpathy-splits"
# How each of Karpathy's datasets names its image files (COCO 2014 and 2017 names).
STANDARD_IMAGE_NAMES = {"coco": r"(COCO_(train|val)2014_)?\d{12}\.jpg", "flickr8k": r"\d+_[0-9a-f]{10}\.jpg",
                        "flickr30k": r"\d+\.jpg"}
# What a training run leaves in OUTPUT_DIR: a folder holding any of these holds a run.
RUN_FILES = ("img2gpt_last.pth", "img2gpt_epoch_*.pth", "training_log.jsonl", "loss.png", "eval_img2gpt_*.json")
LOCK_FILE = ".img2gpt.lock"
# On --resume these may differ from the saved run: each takes effect from the batch reached, and is said.
RESUME_MAY_CHANGE = ("learning_rate", "num_epochs", "eval_interval", "num_sample_images", "save_interval",
                     "max_bad_batches", "max_new_tokens", "num_beams", "no_repeat_ngram_size", "repetition_penalty",
                     "eval_after_training", "num_workers", "device_choice", "quantize")
# These shape the trained weights (the checkpoint's config holds them): a resume that differs is refused.
RESUME_FIXED = ("lora_r", "lora_alpha", "lora_dropout", "max_caption_tokens", "prefix_pool_grid", "projector")
# Model-config values checkpoints from before each option lack: the original bridge, every patch token.
MODEL_CONFIG_DEFAULTS = {"projector": "linear", "prefix_pool_grid": 0}
MODEL_CONFIG_KEYS = ("vit_model", "gpt2_model", "lora_r", "lora_alpha", "lora_dropout", "max_caption_tokens",
                     "vision_lora_targets", "lm_lora_targets", "projection_in", "projection_out")
# The type of every model-config value a checkpoint may hold: a file edited by hand is refused, not half-loaded.
MODEL_CONFIG_TYPES = {"vit_model": str, "gpt2_model": str, "lora_r": int, "lora_alpha": (int, float),
                      "lora_dropout": (int, float), "max_caption_tokens": int, "vision_lora_targets": list,
                      "lm_lora_targets": list, "projection_in": int, "projection_out": int, "prefix_pool_grid": int,
                      "projector": str, "vision_family": str, "lm_family": str}
# transformers and peft import bitsandbytes, whose CPU backend warns at import that it cannot fetch an optional
# kernel from the hub; nothing here uses that kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft still reads this deprecated transformers property when it wraps a model, and its
# prepare_model_for_kbit_training calls this deprecated method: noise on every run, nothing to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.* is deprecated", category=FutureWarning)


# --- Configuration: flags, ranges, device and precision -------------------------------------------
class Img2GPTError(Exception):
    """A problem the user can fix (bad path, bad flag, bad data): shown as one line, no traceback."""


def at_least(low):
    return lambda value: value >= low  # NaN compares False: refused too


def positive_finite(value):
    return math.isfinite(value) and value > 0


# The allowed range of every numeric setting, checked at start (check_settings) so that a bad value is one line
# before anything loads, not a traceback an epoch later. Decoding ranges are shared with inference_script.py.
DECODING_RULES = {
    "max_new_tokens": (at_least(1), "1 or more"),
    "num_beams": (at_least(1), "1 (greedy) or more"),
    "no_repeat_ngram_size": (at_least(0), "0 (off) or more"),
    "repetition_penalty": (positive_finite, "a number above 0 (1.0: off)"),
}

TRAINING_RULES = {
    "num_workers": (at_least(0), "0 or more"),
    "val_images": (at_least(0), "0 or more"),
    "test_images": (at_least(0), "0 or more"),
    "seed": (lambda value: 0 <= value < 2**32, f"0 to {2**32 - 1} (numpy's seed range)"),
    "max_caption_tokens": (at_least(2), "2 or more (a token and EOS)"),
    "lora_r": (at_least(1), "1 or more"),
    "lora_alpha": (positive_finite, "a number above 0"),
    "lora_dropout": (lambda value: 0 <= value < 1, "from 0 up to, not including, 1"),
    "prefix_pool_grid": (at_least(0), "0 (all tokens) or more"),
    "batch_size": (at_least(1), "1 or more"),
    "num_epochs": (at_least(1), "1 or more"),
    "learning_rate": (positive_finite, "a number above 0, e.g. 2e-4"),
    "warmup_steps": (at_least(0), "0 or more"),
    "eval_interval": (at_least(0), "0 (none) or more"),
    "num_sample_images": (at_least(0), "0 or more"),
    **DECODING_RULES,
    "save_interval": (at_least(0), "0 (epoch ends only) or more"),
    "max_bad_batches": (at_least(1), "1 or more"),
    "request_timeout": (positive_finite, "a number of seconds above 0"),
}


def flag_of(name, aliases):
    """The command-line flag of setting `name` ("batch_size" -> "--batch-size", "num_epochs" -> "--epochs")."""
    return aliases.get(name.upper(), "--" + name.replace("_", "-"))


def shown(value):
    """A setting's value as a message shows it: a whole float without its '.0' (16.0 -> 16), else its repr."""
    whole = isinstance(value, float) and value.is_integer() and abs(value) < 1e16
    return str(int(value)) if whole else repr(value)


def check_settings(cfg, rules, aliases):
    """One error line for the first setting out of its range, naming its flag, its value and what is allowed.
    A blank text setting is refused too: '' (an unset shell variable) never means "unset" for a path."""
    for name, value in vars(cfg).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not text.strip():
                raise Img2GPTError(f"{flag_of(name, aliases)} {text!r} names nothing: give a value, or leave the flag "
                                   "out for its default")
    for name, (allowed, text) in rules.items():
        value = getattr(cfg, name)
        if not allowed(value):
            raise Img2GPTError(f"{flag_of(name, aliases)} {shown(value)} is out of range: give {text}")


def parse_config(constants, argv=None, aliases=None, description=None, repeatable=(),
                 script=globals().get("__file__")):
    """Turn the constants block into flags (BATCH_SIZE -> --batch-size); returns a namespace of lowercase names.

    The comment beside each constant is its --help text, so defaults and help are written once.
    """
    if argv is None and "ipykernel" in sys.modules:
        argv = []  # pasted into a notebook cell: the kernel's own argv is not ours; the constants decide
    source = Path(script).read_text(encoding="utf-8") if script else ""  # a notebook cell has no file
    helps = dict(re.findall(r"^([A-Z][A-Z0-9_]*) = .*?#\s*(.+)$", source, re.M))
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in constants.items():
        flags = ["--" + name.lower().replace("_", "-")]
        if aliases and name in aliases:
            flags.insert(0, aliases[name])
        help_text = f"{helps.get(name, '')} (default: {default!r})".replace("%", "%%")  # argparse formats help
        if name in repeatable:
            parser.add_argument(*flags, dest=name.lower(), action="append", help=help_text + "; repeatable")
        elif isinstance(default, bool):
            parser.add_argument(*flags, dest=name.lower(), action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            kind = type(default) if isinstance(default, (int, float)) else str
            parser.add_argument(*flags, dest=name.lower(), type=kind, default=default, help=help_text)
    cfg = parser.parse_args(argv)
    for name in repeatable:
        if getattr(cfg, name.lower()) is None:
            setattr(cfg, name.lower(), [constants[name]])
    return cfg


def resolve_device(choice):
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise Img2GPTError(f"device '{choice}' asked for but CUDA is not available here: use --device cpu")
    try:
        return torch.device(choice)
    except RuntimeError:
        raise Img2GPTError(f"unknown device '{choice}': use cuda, cuda:N or cpu") from None


def choose_precision(device, quantize="auto"):
    """(four_bit, compute_dtype) for QUANTIZE `quantize`: "auto" is 4-bit on CUDA only. The compute dtype follows
    the hardware, never what it merely emulates. On CUDA: bf16 from Ampere (compute capability 8) on, fp16 before
    (a T4 reports torch.cuda.is_bf16_supported() True through slow emulation). On a CPU in 4-bit: bf16 where
    the CPU has bf16 instructions, fp32 elsewhere (emulated bf16 is far slower: docs/speed.md "4-bit on a
    CPU"); full precision is fp32."""
    if quantize not in QUANTIZE_CHOICES:
        raise Img2GPTError(f"unknown QUANTIZE '{quantize}': use one of {', '.join(QUANTIZE_CHOICES)}")
    four_bit = device.type == "cuda" if quantize == "auto" else quantize == "4bit"
    if device.type != "cuda":
        return four_bit, torch.bfloat16 if four_bit and cpu_has_native_bf16() else torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return four_bit, torch.bfloat16 if major >= 8 else torch.float16


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: bf16 matrix products in hardware (torch's own probes of the CPU)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def require_4bit_support(device):
    """One clear error where 4-bit cannot run: bitsandbytes missing, broken, or too old for a CPU backend."""
    fallback = "or use --quantize none (full-precision LoRA)"
    try:
        import bitsandbytes
    except Exception as exc:  # a missing package, or one whose native library fails to load
        raise Img2GPTError(f"4-bit needs bitsandbytes, which cannot be imported ({type(exc).__name__}): "
                           f"pip install -U bitsandbytes, {fallback}") from None
    from packaging.version import Version

    if device.type == "cpu" and Version(bitsandbytes.__version__) < Version(MIN_BITSANDBYTES_FOR_CPU):
        raise Img2GPTError(f"4-bit on a CPU needs bitsandbytes {MIN_BITSANDBYTES_FOR_CPU} or newer (installed: "
                           f"{bitsandbytes.__version__}): pip install -U bitsandbytes, {fallback}")


def device_map_for(device):
    """from_pretrained's device_map for a 4-bit model: the device actually used, never GPU 0 on a CPU."""
    if device.type == "cuda":
        return {"": device.index if device.index is not None else torch.cuda.current_device()}
    return {"": device.type}


def quantization_config(compute_dtype):
    """NF4 with double quantization. One object per model: a skip-module list would replace the default
    protected list (GPT-2's tied lm_head), so none is given."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def library_versions():
    import peft
    import transformers

    return {"torch": str(torch.__version__), "transformers": str(transformers.__version__), "peft": str(peft.__version__)}


# --- Data: caption files in a folder --------------------------------------------------------------
def download_dataset(handle):
    """kagglehub caches the download (~/.cache/kagglehub or $KAGGLEHUB_CACHE); public data needs no login."""
    import kagglehub

    print(f"Downloading '{handle}' with kagglehub (cached after the first time)...")
    try:
        return kagglehub.dataset_download(handle)
    except Exception as exc:
        raise Img2GPTError(f"could not download Kaggle dataset '{handle}' ({exc}): "
                           "check the connection or pass --data-dir") from None


def clean_caption(text):
    # Flickr30k captions are pre-tokenized ("the grass ."): glue punctuation back for natural targets.
    text = re.sub(r"\s+", " ", str(text)).strip()
    return re.sub(r" ([.,!?;:]|'s\b|n't\b)", r"\1", text)


def read_text(path):
    """A text file decoded tolerantly: UTF-8 with or without a BOM, else Latin-1 (which decodes any byte), so
    a file saved by any editor or tool is read; line ends of any kind."""
    return decode_text(Path(path).read_bytes())


def decode_text(data):
    """Bytes of text as read_text decodes them: UTF-8 with or without a BOM, else Latin-1."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def text_encoding(path):
    """"utf-8-sig" when the whole file is UTF-8 (BOM or not), else "latin-1"; checked in 1 MiB chunks."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        return "utf-8-sig"
    except UnicodeDecodeError:
        return "latin-1"


def text_lines(path):
    """The lines of a text file (without their line ends), streamed: a caption file is never held twice."""
    with open(path, encoding=text_encoding(path), newline=None) as file:
        for line in file:
            yield line.rstrip("\n")


def read_json(path):
    """A JSON file parsed from its bytes (no decoded copy held beside them): UTF-8 with or without a BOM, else
    Latin-1."""
    data = Path(path).read_bytes()
    try:
        return json.loads(data.removeprefix(b"\xef\xbb\xbf"))
    except UnicodeDecodeError:
        return json.loads(data.decode("latin-1"))


def sniff_layout(path):
    """Which LAYOUTS kind a file is, from its content (header row or leading JSON keys), or None."""
    try:
        with open(path, "rb") as file:
            head = file.read(1 << 16).decode("utf-8", "replace").lstrip("\ufeff")
    except OSError:  # unreadable (permissions, a broken link): not a caption file we can use
        return None
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        fields = [field.strip().lower() for field in re.split(r"[|,]", head.split("\n", 1)[0].strip())]
        if {"image_name", "comment"} <= set(fields):
            return "flickr30k"
        if "file_name" in fields and CAPTION_COLUMNS & set(fields):
            return "imagefolder"
        if fields == ["image", "caption"]:
            return "csv"
    elif suffix == ".jsonl" and path.stem == "metadata":
        return "imagefolder"
    elif suffix == ".json" and '"images"' in head:
        if '"sentences"' in head and '"filename"' in head:
            return "karpathy"
        if '"file_name"' in head:
            with open(path, "rb") as file:  # the captions follow every image entry: look at the end
                file.seek(max(0, path.stat().st_size - (1 << 16)))
                if b'"caption"' in file.read():
                    return "coco"
    return None


def find_layout(data_dir):
    """(kind, caption files) of the captioned images in data_dir or up to 3 folder levels below it,
    recognised by content. The shallowest files win; at one depth, the first kind in LAYOUTS. COCO's train and
    val annotation files are read together; otherwise one file is used and, if others were found, named."""
    root = Path(data_dir)
    if root.is_file():
        raise Img2GPTError(f"--data-dir '{data_dir}' is a file: give the folder that holds it and the images")
    if not root.is_dir():
        raise Img2GPTError(f"data folder '{data_dir}' does not exist: pass --data-dir with your dataset's folder")
    for depth in range(4):
        found = [(kind, path) for path in sorted(root.glob("/".join(["*"] * (depth + 1))))
                 if path.suffix.lower() in CAPTION_FILE_SUFFIXES and path.is_file()
                 and (kind := sniff_layout(path))]
        if found:
            kind = min((kind for kind, _ in found), key=list(LAYOUTS).index)
            files = [path for k, path in found if k == kind]
            if kind != "coco":
                if len(found) > 1:
                    print(f"Found {len(found)} caption files; using {files[0]} ({LAYOUTS[kind]})")
                files = files[:1]
            return kind, files
    raise Img2GPTError(f"no captions found in '{data_dir}' or the 3 folder levels below it: looked for "
                       + "; ".join(LAYOUTS.values()))


def locate_images(start, names, data_dir):
    """The folder the listed image names are relative to: `start` or a usual image folder beside it (Images/,
    images/, Kaggle Flickr30k's doubled folder), else wherever below data_dir the first listed image is."""
    # names that climb out (../, absolute) say nothing of where the image folder is: outside_data_dir drops them
    sample = [name for name in names[:200]
              if name and not Path(name).is_absolute() and ".." not in Path(name).parts][:50]
    if not sample and names:  # every name climbs out: they are relative to their file, and outside_data_dir says so
        return start
    candidates = [start / sub for sub in ("", "Images", "images", "flickr30k_images/flickr30k_images",
                                          "flickr30k_images")]
    hits = [(sum((folder / name).is_file() for name in sample), folder) for folder in candidates]
    best, folder = max(hits, key=lambda hit: hit[0])
    if best:
        return folder
    for name in sample[:5]:
        relative = Path(name)
        match = next(Path(data_dir).rglob(relative.name), None)
        if match is not None and match.as_posix().endswith(relative.as_posix()):
            return match.parents[len(relative.parts) - 1]
    raise Img2GPTError(f"none of the images listed (e.g. '{sample[0] if sample else '?'}') were found in "
                       f"'{start}' or below '{data_dir}'")


def read_flickr30k(path):
    """Rows of Flickr30k's results.csv: 'image_name| comment_number| comment', split at the first two '|' so a
    caption may hold '|'. One real row lacks its second '|' ("2199200615.jpg| 4   A dog runs ..."): its caption
    follows the number."""
    rows, bad = [], 0
    lines = text_lines(path)
    next(lines, None)  # the header
    for line in lines:
        parts = [part.strip() for part in line.split("|", 2)]
        if len(parts) == 2 and re.match(r"\d+\s", parts[1]):
            parts = [parts[0], *parts[1].split(None, 1)]
        if len(parts) == 3:
            rows.append((parts[0], parts[2]))
        elif line.strip():
            bad += 1
    return rows, bad


def csv_rows(path):
    """The fields of each non-blank line of a CSV file (quotes honoured, any encoding text_encoding takes), or
    None for a line that is not a whole CSV row: a quote left open (which would otherwise swallow every row
    after it into one caption) or a field past the csv module's size limit. One row per line: captions hold
    no line breaks."""
    import csv

    for line in text_lines(path):
        if line.strip():
            try:
                yield next(csv.reader([line], strict=True))
            except csv.Error:
                yield None


def read_image_caption_csv(path):
    """Rows of an 'image,caption' CSV such as Flickr8k's captions.txt; an unquoted comma in a caption makes
    more fields, which are the caption's."""
    rows, bad = [], 0
    lines = csv_rows(path)
    next(lines, None)  # the header
    for fields in lines:
        if fields is not None and len(fields) >= 2:
            rows.append((fields[0].strip(), ",".join(fields[1:])))
        else:
            bad += 1
    return rows, bad


def metadata_records(path):
    """The records of a metadata.jsonl (one JSON object a line) or metadata.csv, streamed: a dict per row, or
    None for a line that is not one."""
    if path.suffix.lower() == ".jsonl":
        for line in filter(str.strip, text_lines(path)):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            yield record if isinstance(record, dict) else None
        return
    lines = csv_rows(path)
    header = [name.strip().lower() for name in next(lines, None) or []]
    for row in lines:
        yield dict(zip(header, row)) if row is not None and len(row) == len(header) else None


def normalise_split(value):
    """The split a row names ("train", "val" or "test", however spelled: SPLIT_NAMES); None where it names
    none (null, an empty cell: the row trains, in every reader); else the name as given (counted and named
    by choose_split, never trained on)."""
    text = value.strip() if isinstance(value, str) else None if value is None else json.dumps(value)
    return SPLIT_NAMES.get(text.lower(), text) if text else None


def read_imagefolder(path):
    """Rows of Hugging Face's imagefolder metadata: file_name relative to the file's folder and a caption
    column (text, caption or captions) holding one caption or a list; an optional split column is kept."""
    rows, bad = [], 0
    for record in metadata_records(path):
        column = next((name for name in ("text", "caption", "captions") if name in record), None) if record else None
        captions = record.get(column) if column else None
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list) or not isinstance(record.get("file_name"), str):
            bad += 1
            continue
        split = normalise_split(record.get("split"))
        rows += [(record["file_name"].strip(), str(caption), split) for caption in captions]
    return rows, bad


def read_coco(path):
    """Rows of a COCO captions_*.json: annotations joined to their image's file_name."""
    try:
        content = read_json(path)
        files = {image["id"]: image["file_name"] for image in content["images"]}
        annotations = content["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Img2GPTError(f"'{path}' is not a readable COCO captions file ({type(exc).__name__})") from None
    if not isinstance(annotations, list):
        raise Img2GPTError(f"'{path}' is not a readable COCO captions file (its annotations are not a list)")
    rows = [(files[a["image_id"]], a["caption"]) for a in annotations
            if isinstance(a, dict) and isinstance(a.get("image_id"), (int, str)) and a["image_id"] in files
            and isinstance(a.get("caption"), str)]
    return rows, len(annotations) - len(rows)


def read_karpathy(path):
    """Rows of a Karpathy dataset_*.json: filepath/filename, each raw sentence, and its split."""
    try:
        images = read_json(path)["images"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Img2GPTError(f"'{path}' is not a readable Karpathy split file ({type(exc).__name__})") from None
    if not isinstance(images, list):
        raise Img2GPTError(f"'{path}' is not a readable Karpathy split file (its images are not a list)")
    rows, bad = [], 0
    for image in images:
        try:
            name = "/".join(part for part in (image.get("filepath"), image["filename"]) if part)
            rows += [(name, sentence["raw"], normalise_split(image.get("split"))) for sentence in image["sentences"]]
        except (KeyError, TypeError, AttributeError):
            bad += 1
    return rows, bad


READERS = {"flickr30k": read_flickr30k, "csv": read_image_caption_csv, "coco": read_coco,
           "karpathy": read_karpathy, "imagefolder": read_imagefolder}


def load_captions(kind, files, data_dir):
    """(DataFrame(image_name, caption[, split]), image folder, rows skipped) of a layout find_layout found.
    Image names are relative to the image folder; captions are cleaned; a malformed row, a blank caption or a
    row listed twice is skipped and counted, never the whole file refused."""
    import pandas as pd

    frames, bad = [], 0
    for path in files:
        rows, skipped = READERS[kind](path)
        bad += skipped
        columns = ["image_name", "caption", "split"][:len(rows[0])] if rows else ["image_name", "caption"]
        frame = pd.DataFrame(rows, columns=columns)
        if frame.empty:
            raise Img2GPTError(f"'{path}' holds no caption rows: it is empty or none of its rows can be read")
        folder = locate_images(path.parent, list(frame["image_name"]), data_dir)
        if kind == "coco":  # train2014/ and val2014/: names relative to DATA_DIR, so both fit one folder
            frame["image_name"] = [Path(os.path.relpath(folder / name, data_dir)).as_posix()
                                   for name in frame["image_name"]]
            folder = Path(data_dir)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    if "split" in frame:  # a split column only some rows fill: the others train
        frame = frame.drop(columns="split") if frame["split"].isna().all() else frame.fillna({"split": "train"})
    frame["caption"] = frame["caption"].map(clean_caption)
    frame["image_name"] = frame["image_name"].str.strip()
    named = (frame["image_name"] != "") & ~frame["image_name"].str.contains("\x00", regex=False)  # no file has NUL
    kept = frame[named & (frame["caption"] != "")].drop_duplicates(["image_name", "caption"])
    return kept.reset_index(drop=True), folder, bad + len(frame) - len(kept)


def outside_data_dir(names, image_dir, data_dir):
    """The image names that resolve outside data_dir (../, an absolute path, a link that leads out): a caption
    file, perhaps someone else's, must not decide which files on this machine a run reads. Links inside the
    folder that lead to another place inside it are fine."""
    root = os.path.realpath(data_dir)
    return sorted(name for name in set(names)
                  if os.path.commonpath([root, os.path.realpath(Path(image_dir) / name)]) != root)


# What opening one image may raise. Beside OSError, SyntaxError, ValueError and the decompression-bomb errors,
# Pillow's decoders raise others for malformed files (NotImplementedError from a DDS, struct.error, IndexError):
# every failure to decode one image is that image's problem, never the whole run's or the other images'.
IMAGE_ERRORS = (Exception,)


def is_usable_image(path):
    if not Path(path).is_file():  # missing, or a named pipe or device that would block the read forever
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.verify()
        return True
    except IMAGE_ERRORS:
        return False


def drop_unusable_images(captions, image_dir, verbose=True):
    """(rows whose image opens, images left out): missing, empty or unreadable images are dropped before
    training, checked in parallel threads (the check is file I/O), so no epoch dies halfway."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    names = sorted(captions["image_name"].unique())
    pool = ThreadPoolExecutor(max_workers=8)
    try:
        usable = list(tqdm(pool.map(lambda n: is_usable_image(Path(image_dir) / n), names), total=len(names),
                           desc="checking images", leave=False, disable=not verbose))
    finally:  # on Ctrl+C the images still queued are dropped, not checked first
        pool.shutdown(wait=False, cancel_futures=True)
    bad = {name for name, ok in zip(names, usable) if not ok}
    if bad and verbose:
        print(f"Left out {len(bad)} of {len(names)} images: missing or unreadable (e.g. {sorted(bad)[0]})")
    kept = captions[~captions["image_name"].isin(bad)].reset_index(drop=True)
    if kept.empty:
        raise Img2GPTError(f"none of the {len(names)} images the captions list could be read in '{image_dir}'")
    return kept, sorted(bad)


# --- Data: streamed WebDataset shards and Hugging Face datasets -----------------------------------
# Data that outgrows a folder is read as streams of samples from units (one tar shard, or one file of a Hugging
# Face dataset), never unpacked to disk: one counting pass learns how many caption rows each unit holds for
# training and keeps the few held-out validation and test samples in memory; each epoch every (process, worker)
# slot reads its own units and cuts their rows into the batches planned for it, so memory stays bounded.
def stream_kind(cfg):
    """"huggingface" (--hf-dataset), "webdataset" (--data-dir names .tar shards) or None (a folder of images)."""
    if cfg.hf_dataset:
        return "huggingface"
    spec = str(cfg.data_dir or "")
    if ".tar" in spec and not Path(spec).is_dir():  # a shard, a brace pattern or a URL
        return "webdataset"
    return "webdataset" if spec and Path(spec).is_dir() and any(Path(spec).glob("*.tar")) else None


def is_url(text):
    return re.match(r"https?://", str(text)) is not None


def stream_error(exc):
    """An exception met reading a unit, in one short line (webdataset appends the stream object to its args)."""
    reason = str(exc.args[0]) if getattr(exc, "args", None) else str(exc)
    if isinstance(exc, OSError) and exc.strerror:  # "No such file or directory", not the bare errno
        reason = exc.strerror
    reason = reason.split("\n")[0].split(" @ <")[0]
    return f"{type(exc).__name__}: {reason[:160]}"


class ShardSource:
    """WebDataset tar shards as img2dataset writes them: KEY.jpg (or .png, .webp), KEY.txt (the caption) and
    KEY.json (its `caption` when there is no .txt). The .parquet and _stats.json files beside them are not shards.
    Local shards are read as files; http(s) ones as they arrive, a stall of `timeout` seconds ending the shard."""

    def __init__(self, spec, timeout):
        import glob

        from webdataset.shardlists import expand_urls

        self.spec, self.timeout = str(spec), timeout
        folder = Path(self.spec)
        if folder.is_dir():
            units = sorted(map(str, folder.glob("*.tar")))
        elif not is_url(self.spec) and re.search(r"[*?[]", self.spec):  # a quoted wildcard: the shell's meaning
            units = sorted(glob.glob(self.spec))
        else:
            units = expand_urls(self.spec)
        self.units = list(dict.fromkeys(units))  # a shard named twice is read once
        if not self.units:
            raise Img2GPTError(f"--data-dir '{spec}' names no .tar shards: give a folder of them, a pattern such as "
                               "/data/{00000..00099}.tar, or http(s) URLs")
        self.has_split = False
        self.describe, self.unit_word = f"{len(self.units):,} WebDataset shard(s) ({self.spec})", "shard"
        # A shard's name in sample names and messages: its file name without .tar, or, where two shards share one
        # (a/00000.tar, b/00000.tar), its path from where their paths part.
        paths = [unit.split("?")[0] for unit in self.units]
        names = [Path(path).stem for path in paths]
        if len(set(names)) < len(names):
            common = len(os.path.commonprefix(paths).rpartition("/")[0]) + 1
            names = [path[common:].removesuffix(".tar") for path in paths]
        self.names = dict(zip(self.units, names))

    def name(self, unit):
        return self.names[unit]

    def samples(self, unit):
        """(name, image bytes or None, captions, split None) of each sample of one shard, as webdataset groups
        its members. A shard that cannot be read to its end raises after the samples before the damage."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        if is_url(unit):
            import requests

            stream = requests.get(unit, stream=True, timeout=self.timeout)  # timeout: per read, so a stall ends it
            stream.raise_for_status()
            stream.raw.decode_content = True
            fileobj = stream.raw
        else:
            if not Path(unit).is_file():  # a named pipe or a device would block the read forever
                raise OSError(0, "not a regular file" if Path(unit).exists() else "No such file or directory")
            stream = fileobj = open(unit, "rb")
        with stream:
            for sample in group_by_keys(tar_file_expander([{"url": unit, "stream": fileobj}])):
                image = next((sample[suffix] for suffix in SHARD_IMAGE_SUFFIXES if suffix in sample), None)
                captions = []
                if "txt" in sample:
                    captions = [decode_text(sample["txt"])]
                elif "json" in sample:
                    try:
                        caption = json.loads(sample["json"]).get("caption")
                    except (ValueError, AttributeError):
                        caption = None
                    captions = caption if isinstance(caption, list) else [caption]
                yield f"{self.name(unit)}/{sample['__key__']}", image, captions, None


class HubSource:
    """A Hugging Face dataset (a Hub name, or a local folder of parquet/arrow files or one save_to_disk wrote),
    streamed file by file. Its image column is the one of Image type and its caption column is found by name and
    type, unless given; its own split (named splits, or a `split` column) is used when it has one."""

    def __init__(self, name, image_column=None, caption_column=None):
        import datasets

        self.describe, self.unit_word = f"Hugging Face dataset '{name}'", "file"
        try:
            folder = Path(name)
            if folder.is_dir() and any((folder / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
                saved = datasets.load_from_disk(str(folder))
                saved = saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
                splits = {split: part.to_iterable_dataset(num_shards=max(1, min(64, len(part) // 1000)))
                          for split, part in saved.items()}
            elif folder.is_file() and folder.suffix in (".parquet", ".arrow"):  # one file: its builder by suffix
                splits = dict(datasets.load_dataset(folder.suffix[1:], data_files=str(folder), streaming=True))
            else:
                splits = dict(datasets.load_dataset(str(name), streaming=True))
            splits = {split: part if part.features else part._resolve_features() for split, part in splits.items()}
        except Img2GPTError:
            raise
        except Exception as exc:  # not found, offline, not a dataset: the library's reason, in one line
            raise Img2GPTError(f"cannot read Hugging Face dataset '{name}' ({stream_error(exc)}): give a Hub name "
                               "such as nlphuji/flickr30k or a local folder of parquet/arrow files") from None
        features = next(iter(splits.values())).features
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        self.image_column = self.column(name, features, image_column, "--image-column", images, "image",
                                        lambda feature: isinstance(feature, datasets.Image))
        texts = [c for c, f in features.items() if c not in ("split", self.image_column) and is_text_feature(f)]
        preferred = [c for c in HF_CAPTION_COLUMNS if c in texts] or (texts if len(texts) == 1 else [])
        self.caption_column = self.column(name, features, caption_column, "--caption-column", preferred, "caption",
                                          is_text_feature)
        named = {split: normalise_split(split) for split in splits}
        self.split_column = "split" if "split" in features and "split" != self.caption_column else None
        self.has_split = bool({"val", "test"} & set(named.values())) or self.split_column is not None
        self.splits, self.named = splits, named
        self.units = [(split, index) for split, part in splits.items() for index in range(part.n_shards)]

    @staticmethod
    def column(name, features, given, flag, candidates, what, holds):
        """The column holding the images or captions: `given` (checked), else the first candidate."""
        if given:
            if given not in features:
                raise Img2GPTError(f"{flag} '{given}' is not a column of '{name}' (columns: {', '.join(features)})")
            if not holds(features[given]):
                raise Img2GPTError(f"{flag} '{given}' of '{name}' holds no {what}s (it holds {features[given]}): "
                                   "pass the column that does")
            return given
        if candidates:
            return candidates[0]
        raise Img2GPTError(f"cannot tell which column of '{name}' holds the {what}s (columns: {', '.join(features)})"
                           f": pass {flag} NAME")

    def name(self, unit):
        return f"{unit[0]}-{unit[1]:05d}"

    def samples(self, unit):
        import datasets

        split, index = unit
        part = self.splits[split]
        part = part.shard(num_shards=part.n_shards, index=index)
        part = part.cast_column(self.image_column, datasets.Image(decode=False))  # bytes: decoded in the workers
        # .iter, not iter(): inside a DataLoader worker iter() would split the unit again among the workers.
        rows = ({column: values[k] for column, values in batch.items()}
                for batch in part.iter(batch_size=64) for k in range(len(next(iter(batch.values())))))
        for number, row in enumerate(rows):
            image = row[self.image_column] or {}
            data = image.get("bytes") if isinstance(image, dict) else None
            if data is None and isinstance(image, dict) and image.get("path") and Path(image["path"]).is_file():
                data = Path(image["path"]).read_bytes()
            captions = row[self.caption_column]
            captions = captions if isinstance(captions, list) else [captions]
            if self.split_column:
                row_split = normalise_split(row[self.split_column])
            else:
                row_split = self.named[split] if self.has_split else None
            yield f"{self.name(unit)}/{number}", data, captions, row_split


def is_text_feature(feature):
    """A string column, or a list of strings (several captions per image)."""
    import datasets

    inner = getattr(feature, "feature", None)
    if inner is not None and not isinstance(feature, datasets.Value):
        return is_text_feature(inner)
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def make_source(cfg):
    if stream_kind(cfg) == "huggingface":
        return HubSource(cfg.hf_dataset, cfg.image_column, cfg.caption_column)
    return ShardSource(cfg.data_dir, cfg.request_timeout)


def sample_problem(image, captions):
    """(None, the sample's cleaned captions), or (what makes it untrainable, []). The image is identified from its
    header, not decoded (that happens in the DataLoader workers, once per epoch)."""
    captions = list(dict.fromkeys(c for c in (clean_caption(text) for text in captions if isinstance(text, str)) if c))
    if image is None:
        return "no image (KEY.jpg, .jpeg, .png or .webp; a key ends at its first dot)", []
    if not captions:
        return "no caption", []
    try:
        with Image.open(io.BytesIO(image)):
            pass
    except IMAGE_ERRORS:
        return "not an image", []
    return None, captions


def key_hash(seed, name):
    """A sample's place in the held-out order: a hash of the seed and its name, the same on every machine."""
    import hashlib

    return hashlib.sha1(f"{seed}:{name}".encode("utf-8")).hexdigest()


class HeldOut:
    """The samples with the smallest key hashes seen so far in each held-out pool, at most `size` each: what
    validation and test will be once the counting pass ends, in bounded memory. Fed from several threads."""

    def __init__(self, sizes):
        import threading

        self.sizes, self.pools, self.lock = sizes, {pool: [] for pool in sizes}, threading.Lock()

    def offer(self, pool, seed, name, unit, image, captions):
        import heapq

        if self.sizes.get(pool, 0) <= 0:
            return
        item = (-int(key_hash(seed, name), 16), name, unit, image, captions)  # heapq's min-heap: the largest hash
        with self.lock:
            heap = self.pools[pool]
            if len(heap) < self.sizes[pool]:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)

    def taken(self, pool):
        """(name, unit, image, captions) of the pool, smallest hash first."""
        return [item[1:] for item in sorted(self.pools[pool], reverse=True)]


def count_unit(source, unit, held, seed):
    """One unit's part of the counting pass: its caption rows by split, the held-out candidates it offers, what
    it leaves out by name, and the error that ended it early, if any."""
    from collections import Counter

    rows, samples, left_out, bad, error = Counter(), Counter(), [], 0, None
    try:
        for name, image, captions, split in source.samples(unit):
            problem, captions = sample_problem(image, captions)
            if not problem and split not in (None, "train", "val", "test"):
                problem = f"split '{split}'"
            if problem:
                bad += 1
                if len(left_out) < LEFT_OUT_NAMES_PER_UNIT:
                    left_out.append((name, problem))
                continue
            rows[split] += len(captions)
            samples[split] += 1
            held.offer("held" if split is None else split, seed, name, unit, image, captions)
    except Exception as exc:  # a truncated tar, a 404, a stall, a file that is not parquet: the unit's problem
        error = stream_error(exc)
    return {"rows": rows, "samples": samples, "left_out": left_out, "bad": bad, "error": error}


def index_stream(cfg, main=True):
    """The counting pass over every unit, in threads (reading is I/O): caption rows for training per unit, the
    held-out validation and test samples (in memory), and what was left out. Sized like split_by_image: at most
    VAL_IMAGES / TEST_IMAGES, and 10% each of a small dataset."""
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd
    from tqdm.auto import tqdm

    source = make_source(cfg)
    sizes = ({"val": cfg.val_images, "test": cfg.test_images} if source.has_split
             else {"held": cfg.val_images + cfg.test_images})
    held = HeldOut(sizes)
    if main:
        print(f"Counting the samples of {source.describe}: one pass over the data (images are checked, not decoded)")
    pool = ThreadPoolExecutor(max_workers=8)
    try:
        counted = list(tqdm(pool.map(lambda unit: count_unit(source, unit, held, cfg.seed), source.units),
                            total=len(source.units), desc="counting samples", unit="unit", disable=not main))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    broken = [(source.name(unit), c["error"]) for unit, c in zip(source.units, counted) if c["error"]]
    left_out = [f"{name}: {problem}" for c in counted for name, problem in c["left_out"]]
    left_out += [f"{name} (from there on): {error}" for name, error in broken]
    bad = sum(c["bad"] for c in counted)
    total = sum(c["samples"][split] for c in counted for split in (None, "train", "val", "test"))
    if total == 0:
        example = f" (e.g. {left_out[0]})" if left_out else ""
        raise Img2GPTError(f"nothing could be read from {source.describe}{example}: check the path or URL and that "
                           "the samples hold an image and a caption")
    if source.has_split:
        val, test = held.taken("val"), held.taken("test")
        split_name = "the data's own split"
    else:
        n_val, n_test = held_out_sizes(total, cfg.val_images, cfg.test_images)
        taken = held.taken("held")
        val, test = taken[:n_val], taken[n_val:n_val + n_test]
        split_name = f"held out by a hash of each sample's key (seed {cfg.seed})"
    held_names = {name for name, *_ in val + test}
    train_rows = [c["rows"]["train"] + c["rows"][None] for c in counted]
    train_samples = sum(c["samples"]["train"] + c["samples"][None] for c in counted)
    if not source.has_split:  # hashed out of training: their rows leave their units' counts
        position = {unit: k for k, unit in enumerate(source.units)}
        for _, unit, _, captions in val + test:
            train_rows[position[unit]] -= len(captions)
        train_samples -= len(val) + len(test)
    rows = [(name, caption, split) for split, part in (("val", val), ("test", test))
            for name, _, _, captions in part for caption in captions]
    captions = pd.DataFrame(rows, columns=["image_name", "caption", "split"])
    if main:
        print(f"Data: {source.describe}, {total:,} samples; training on {train_samples:,} images "
              f"({sum(train_rows):,} captions) in {sum(r > 0 for r in train_rows):,} {source.unit_word}(s)")
        if broken:
            print(f"Left out {len(broken)} of {len(source.units)} {source.unit_word}(s) from where they could not be "
                  f"read (e.g. {broken[0][0]}: {broken[0][1]})")
        if bad:
            print(f"Left out {bad:,} samples without an image, a caption or a known split (e.g. {left_out[0]})")
    plan = types.SimpleNamespace(source=source, units=source.units, train_rows=train_rows, held=held_names)
    digest = short_digest(f"{source.name(unit)}:{count}" for unit, count in zip(source.units, train_rows))
    return types.SimpleNamespace(
        captions=captions, image_dir=None, left_out=left_out, split_name=split_name, layout=stream_kind(cfg),
        splits={"train": [], "val": [name for name, *_ in val], "test": [name for name, *_ in test]},
        open_image=partial(image_from_bytes, {name: image for name, _, image, _ in val + test}),
        caption_files=[source.describe], skipped_rows=0, unknown_splits={}, stream=plan,
        left_out_count=len(broken) + bad,
        train_images=train_samples, train_captions=sum(train_rows),
        train_split={"images": train_samples, "sha256": digest})


def short_digest(lines):
    """A short fingerprint of some lines of text."""
    import hashlib

    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def deal_units(train_rows, world, workers):
    """Which units each (process, worker) slot reads, slot = rank * workers + worker, fixed for the run (so every
    epoch has as many batches): units dealt to processes, then to each process's workers, each unit to the one
    holding the fewest caption rows so far, largest first. Units with no training rows are dealt to none."""
    def deal(units, bins):
        dealt, load = [[] for _ in range(bins)], [0] * bins
        for unit in sorted(units, key=lambda u: (-train_rows[u], u)):
            least = min(range(bins), key=lambda b: (load[b], b))
            dealt[least].append(unit)
            load[least] += train_rows[unit]
        return dealt

    per_process = deal([u for u, rows in enumerate(train_rows) if rows > 0], world)
    return [slot for units in per_process for slot in deal(units, workers)]


def batch_sizes(slot_rows, batch_size, world, workers):
    """The caption rows of each batch of each slot: at most batch_size, and the same number of batches (steps) for
    every process, so data-parallel processes step in lockstep and every row is trained once per epoch. A process
    with fewer rows takes more, smaller batches; each slot's batches differ in size by one at most."""
    counts = [-(-rows // batch_size) for rows in slot_rows]
    steps = max(sum(counts[r * workers:(r + 1) * workers]) for r in range(world))
    for rank in range(world):
        slots = range(rank * workers, (rank + 1) * workers)
        while sum(counts[s] for s in slots) < steps:
            room = [s for s in slots if slot_rows[s] > counts[s]]
            if not room:
                raise Img2GPTError(f"the shards cannot be shared by {world} processes: process {rank} would hold "
                                   f"{sum(slot_rows[s] for s in slots)} caption rows for {steps} steps; use fewer "
                                   "processes, or the data in more shards of similar size")
            fullest = max(room, key=lambda s: (slot_rows[s] / counts[s] if counts[s] else math.inf, -s))
            counts[fullest] += 1
    return [[rows // count + (k < rows % count) for k in range(count)] for rows, count in zip(slot_rows, counts)]


# --- Data: the split ------------------------------------------------------------------------------
def standard_dataset(image_names):
    """Which of Karpathy's datasets ("flickr30k", "flickr8k", "coco") the images are, from how their files are
    named, or None (your own images)."""
    names = [Path(name).name for name in sorted(set(image_names))[:500]]
    for dataset, pattern in STANDARD_IMAGE_NAMES.items():
        if names and sum(bool(re.fullmatch(pattern, name)) for name in names) >= 0.9 * len(names):
            return dataset
    return None


def karpathy_key(name, dataset):
    """COCO images match by id (2014 and 2017 file names differ); Flickr's by file name."""
    name = Path(name).name
    return int(re.findall(r"\d+", name)[-1]) if dataset == "coco" and re.search(r"\d", name) else name


def karpathy_split(path, image_names, dataset=None):
    """(splits, {unknown split name: images}): Karpathy's train/val/test assignment (a dataset_*.json),
    restricted to the images at hand, so scores compare with published ones; 'restval' and images the file does
    not list train; an image it gives a split of no known name is left out (see group_by_split)."""
    require_split_file(path)
    try:
        content = read_json(path)
        dataset = dataset or content.get("dataset")
        assignment = {karpathy_key(image["filename"], dataset): normalise_split(image.get("split"))
                      for image in content["images"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Img2GPTError(f"cannot read Karpathy split file '{path}' ({type(exc).__name__}): give a "
                           "dataset_*.json, or --karpathy-split-file none") from None
    return group_by_split((name, assignment.get(karpathy_key(name, dataset)) or "train") for name in set(image_names))


def require_split_file(path):
    """A --karpathy-split-file must be a regular file: reading a named pipe would wait forever."""
    if not Path(path).is_file():
        what = "is not a regular file (a named pipe or a device)" if Path(path).exists() else "does not exist"
        raise Img2GPTError(f"Karpathy split file '{path}' {what}: give a dataset_*.json, or --karpathy-split-file "
                           "auto / none")


def group_by_split(assigned):
    """(splits, {unknown split name: image count}) of (image, split) pairs, images sorted within each split.
    A split named none of train/val/test (after normalise_split) is neither trained on nor held out: counted."""
    from collections import Counter

    splits, unknown = {"train": [], "val": [], "test": []}, Counter()
    for name, split in sorted(assigned):
        if split in splits:
            splits[split].append(name)
        else:
            unknown[split] += 1
    return splits, dict(unknown)


def fetch_karpathy_split(dataset):
    """Karpathy's dataset_<dataset>.json: from img2gpt's cache, else downloaded from Kaggle into it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "img2gpt" / f"dataset_{dataset}.json"
    if cache.is_file():
        return cache
    import kagglehub

    try:
        path = kagglehub.dataset_download(KARPATHY_SPLITS, path=f"caption_datasets/dataset_{dataset}.json")
        cache.parent.mkdir(parents=True, exist_ok=True)
        data = Path(path).read_bytes()
    except Exception as exc:  # no connection, no such file, a cache we cannot write: the caller falls back
        reason = str(exc).split("\n")[0]
        raise Img2GPTError(f"{type(exc).__name__}: {reason[:100]}{'...' if len(reason) > 100 else ''}") from None
    write_atomically(cache, lambda file: file.write(data))
    return cache


def choose_split(cfg, captions, main=True):
    """(splits, {unknown split name: images left out}, what the split is). KARPATHY_SPLIT_FILE "auto": the
    data's own split when it has one (a split column, a Karpathy JSON), else Karpathy's for Flickr30k, Flickr8k
    or COCO, downloaded once; when that fails, the seeded split, said loudly. A path: that file. "none": the
    seeded split."""
    names, choice = captions["image_name"], cfg.karpathy_split_file
    seeded = f"seeded (seed {cfg.seed})"
    if choice not in ("auto", "none"):
        return *karpathy_split(choice, names), f"karpathy ({Path(choice).name})"
    if choice == "auto" and "split" in captions:
        first = captions.drop_duplicates("image_name")  # an image listed in two splits keeps its first
        return *group_by_split(zip(first["image_name"], first["split"])), "the data's own split"
    dataset = standard_dataset(names) if choice == "auto" else None
    if dataset:
        try:
            splits, unknown = karpathy_split(fetch_karpathy_split(dataset), names, dataset)
            if splits["val"] and splits["test"]:
                return splits, unknown, f"karpathy ({dataset})"
            seeded += f", none of Karpathy's {dataset} validation or test images are here"
        except Img2GPTError as exc:
            seeded += ", NOT Karpathy's: it could not be downloaded"
            if main:
                print(f"WARNING: Karpathy's {dataset} split could not be downloaded ({exc}). Using a seeded split: "
                      "test scores are NOT comparable with published ones. Pass --karpathy-split-file with a "
                      f"copy of dataset_{dataset}.json to use it.")
    elif choice == "auto":
        seeded += ", your own images have no standard split"
    return split_by_image(names, cfg.val_images, cfg.test_images, cfg.seed), {}, seeded


def split_by_image(image_names, val_images, test_images, seed):
    """Deterministic train/val/test split of image names (never of captions, so no image leaks).
    Small sets get at most 10% per held-out split but at least one image each once there are three."""
    names = sorted(set(image_names))
    random.Random(seed).shuffle(names)
    n_val, n_test = held_out_sizes(len(names), val_images, test_images)
    return {"train": names[n_val + n_test:], "val": names[:n_val], "test": names[n_val:n_val + n_test]}


def held_out_sizes(images, val_images, test_images):
    """(validation, test) image counts of a split of `images`: VAL_IMAGES / TEST_IMAGES, at most 10% each of small
    data but at least one each once there are three images."""
    if images < 3:
        return 0, 0
    return min(val_images, max(1, images // 10)), min(test_images, max(1, images // 10))


def train_split_digest(splits):
    """A short fingerprint of the training images: a resume must see the same ones in the same order."""
    return {"images": len(splits["train"]), "sha256": short_digest(sorted(splits["train"]))}


def prepare_data(cfg, main=True):
    """Captions of the usable images, their folder, and the split (Karpathy's when its file is given); for
    shards and Hugging Face datasets, their counting pass (index_stream). Only the main process reports."""
    if stream_kind(cfg):
        return index_stream(cfg, main)
    if cfg.karpathy_split_file not in ("auto", "none"):
        require_split_file(cfg.karpathy_split_file)  # before minutes of reading and checking images
    data_dir = Path(cfg.data_dir or download_dataset(cfg.kaggle_dataset))
    kind, files = find_layout(data_dir)
    captions, image_dir, skipped = load_captions(kind, files, data_dir)
    if main:
        print(f"Data: {LAYOUTS[kind]}: {', '.join(map(str, files))}, {len(captions):,} captions of "
              f"{captions['image_name'].nunique():,} images"
              + (f"; skipped {skipped:,} malformed, blank or repeated rows" if skipped else ""))
    outside = [] if cfg.allow_outside_data_dir else outside_data_dir(captions["image_name"], image_dir, data_dir)
    if outside:
        captions = captions[~captions["image_name"].isin(set(outside))].reset_index(drop=True)
        if captions.empty:
            raise Img2GPTError(f"every image the captions name lies outside --data-dir '{data_dir}' (e.g. "
                               f"'{outside[0]}'): pass --allow-outside-data-dir if they are yours to read")
        if main:
            print(f"Left out {len(outside):,} images named outside --data-dir (e.g. '{outside[0]}'): caption files "
                  "may only name images inside it (--allow-outside-data-dir reads them)")
    captions, left_out = drop_unusable_images(captions, image_dir, verbose=main)
    splits, unknown_splits, split_name = choose_split(cfg, captions, main)
    if unknown_splits and main:
        print(f"Left out {sum(unknown_splits.values()):,} images whose split is not train, val or test: "
              + ", ".join(f"'{name}' ({count:,})" for name, count in sorted(unknown_splits.items()))
              + f" (known spellings: {', '.join(sorted(SPLIT_NAMES))})")
    train_rows = captions["image_name"].isin(set(splits["train"]))
    return types.SimpleNamespace(captions=captions, image_dir=image_dir, left_out=outside + left_out, splits=splits,
                                 split_name=split_name, layout=kind, caption_files=files, skipped_rows=skipped,
                                 unknown_splits=unknown_splits, open_image=partial(image_in_folder, image_dir),
                                 left_out_count=len(outside + left_out),
                                 stream=None, train_images=len(splits["train"]), train_captions=int(train_rows.sum()),
                                 train_split=train_split_digest(splits))


# --- Data: images, datasets and loaders -----------------------------------------------------------
def load_image(source):
    """An RGB PIL image from a path or file object: EXIF rotation applied, alpha composited on white.
    Raises one of IMAGE_ERRORS for what is not a decodable image of a sane size."""
    from PIL import ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over Pillow's pixel limit: refuse
        image = ImageOps.exif_transpose(Image.open(source))
        image.load()
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = image.convert("I").point(lambda v: v / 256).convert("L")  # 16-bit/float grayscale -> 8 bit
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def preprocess(processor, images):
    """(N, 3, H, W) pixel values by the encoder's own image processor (size and normalisation)."""
    return processor(images=images, return_tensors="pt")["pixel_values"]


def image_from_bytes(images, name):
    return load_image(io.BytesIO(images[name]))


def image_in_folder(folder, name):
    return load_image(Path(folder) / name)


class CaptionDataset(torch.utils.data.Dataset):
    """Caption rows grouped by image: the rows of one image are consecutive and `groups` lists each image's row
    indices. A batch (dataset[indices] through __getitems__) decodes each of its images once and gives
    {pixel_values (images, 3, H, W), captions, image_index (which image each caption describes)}; an image that
    fails to decode leaves its captions out, and a batch with none left is None."""

    def __init__(self, rows, open_image, processor):
        by_image = {}
        for name, caption in rows:
            by_image.setdefault(name, []).append(caption)
        self.rows = [(name, caption) for name, captions in by_image.items() for caption in captions]
        self.groups, first = [], 0
        for captions in by_image.values():
            self.groups.append(list(range(first, first + len(captions))))
            first += len(captions)
        self.open_image = open_image
        self.processor = processor

    def __len__(self):
        return len(self.rows)

    def pixels(self, name):
        return decoded_pixels(self.processor, self.open_image, name)

    def __getitem__(self, index):
        name, caption = self.rows[index]
        pixels = self.pixels(name)
        return None if pixels is None else (pixels, caption)

    def __getitems__(self, indices):
        batch, _ = caption_batch([self.rows[i] for i in indices], self.pixels)
        return batch


def decoded_pixels(processor, open_image, name):
    """The preprocessed pixels of image `name`, or None (said, by name) when it does not decode: it passed the
    up-front check (e.g. a JPEG cut short) or there was none (streamed data)."""
    try:
        return preprocess(processor, [open_image(name)])[0]
    except IMAGE_ERRORS as exc:
        print(f"Left out {name}: not a decodable image ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def caption_batch(rows, pixels_of):
    """({pixel_values (images, 3, H, W), captions, image_index (which image each caption describes)}, the names of
    its images) of (image name, caption) rows, each image decoded once by pixels_of (None: its captions are left
    out); (None, []) when no image decodes."""
    images = {}  # name -> pixels, in the order the rows first name each image
    for name in dict.fromkeys(name for name, _ in rows):
        if (pixels := pixels_of(name)) is not None:
            images[name] = pixels
    kept = [(name, caption) for name, caption in rows if name in images]
    if not kept:
        return None, []
    position = {name: k for k, name in enumerate(images)}
    return ({"pixel_values": torch.stack(list(images.values())), "captions": [caption for _, caption in kept],
             "image_index": torch.tensor([position[name] for name, _ in kept])}, list(images))


def tokenize_captions(tokenizer, captions, max_tokens):
    """input_ids, attention_mask, labels. EOS is appended and kept as a target so captions learn to end.
    Padding uses EOS too, so labels come from the attention mask: -100 only on padding."""
    ids = [tokenizer(c, add_special_tokens=False, truncation=True, max_length=max_tokens - 1)["input_ids"]
           + [tokenizer.eos_token_id] for c in captions]
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)


def collate_batch(batch, tokenizer, max_tokens):
    """The model's inputs for a batch from CaptionDataset.__getitems__ or StreamBatches, with a stream batch's
    `keys` and `where` beside them (None, or a stream batch with no captions, stays as it is)."""
    if batch is None or "captions" not in batch:
        return batch
    return {"pixel_values": batch["pixel_values"], "image_index": batch["image_index"],
            **tokenize_captions(tokenizer, batch["captions"], max_tokens),
            **{key: batch[key] for key in ("keys", "where") if key in batch}}


def make_datasets(data, processor):
    """A CaptionDataset of every caption row of the train and of the val images; streamed data trains from
    StreamBatches (made per epoch by make_loader) and keeps only its held-out validation rows here."""
    datasets = {"train": None}
    for split in ("val",) if data.stream else ("train", "val"):
        rows = data.captions[data.captions["image_name"].isin(set(data.splits[split]))]
        datasets[split] = CaptionDataset(zip(rows["image_name"], rows["caption"]), data.open_image, processor)
    return datasets


class EpochBatchSampler(torch.utils.data.Sampler):
    """This process's batches of one epoch, in an order fixed by (seed, epoch), from its batch `start` on: a
    resumed run sees exactly the batches the interrupted one had not, without decoding the ones it skips.
    `groups` are the row indices of each image (an int n: n images of one row each). The images are shuffled
    and their rows, kept together, cut into batches of batch_size rows: each batch holds whole images, but for
    the first and last, whose other rows may fall in the batch before or after it. Every row is trained once
    per epoch. With several processes (data parallel), process `rank` of `world` takes every world-th batch, and
    all take the same number of them (DDP steps in lockstep), so a last incomplete round is left out."""

    def __init__(self, groups, batch_size, seed, epoch, start=0, rank=0, world=1):
        groups = [[i] for i in range(groups)] if isinstance(groups, int) else groups
        shuffled = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        order = [row for image in shuffled.tolist() for row in groups[image]]
        batches = [order[first:first + batch_size] for first in range(0, len(order), batch_size)]
        self.batches = batches[rank::world][:len(batches) // world][start:]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class StreamBatches(torch.utils.data.IterableDataset):
    """This process's training batches of one epoch from streamed units. Slot (rank, worker) reads its own units in
    an order fixed by (seed, epoch), each through a seeded shuffle buffer, and cuts their rows into its planned
    batches; `progress` (batches each slot already trained) makes a resumed run start each slot where it stopped,
    skipping whole units unread and the rest undecoded. A batch is {pixel_values, captions, image_index, keys,
    where: (slot, number)}; one whose images all fail to decode, or that a unit cut short leaves empty, holds only
    `where`."""

    def __init__(self, plan, processor, batch_size, seed, epoch, rank=0, world=1, workers=1, progress=None):
        self.plan, self.processor, self.seed, self.epoch = plan, processor, seed, epoch
        self.slots = deal_units(plan.train_rows, world, workers)
        self.sizes = batch_sizes([sum(plan.train_rows[u] for u in units) for units in self.slots], batch_size,
                                 world, workers)
        self.mine = list(range(rank * workers, (rank + 1) * workers))
        self.progress = list(progress) if progress else [0] * (world * workers)

    def __len__(self):
        return sum(len(self.sizes[slot]) - self.progress[slot] for slot in self.mine)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for slot in [self.mine[info.id]] if info else self.mine:
            yield from self.slot_batches(slot)

    def slot_batches(self, slot):
        import itertools

        sizes, done = self.sizes[slot], self.progress[slot]
        rows = self.slot_rows(slot, skip=sum(sizes[:done]))
        for number in range(done, len(sizes)):
            yield self.batch(list(itertools.islice(rows, sizes[number])), (slot, number))

    def slot_rows(self, slot, skip):
        """(name, image bytes, caption) of the slot's training rows in this epoch's order, from row `skip` on."""
        units = list(self.slots[slot])
        random.Random(f"{self.seed}:{self.epoch}:{slot}").shuffle(units)
        for unit in units:
            if skip >= self.plan.train_rows[unit]:
                skip -= self.plan.train_rows[unit]
                continue
            for name, image, captions in self.unit_samples(unit):
                for caption in captions:
                    if skip:
                        skip -= 1
                        continue
                    yield name, image, caption

    def unit_samples(self, index):
        """The training samples of unit `index` (what the counting pass counted for it), shuffled in a bounded
        buffer."""
        from webdataset.filters import shuffle

        source, unit = self.plan.source, self.plan.units[index]

        def trainable():
            try:
                for name, image, captions, split in source.samples(unit):
                    problem, captions = sample_problem(image, captions)
                    if not problem and split in (None, "train") and name not in self.plan.held:
                        yield name, image, captions
            except Exception as exc:  # counted and said by the counting pass; said again if new
                print(f"Left out the rest of {source.name(unit)}: {stream_error(exc)}", file=sys.stderr)

        seed = f"{self.seed}:{self.epoch}:{source.name(unit)}"
        yield from shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, seed=seed)(trainable())

    def batch(self, rows, where):
        encoded = {name: image for name, image, _ in rows}
        open_image = partial(image_from_bytes, encoded)
        batch, names = caption_batch([(name, caption) for name, _, caption in rows],
                                     partial(decoded_pixels, self.processor, open_image))
        return {"where": where} if batch is None else {**batch, "keys": names, "where": where}


def train_batches(data, processor, cfg, epoch, rank, world, progress=None):
    """StreamBatches of this process for `epoch` of streamed data, each slot from its `progress` on."""
    return StreamBatches(data.stream, processor, cfg.batch_size, cfg.seed, epoch, rank, world,
                         max(1, cfg.num_workers), progress)


def make_loader(dataset, tokenizer, cfg, epoch=None, start=0, rank=0, world=1):
    """Training batches in the seeded order of `epoch` from batch `start` on; validation (epoch None) in order.
    Each of `world` processes gets its own share. A StreamBatches dataset (streamed data) batches itself."""
    collate = partial(collate_batch, tokenizer=tokenizer, max_tokens=cfg.max_caption_tokens)
    if isinstance(dataset, StreamBatches):
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, collate_fn=collate,
                                           pin_memory=torch.cuda.is_available(), worker_init_fn=drop_inherited_lock)
    if epoch is None:
        everything = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), cfg.batch_size, False)
        sampler = list(everything)[rank::world]
    else:
        sampler = EpochBatchSampler(dataset.groups, cfg.batch_size, cfg.seed, epoch, start, rank, world)
    # Its own generator: the loader's worker seed is drawn from it, not from the global RNG that dropout uses,
    # so a resumed run's dropout masks continue exactly where the saved RNG state left them.
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
        collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=drop_inherited_lock)


def drop_inherited_lock(worker_id=None):
    """In a DataLoader worker: close the copy of OUTPUT_DIR's lock file it inherited from the training process.
    An flock lasts while any copy is open, so a worker left alive by an interrupted run (a notebook keeps the
    traceback and with it the loader) would otherwise refuse the --resume run in the same kernel."""
    fds = Path("/proc/self/fd")
    for fd in fds.iterdir() if fds.is_dir() else []:
        with contextlib.suppress(OSError):
            if os.readlink(fd).endswith(f"/{LOCK_FILE}"):
                os.close(int(fd.name))


def sample_set(captions, names, open_image, processor, count):
    """The fixed validation images captioned at every sample round (the first `count` of `names` that decode),
    with their first reference caption. One that passed the up-front check but does not decode is left out
    by name."""
    first = captions.drop_duplicates("image_name").set_index("image_name")["caption"]
    chosen, images = [], []
    for name in names:
        if len(chosen) == count:
            break
        try:
            images.append(open_image(name))
            chosen.append(name)
        except IMAGE_ERRORS as exc:
            print(f"Left out sample image {name}: not a decodable image ({type(exc).__name__}: {exc})")
    if not chosen:
        return None
    return {"names": chosen, "references": [first[n] for n in chosen], "pixel_values": preprocess(processor, images)}


# --- Model ----------------------------------------------------------------------------------------
class Img2GPT(nn.Module):
    """ViT patch tokens -> Linear -> GPT-2 input embeddings, prepended to the caption as a prefix.
    With pool_grid G > 0 the patch grid is average-pooled to G x G first (1 + G*G prefix tokens).
    `quantized`: the base models were loaded in 4-bit (their LoRAs are then never merged)."""

    def __init__(self, vision, lm, projection, pool_grid=0, quantized=False):
        super().__init__()
        self.vision, self.lm, self.projection, self.pool_grid = vision, lm, projection, pool_grid
        self.quantized = quantized

    def prefix(self, pixel_values):
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, vit_hidden)
        if self.pool_grid:
            hidden = pool_patches(hidden, self.pool_grid)  # (B, 1 + G*G, vit_hidden)
        prefix = self.projection(hidden.to(next(self.projection.parameters()).dtype))  # (B, P, lm_hidden)
        return prefix.to(self.lm.get_input_embeddings().weight.dtype)

    def forward(self, pixel_values, input_ids, attention_mask, labels=None, image_index=None):
        """The LM's output for captions of images. image_index None: one image per caption, each read as
        [prefix, caption] (the plain computation). image_index given (which of the images each caption
        describes): shared_prefix_loss, the same loss with each image encoded and its prefix read once."""
        if image_index is not None:
            return shared_prefix_loss(self, self.prefix(pixel_values), input_ids, attention_mask, labels,
                                      image_index)
        prefix = self.prefix(pixel_values)
        batch, length = prefix.shape[:2]
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(batch, length), attention_mask], dim=1)
        if labels is not None:  # GPT2LMHeadModel shifts labels itself; prefix positions are never targets
            labels = torch.cat([labels.new_full((batch, length), -100), labels], dim=1)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels)


def causal_lm(lm):
    """The transformers causal LM itself (GPT2LMHeadModel, LlamaForCausalLM, ...), inside peft's wrapper or not."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def shared_prefix_layout(lengths, image_index, images, prefix_length):
    """Where each caption token goes when every image is one sequence [prefix, caption 1, caption 2, ...]:
    (rows, columns) of each real token in the packed (images, length) sequences, in the captions' row order;
    position_ids (images, length) that restart after the prefix for each caption, so every caption sees the
    positions it would alone; segment (images, length): -1 on the prefix, the caption's number on its tokens,
    -2 on padding; and the column each token is predicted from (the one before it, the prefix's last for a
    caption's first token)."""
    P = prefix_length
    ends = [P] * images
    rows, columns, sources, positions = [], [], [], []
    for caption, (length, image) in enumerate(zip(lengths, image_index)):
        start = ends[image]
        rows += [image] * length
        columns += range(start, start + length)
        sources += [P - 1, *range(start, start + length - 1)]
        positions += range(P, P + length)
        ends[image] += length
    total = max(ends)
    position_ids = torch.zeros(images, total, dtype=torch.long)
    position_ids[:, :P] = torch.arange(P)
    segment = torch.full((images, total), -2, dtype=torch.long)
    segment[:, :P] = -1
    rows, columns = torch.tensor(rows, dtype=torch.long), torch.tensor(columns, dtype=torch.long)
    position_ids[rows, columns] = torch.tensor(positions, dtype=torch.long)
    caption_of_token = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    segment[rows, columns] = caption_of_token
    return rows, columns, torch.tensor(sources, dtype=torch.long), position_ids, segment


def shared_prefix_loss(model, prefix, input_ids, attention_mask, labels, image_index):
    """Mean token cross-entropy of the captions, each image's prefix computed once and read once by the LM:
    the captions of an image follow its prefix in one sequence, and a block mask lets each token see the
    prefix and the earlier tokens of its own caption only, at the positions it would have alone. So the loss
    and gradients are those of one [prefix, caption] row per caption (tests/test_shared_prefix.py), in eval
    and train mode, with gradient checkpointing too: nothing depends on a key/value cache, which transformers
    drops under checkpointing in training."""
    device, (images, P, width) = prefix.device, prefix.shape
    lengths = attention_mask.sum(dim=1).tolist()
    rows, columns, sources, position_ids, segment = (
        t.to(device) for t in shared_prefix_layout(lengths, image_index.tolist(), images, P))
    valid = attention_mask.bool()
    tokens = model.lm.get_input_embeddings()(input_ids)[valid]  # (caption tokens, width), in row order
    padding = prefix.new_zeros(images, position_ids.shape[1] - P, width)
    embeds = torch.cat([prefix, padding], dim=1).index_put((rows, columns), tokens.to(prefix.dtype))
    # Query q may read key k when k <= q and k is in the prefix or in q's own caption. Padding reads the prefix
    # only, so no row of the mask is empty.
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones(segment.shape[1], segment.shape[1], dtype=torch.bool, device=device).tril()
    allowed = causal & ((key == -1) | (key == query))
    if getattr(model.lm.config, "_attn_implementation", "sdpa") == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=device).masked_fill(
            ~allowed, torch.finfo(embeds.dtype).min)
    else:
        mask = allowed
    core = causal_lm(model.lm)
    hidden = core.base_model(inputs_embeds=embeds, attention_mask=mask.unsqueeze(1), position_ids=position_ids,
                             use_cache=False).last_hidden_state
    logits = core.get_output_embeddings()(hidden[rows, sources])  # only where a caption token is predicted
    targets = (labels if labels is not None else input_ids)[valid]
    loss = nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100)
    return types.SimpleNamespace(loss=loss, logits=logits)


def pool_patches(hidden, grid):
    """CLS plus the square patch grid average-pooled to grid x grid: fewer tokens for GPT-2 to read."""
    cls, patches = hidden[:, :1], hidden[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1] or grid > side:
        raise Img2GPTError(f"PREFIX_POOL_GRID {grid} needs a square patch grid of at least {grid} x {grid}; "
                           f"this encoder gives {patches.shape[1]} patch tokens")
    batch, _, width = patches.shape
    pooled = nn.functional.adaptive_avg_pool2d(patches.transpose(1, 2).reshape(batch, width, side, side), grid)
    return torch.cat([cls, pooled.flatten(2).transpose(1, 2)], dim=1)


def find_lora_targets(model, names=LORA_TARGET_NAMES):
    """Leaf names of the attention projections present in the loaded model (Linear, Conv1D or 4-bit)."""
    from transformers.pytorch_utils import Conv1D

    found = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in names and isinstance(module, (nn.Linear, Conv1D))}
    if not found:
        raise Img2GPTError(f"{type(model).__name__} has no attention projection named one of {names}: "
                           "LoRA cannot be applied to it")
    return sorted(found)


def load_base_models(vit_name, lm_name, device, four_bit, compute_dtype):
    """(vision, lm, tokenizer, processor) from the hub or local folders, in 4-bit when `four_bit`. The vision
    model is any transformers encoder with last_hidden_state (the vision tower of a CLIP or SigLIP checkpoint is
    used); the LM is any AutoModelForCausalLM."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(lm_name)
        processor = AutoImageProcessor.from_pretrained(vit_name)
        vision_config = AutoConfig.from_pretrained(vit_name)
    except (OSError, ValueError) as exc:
        raise Img2GPTError(f"could not load base model files ({exc})") from None
    if tokenizer.pad_token is None:  # GPT-2 has none; labels come from the attention mask, so EOS is safe
        tokenizer.pad_token = tokenizer.eos_token
    # A CLIP or SigLIP checkpoint holds a text tower too: load only its vision model class.
    vision_class = AutoModel._model_mapping[type(getattr(vision_config, "vision_config", vision_config))]
    vision_kwargs, lm_kwargs = {}, {}
    # ViT's pooler is never used: without it nothing unused gets quantized or trained.
    if "add_pooling_layer" in inspect.signature(vision_class).parameters:
        vision_kwargs["add_pooling_layer"] = False
    for kwargs in (vision_kwargs, lm_kwargs):
        if four_bit:
            kwargs.update(quantization_config=quantization_config(compute_dtype), device_map=device_map_for(device))
        else:
            kwargs["dtype"] = torch.float32
    vision = vision_class.from_pretrained(vit_name, **vision_kwargs)
    lm = AutoModelForCausalLM.from_pretrained(lm_name, **lm_kwargs)
    for model in (vision, lm):
        if four_bit:
            from peft import prepare_model_for_kbit_training

            # use_reentrant=False: the reentrant fallback leaves ViT LoRA grads None (inputs need no grad).
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.requires_grad_(False).to(device)
    return vision, lm, tokenizer, processor


def allow_cpu_weight_packing(model, allowed):
    """bitsandbytes on a CPU with AVX512-BF16 repacks each Linear4bit weight for a faster bf16 kernel at the
    layer's first forward in eval mode, for good; that kernel has no backward, so a training run broke at its
    first batch after a validation or sample round. Packing is allowed for inference only (where it speeds
    4-bit captioning up: docs/speed.md "4-bit on a CPU") and only where the kernel takes the shape: in_features
    a whole number of quantization blocks and out_features of 32 rows, which bitsandbytes assumes unchecked."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            if not hasattr(module, "cpu_kernel_available"):
                module.cpu_kernel_available = module.support_avx512bf16_for_cpu  # what bitsandbytes detected
            fits = module.in_features % module.weight.quant_state.blocksize == 0 and module.out_features % 32 == 0
            module.support_avx512bf16_for_cpu = allowed and fits and module.cpu_kernel_available


def apply_lora(model, targets, r, alpha, dropout):
    """A fresh LoraConfig per model (peft edits the one it is given). Conv1D (GPT-2 in full precision) stores
    its weight transposed: fan_in_fan_out; in 4-bit it is already a Linear4bit. Adapters load either way."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    conv1d = any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        fan_in_fan_out=conv1d, bias="none")
    return get_peft_model(model, config)


def model_config_from(cfg):
    """The part of the run config that rebuilds the model; stored in every checkpoint."""
    return {"vit_model": cfg.vit_model_name, "gpt2_model": cfg.gpt2_model_name, "lora_r": cfg.lora_r,
            "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "max_caption_tokens": cfg.max_caption_tokens, "prefix_pool_grid": cfg.prefix_pool_grid,
            "projector": cfg.projector}


def model_family(name):
    """The model_type in a model's config ("vit", "gpt2", "llama", ...), read without loading weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise Img2GPTError(f"could not load the config of '{name}' ({exc})") from None
    return config.model_type


def check_families(config):
    """A checkpoint records the model families it was trained on; base models of other families are refused
    before anything is loaded (same widths would otherwise load silently into the wrong model)."""
    for role, name_key, family_key in (("vision encoder", "vit_model", "vision_family"),
                                       ("language model", "gpt2_model", "lm_family")):
        family = model_family(config[name_key])
        if config.setdefault(family_key, family) != family:
            raise Img2GPTError(f"the checkpoint was trained on a '{config[family_key]}' {role} but "
                               f"'{config[name_key]}' is a '{family}': give a {config[family_key]} model")


def make_projector(kind, width_in, width_out):
    """The bridge from vision width to LM width: one Linear (the original design) or, as LLaVA-1.5 found
    better, Linear-GELU-Linear."""
    if kind == "linear":
        return nn.Linear(width_in, width_out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width_in, width_out), nn.GELU(), nn.Linear(width_out, width_out))
    raise Img2GPTError(f"unknown PROJECTOR '{kind}': use one of {', '.join(PROJECTORS)}")


def prefix_length(vision_name, pool_grid):
    """How many prefix tokens the vision encoder gives one image, found without loading weights: the encoder
    is built on the meta device (shapes only) and fed an image the size its processor makes."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    config = AutoConfig.from_pretrained(vision_name)
    pixels = preprocess(AutoImageProcessor.from_pretrained(vision_name), [Image.new("RGB", (64, 64))])
    config = getattr(config, "vision_config", config)  # a CLIP or SigLIP checkpoint: its vision tower
    with torch.device("meta"):
        hidden = AutoModel.from_config(config)(pixel_values=pixels.to("meta")).last_hidden_state
    return pool_patches(hidden, pool_grid).shape[1] if pool_grid else hidden.shape[1]


def check_context(model_config, max_caption_tokens=None, max_new_tokens=None, aliases=None):
    """A caption read in training (prefix + MAX_CAPTION_TOKENS) and one written (prefix + MAX_NEW_TOKENS) must
    fit the language model's positions (GPT-2's n_positions, else max_position_embeddings): past them GPT-2
    fails with an IndexError in the middle of a run. One error line naming the flag and its limit; returns the
    longest MAX_NEW_TOKENS that fits (None when the LM states no limit). Model files that cannot be read yet
    are left to the model's loading to report, as it always has."""
    from transformers import AutoConfig

    try:
        lm_config = AutoConfig.from_pretrained(model_config["gpt2_model"])
        context = getattr(lm_config, "n_positions", None) or getattr(lm_config, "max_position_embeddings", None)
        prefix = context and prefix_length(model_config["vit_model"], model_config.get("prefix_pool_grid", 0))
    except (OSError, ValueError):
        return None
    if not context:
        return None
    # Generation feeds back every new token but the last, so it needs one position fewer than it writes.
    for name, value, room in (("max_caption_tokens", max_caption_tokens, context - prefix),
                              ("max_new_tokens", max_new_tokens, context - prefix + 1)):
        if value is not None and value > room:
            raise Img2GPTError(
                f"{flag_of(name, aliases or {})} {value} does not fit: the language model reads {context} positions "
                f"and the image prefix takes {prefix}, so give at most {room}"
                + ("" if room >= 2 else " (or shorten the prefix with --prefix-pool-grid)"))
    return context - prefix + 1


def build_model(model_config, device, announce=lambda step: None, quantize="auto", wrap_lora=True):
    """(Img2GPT, tokenizer, processor, model_config with the found LoRA targets and projection sizes), in 4-bit
    or full precision as QUANTIZE `quantize` decides on `device`. `announce(step)` is called before each stage
    (inference prints its Step lines through it). wrap_lora=False leaves the base models unwrapped, for
    fold_trained_weights to add the saved adapters into."""
    four_bit, compute_dtype = choose_precision(device, quantize)
    if four_bit:
        require_4bit_support(device)
    config = dict(model_config)
    config = {**MODEL_CONFIG_DEFAULTS, **config}
    make_projector(config["projector"], 1, 1)  # an unknown kind fails before minutes of loading
    check_families(config)
    announce(1)
    vision, lm, tokenizer, processor = load_base_models(
        config["vit_model"], config["gpt2_model"], device, four_bit, compute_dtype)
    announce(2)
    config.setdefault("vision_lora_targets", find_lora_targets(vision))
    config.setdefault("lm_lora_targets", find_lora_targets(lm))
    if wrap_lora:
        lora = (config["lora_r"], config["lora_alpha"], config["lora_dropout"])
        vision = apply_lora(vision, config["vision_lora_targets"], *lora)
        lm = apply_lora(lm, config["lm_lora_targets"], *lora)
    announce(3)
    # Sizes come from the loaded models, so another encoder or LM of other width fits without edits.
    sizes = {"projection_in": vision.config.hidden_size, "projection_out": lm.get_input_embeddings().embedding_dim}
    for key, size in sizes.items():
        if config.setdefault(key, size) != size:
            raise Img2GPTError(f"checkpoint {key} is {config[key]} but the base models give {size}: "
                               "use the base models it was trained with (--vit-model / --gpt2-model)")
    projection = make_projector(config["projector"], *sizes.values()).to(device)  # fp32: GradScaler needs it
    model = Img2GPT(vision, lm, projection, config["prefix_pool_grid"], quantized=four_bit)
    if four_bit:
        allow_cpu_weight_packing(model, False)  # a model that may train; rebuild_from_checkpoint allows it
    return model, tokenizer, processor, config


def merge_lora(model):
    """Fold both LoRAs into their base weights for full-precision inference: the same outputs, without the
    adapters' extra matmuls on every layer and token. Never on a 4-bit model: merging into 4-bit weights
    would round the adapters away, so it keeps them."""
    if model.quantized:
        raise ValueError("merge_lora on a 4-bit model would round its LoRA weights away")
    model.vision = model.vision.merge_and_unload()
    model.lm = model.lm.merge_and_unload()
    return model


# --- Captioning -----------------------------------------------------------------------------------
def decoding_settings(cfg):
    """The generate() settings of a run, the same for sample captions, evaluation and inference."""
    return {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams,
            "no_repeat_ngram_size": cfg.no_repeat_ngram_size, "repetition_penalty": cfg.repetition_penalty}


@torch.inference_mode()
def generate_captions(model, tokenizer, pixel_values, max_new_tokens, num_beams=1, no_repeat_ngram_size=0,
                      repetition_penalty=1.0, min_new_tokens=0):
    """Captions for a batch of images: prefix in, new tokens out (KV cache, stops at EOS). With beams, each
    image's prefix is read once (prefilled_cache), not once per beam."""
    was_training = model.training
    model.eval()
    prefix = model.prefix(pixel_values)
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    cache = prefilled_cache(model.lm, prefix, mask, num_beams) if num_beams > 1 and prefix.shape[1] > 1 else {}
    tokens = model.lm.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=max_new_tokens,
                               min_new_tokens=min_new_tokens, num_beams=num_beams, do_sample=False,
                               no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cache)
    model.train(was_training)
    return [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def prefilled_cache(lm, prefix, mask, beams):
    """generate()'s cache keyword with every prefix token but the last already read, once per image, then
    copied for each beam: generate() repeats its inputs per beam and would read the whole prefix `beams`
    times; given a cache it reads only what the cache lacks (the last prefix token, per beam). The same
    captions, tested."""
    out = lm(inputs_embeds=prefix[:, :-1], attention_mask=mask[:, :-1], use_cache=True, logits_to_keep=1)
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # 5.24 renamed past_key_values to cache
    cache.batch_repeat_interleave(beams)  # generate() orders beams image by image
    return {"cache" if "cache" in inspect.signature(causal_lm(lm).forward).parameters else "past_key_values": cache}


def prefetch(function, items, ahead, workers=4):
    """(item, function(item)) in order, computed up to `ahead` items in advance in threads. A user-caused
    failure (Img2GPTError or a bad image) comes back in place of the result instead of stopping the rest."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def guarded(item):
        try:
            return function(item)
        except (Img2GPTError, *IMAGE_ERRORS) as error:
            return error

    pool, pending = ThreadPoolExecutor(max_workers=workers), deque()
    try:
        for item in items:
            pending.append((item, pool.submit(guarded, item)))
            if len(pending) > ahead:
                item, future = pending.popleft()
                yield item, future.result()
        while pending:
            item, future = pending.popleft()
            yield item, future.result()
    finally:  # on Ctrl+C, or when the caller stops early: what is queued is dropped, not waited for
        pool.shutdown(wait=False, cancel_futures=True)


def caption_sources(model, tokenizer, processor, sources, open_image, batch_size, decoding, on_batch=None):
    """(source, caption or error) for every source, in order. Images are opened and preprocessed in threads
    up to two batches ahead while the model captions the current batch. on_batch(sources) runs before each
    batch is generated."""
    device = next(model.projection.parameters()).device

    def caption(window):
        good = [(source, pixels) for source, pixels in window if not isinstance(pixels, Exception)]
        if on_batch:
            on_batch([source for source, _ in good])
        pixels = torch.stack([p for _, p in good]).to(device) if good else None
        captions = iter(generate_captions(model, tokenizer, pixels, **decoding) if good else [])
        return [(source, result if isinstance(result, Exception) else next(captions)) for source, result in window]

    def load(source):
        return preprocess(processor, [open_image(source)])[0]

    window = []
    for item in prefetch(load, sources, ahead=2 * batch_size):
        window.append(item)
        if len(window) == batch_size:
            yield from caption(window)
            window = []
    if window:
        yield from caption(window)


# --- Checkpoints ----------------------------------------------------------------------------------
def trained_weights(model):
    """Only what training changed: both LoRAs and the projection (no frozen or 4-bit base weights)."""
    from peft import get_peft_model_state_dict

    def plain(state):
        return {key: value.detach().to("cpu", torch.float32).clone() for key, value in state.items()}

    return {"vision_lora": plain(get_peft_model_state_dict(model.vision)),
            "lm_lora": plain(get_peft_model_state_dict(model.lm)),
            "projection": plain(model.projection.state_dict())}


def write_atomically(path, write):
    """write(temporary) into a temporary file of its own in the same folder (PATH.<pid>.<random>.tmp, so two
    writers never share one), flushed to disk, then renamed over PATH: a kill during the write leaves the
    previous file whole, never a half-written one under the real name. A failed write (a full disk) removes its
    temporary file and is an Img2GPTError; the previous file stays as it was."""
    import uuid

    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename makes it the file
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise Img2GPTError(f"could not write '{path}' ({exc.strerror or exc}): free some disk space or choose "
                           "another --output-dir; the previous file is unchanged") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def non_finite_parts(weights):
    """The parts of a checkpoint's weights ('vision_lora', 'lm_lora', 'projection') holding NaN or inf."""
    return [part for part, tensors in weights.items()
            if isinstance(tensors, dict) and any(torch.is_tensor(t) and t.is_floating_point()
                                                 and not torch.isfinite(t).all() for t in tensors.values())]


def save_checkpoint(path, model, model_config, extra):
    """Plain types and tensors only, so torch.load(path, weights_only=True) opens it; written atomically.
    Weights holding NaN or inf are never written: the run has diverged, and that is an Img2GPTError."""
    weights = trained_weights(model)
    broken = non_finite_parts(weights)  # one scan of every tensor, not two
    if broken:
        raise Img2GPTError(DIVERGED.format(where=f": the {', '.join(broken)} weights hold NaN or inf, so "
                                                 f"'{Path(path).name}' was not written"))
    state = {"format": CHECKPOINT_FORMAT, "config": model_config, "versions": library_versions(),
             "weights": weights, "trained_in_4bit": model.quantized, **extra}
    write_atomically(path, lambda file: torch.save(state, file))


def load_checkpoint(path):
    """The checkpoint dict, opened with weights_only=True so a pickle payload in a downloaded file cannot run."""
    import pickle

    path = Path(path)
    if not path.exists():
        raise Img2GPTError(f"checkpoint '{path}' not found: give the path of an img2gpt_epoch_N.pth file")
    if path.is_dir():
        raise Img2GPTError(f"checkpoint '{path}' is a folder: give the path of an img2gpt_epoch_N.pth file in it")
    if not path.is_file():  # reading a named pipe or a device would wait forever
        raise Img2GPTError(f"checkpoint '{path}' is not a regular file (a named pipe or a device): give an .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise Img2GPTError(f"checkpoint '{path}' cannot be read (permission denied): check its permissions") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... for truncated or foreign files
        if isinstance(exc, pickle.UnpicklingError) and "unsupported global" in str(exc).lower():
            # it names a class or function to call, which weights_only refused to do
            raise Img2GPTError(f"'{path}' holds pickled objects other than tensors and plain types, which are "
                               "never loaded (weights_only=True): use a checkpoint written by training_script.py"
                               ) from None
        raise Img2GPTError(f"'{path}' is not a readable checkpoint, maybe truncated ({type(exc).__name__}): "
                           "use a complete img2gpt_epoch_N.pth") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        kind = "a plain state_dict of another model" if isinstance(state, dict) else type(state).__name__
        raise Img2GPTError(f"'{path}' is not an Img2GPT checkpoint (it is {kind}): use one written by "
                           "training_script.py")
    missing = [key for key in MODEL_CONFIG_KEYS if key not in state.get("config", {})]
    if missing or not isinstance(state.get("weights"), dict):
        raise Img2GPTError(f"Img2GPT checkpoint '{path}' is incomplete (no {missing or ['weights']})")
    for key, kind in MODEL_CONFIG_TYPES.items():
        value = state["config"].get(key, kind() if isinstance(kind, type) else 0)
        if isinstance(value, bool) or not isinstance(value, kind):
            wanted = {str: "a string", int: "a whole number", list: "a list"}.get(kind, "a number")
            raise Img2GPTError(f"Img2GPT checkpoint '{path}' has config {key} = {value!r} where {wanted} belongs: "
                               "it was edited; use one written by training_script.py")
    for part, tensors in state["weights"].items():
        if not isinstance(tensors, dict) or not all(torch.is_tensor(t) for t in tensors.values()):
            raise Img2GPTError(f"Img2GPT checkpoint '{path}' has weights '{part}' that are not tensors: it was "
                               "edited; use one written by training_script.py")
    broken = non_finite_parts(state["weights"])
    if broken:
        raise Img2GPTError(f"'{path}' holds NaN or inf weights ({', '.join(broken)}): it comes from a run that "
                           "diverged; use an earlier checkpoint")
    return state


def require_fit(part, expected, given):
    """Refuse a checkpoint part that misses a key of `expected` ({key: shape}) or holds it in another shape."""
    missing = [key for key in expected if key not in given]
    clash = [key for key in expected if key in given and tuple(given[key].shape) != tuple(expected[key])]
    if missing or clash:
        raise Img2GPTError(f"checkpoint '{part}' does not fit the model: missing {missing[:3]}, "
                           f"wrong shape {clash[:3]}")


def load_trained_weights(model, weights):
    """Restore both LoRAs and the projection, refusing a checkpoint that misses or mis-sizes any key."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = {"vision_lora": get_peft_model_state_dict(model.vision),
                "lm_lora": get_peft_model_state_dict(model.lm), "projection": model.projection.state_dict()}
    for part, tensors in expected.items():
        require_fit(part, {key: tensor.shape for key, tensor in tensors.items()}, weights.get(part, {}))
    set_peft_model_state_dict(model.vision, weights["vision_lora"])
    set_peft_model_state_dict(model.lm, weights["lm_lora"])
    model.projection.load_state_dict(weights["projection"])


def fold_trained_weights(model, weights, config):
    """Full-precision inference without peft: each saved LoRA update, scaling * B @ A, is added into the base
    weight it adapts, computed as peft's merge computes it (the same weights to the bit, tests/test_model.py),
    and the projection loaded. It skips importing peft, wrapping both models and unwrapping them again.
    GPT-2's Conv1D stores its weight transposed (peft's fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    r, scaling = config["lora_r"], config["lora_alpha"] / config["lora_r"]
    for part, base, targets in (("vision_lora", model.vision, config["vision_lora_targets"]),
                                ("lm_lora", model.lm, config["lm_lora_targets"])):
        adapted = {name: module for name, module in base.named_modules() if name.rsplit(".", 1)[-1] in targets}
        expected = {}
        for name, module in adapted.items():
            out_features, in_features = module.weight.shape[::-1] if isinstance(module, Conv1D) else module.weight.shape
            expected[f"base_model.model.{name}.lora_A.weight"] = (r, in_features)
            expected[f"base_model.model.{name}.lora_B.weight"] = (out_features, r)
        given = weights.get(part, {})
        require_fit(part, expected, given)
        with torch.no_grad():
            for name, module in adapted.items():
                prefix = f"base_model.model.{name}"
                delta = given[f"{prefix}.lora_B.weight"] @ given[f"{prefix}.lora_A.weight"]
                module.weight += (delta.T if isinstance(module, Conv1D) else delta) * scaling
    require_fit("projection", {key: t.shape for key, t in model.projection.state_dict().items()},
                weights.get("projection", {}))
    model.projection.load_state_dict(weights["projection"])


def checkpoint_config(state, vit_model=None, gpt2_model=None):
    """A checkpoint's model config, with vit_model / gpt2_model (other copies of its base models) in place of
    the names it holds when given."""
    return {**state["config"], "vit_model": vit_model or state["config"]["vit_model"],
            "gpt2_model": gpt2_model or state["config"]["gpt2_model"]}


def rebuild_from_checkpoint(state, device, vit_model=None, gpt2_model=None, announce=lambda step: None,
                            quantize="auto"):
    """(model, tokenizer, processor) of a loaded checkpoint, ready to caption: rebuilt from its own config
    (vit_model / gpt2_model replace the base model names in it when given) in the precision QUANTIZE `quantize`
    gives on `device`, whatever precision it was trained in (the LoRA weights have the same names and shapes
    either way), trained weights loaded: in 4-bit beside the weights, in full precision folded into them
    (fold_trained_weights). announce(1..4) is called before each stage."""
    config = checkpoint_config(state, vit_model, gpt2_model)
    four_bit, _ = choose_precision(device, quantize)
    model, tokenizer, processor, config = build_model(config, device, announce, quantize, wrap_lora=four_bit)
    announce(4)
    if model.quantized:  # adapters kept beside the 4-bit weights: merging would round them away
        load_trained_weights(model, state["weights"])
        allow_cpu_weight_packing(model, True)  # captioning only: the faster CPU kernel is safe
    else:
        fold_trained_weights(model, state["weights"], config)
    return model.eval(), tokenizer, processor


# --- Evaluation: test-split scores and the gallery ------------------------------------------------
# What the Stanford PTB tokenizer makes of brackets (-lowerCase leaves them in the lower case that the COCO
# scorers' punctuation list, written in upper case, does not remove), abbreviations that keep their period, and
# one token of PTB's: a clitic, 'n', an initialism (u.s.), a word with inner - ' / : . , & (t-shirt, 1,000,
# and/or), a repeated ! or ?, an ellipsis, a double dash, or any other single character.
PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}

PTB_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "co", "mt", "ave", "no", "prof",
                     "gen", "lt", "sgt", "capt"}

PTB_TOKEN = re.compile(r"'n'|n't\b|'(?:s|re|ve|ll|d|m)\b|(?:[a-z]\.){2,}|\w+(?:[-'/:.,&]\w+)*\.?|([!?])\1+|"
                       r"\.\.\.|--|\S")


def ptb_like_tokenize(text):
    """A caption as pycocoevalcap's PTB tokenizer (Java) leaves it, in Python: lowercase, hyphenated words
    kept whole (t-shirt), clitics split (can't -> ca n't, dog's -> dog 's), the scorers' punctuation dropped."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    text = text.lower().replace("\n", " ")
    text = re.sub(r"\b(can)(not)\b", r"\1 \2", text)
    text = re.sub(r"\b(gon|wan|got)(na|ta)\b", r"\1 \2", text)
    text = re.sub(r"(\w)(n't|'(?:s|re|ve|ll|d|m))\b", r"\1 \2", text)
    tokens = []
    for match in PTB_TOKEN.finditer(text):
        token = match.group(0)
        if (token.endswith(".") and token[0].isalnum() and token[:-1] not in PTB_ABBREVIATIONS
                and not re.fullmatch(r"(?:[a-z]\.)+", token)):  # a sentence's full stop, not an abbreviation's
            tokens += [token[:-1], "."]
        else:
            tokens.append(PTB_BRACKETS.get(token, token))
    return " ".join(token for token in tokens if token not in PUNCTUATIONS and token != '"')


def tokenize_for_scoring(captions):
    """({key: [tokenized captions]}, which tokenizer) for {key: [captions]}: pycocoevalcap's PTB tokenizer when
    Java runs, so scores are exactly the published pipeline's; else ptb_like_tokenize."""
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        try:
            return PTBTokenizer().tokenize({key: [{"caption": c} for c in texts] for key, texts in captions.items()}
                                           ), "PTB (Java, pycocoevalcap)"
        except (OSError, subprocess.SubprocessError):  # e.g. its package folder is read-only: it writes there
            pass
    return {key: [ptb_like_tokenize(c) for c in texts] for key, texts in captions.items()}, "PTB-like (Python)"


def score_captions(references, predictions, per_image=None):
    """({metric: score}, notes) with pycocoevalcap's scorers. references: {image: [captions]},
    predictions: {image: caption}. BLEU, ROUGE-L and CIDEr are pure Python; METEOR runs on Java and SPICE
    also needs Stanford CoreNLP, so each is left out with a note where it cannot run. A dict given as
    per_image receives {image: {"CIDEr", "Bleu_4"}}, each image's own scores (CIDEr's document frequencies
    are the whole set's, as in the corpus score)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, tokenizer = tokenize_for_scoring(references)
    res, _ = tokenize_for_scoring({image: [predictions[image]] for image in references})
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n}": float(value) for n, value in enumerate(bleu, 1)}
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    cider, cider_each = Cider().compute_score(gts, res)
    scores["CIDEr"] = float(cider)
    if per_image is not None:  # the scorers list images in the order of gts
        per_image.update({image: {"CIDEr": float(c), "Bleu_4": float(b)}
                          for image, c, b in zip(gts, cider_each, bleu_each[3])})
    notes = [f"tokenizer: {tokenizer}"]
    if not shutil.which("java"):
        return scores, notes + ["METEOR and SPICE left out: they need Java (install a JRE to get them)"]
    scores["METEOR"] = meteor_score(gts, res)
    import pycocoevalcap.spice as spice

    if any((Path(spice.__file__).parent / "lib").glob("stanford-corenlp-*-models.jar")):
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    else:  # its first run downloads Stanford CoreNLP (about 1 GB): not something to start unasked
        notes.append("SPICE left out: it needs Stanford CoreNLP; run pycocoevalcap.spice.get_stanford_models "
                     "once online")
    return scores, notes


def checkpoint_identity(path, state):
    """What an evaluation JSON records of the checkpoint it scored: its path, a SHA-256 of its bytes, and the
    training run it comes from (run_id; None for checkpoints from before runs had one)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return {"checkpoint_path": str(Path(path).resolve()), "checkpoint_sha256": digest.hexdigest(),
            "run": state.get("run_id") or state.get("training_state", {}).get("run_id")}


def evaluation_path(output_dir, checkpoint_name, identity, say=print):
    """OUTPUT_DIR/eval_<checkpoint>.json, unless that file holds the result of another checkpoint file (another
    run's img2gpt_epoch_1.pth, say): then eval_<checkpoint>_<first 8 of its SHA-256>.json, so no result is ever
    replaced by another checkpoint's. The same checkpoint scored again replaces its own result."""
    path = Path(output_dir) / f"eval_{checkpoint_name}.json"
    try:
        earlier = json.loads(path.read_bytes()).get("checkpoint_sha256") if path.exists() else None
    except (OSError, ValueError, AttributeError):  # unreadable or not ours: keep it too
        earlier = ""
    if path.exists() and earlier != identity["checkpoint_sha256"]:
        apart = path.with_name(f"eval_{checkpoint_name}_{identity['checkpoint_sha256'][:8]}.json")
        say(f"'{path}' holds the result of another checkpoint file: it is kept, and this one goes to '{apart}'")
        return apart
    return path


def meteor_score(gts, res):
    """pycocoevalcap's METEOR, its Java process ended however scoring ends. Its own cleanup (__del__) waits for
    a lock that compute_score keeps when it is interrupted: Ctrl+C during METEOR used to hang for good."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        for pipe in (meteor.meteor_p.stdin, meteor.meteor_p.stdout, meteor.meteor_p.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
        if meteor.lock.locked():
            meteor.lock.release()


GALLERY_THUMBNAIL = 256  # longest side of the images embedded in a gallery page, in pixels

# Near the top of every page Img2GPT writes: --html writes over no file without it.
GALLERY_MARK = '<meta name="generator" content="Img2GPT">'

# The card layout, shared by the pages and the web page's gallery tab.
GALLERY_STYLE = """
#cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 1em; }
.card { background: white; border: 1px solid #ddd; border-radius: 8px; padding: .7em; color: #222; }
.card img { display: block; max-width: 100%; max-height: 256px; margin: 0 auto .5em; }
.placeholder { height: 120px; display: flex; align-items: center; justify-content: center; background: #eee;
  color: #777; margin-bottom: .5em; }
.name { color: #666; font-size: .85em; word-break: break-all; } .caption { font-weight: 600; margin: .3em 0; }
.references { margin: .3em 0 0 1.1em; padding: 0; font-size: .9em; color: #444; }
.scores { font-size: .85em; color: #555; } .error { color: #b00; }
"""

GALLERY_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{mark}
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline';
 script-src 'unsafe-inline'">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }} td, th {{ border: 1px solid #ccc; padding: .3em .7em; }}
td.score {{ text-align: right; font-variant-numeric: tabular-nums; }}
#controls {{ margin: 1em 0; display: flex; gap: 1em; align-items: center; flex-wrap: wrap; }}
{style}
</style></head><body>
<h1>{title}</h1>
{summary}
<div id="controls">{sorting}<label>Filter <input id="filter" type="search" placeholder="words in a caption or name">
</label><span id="shown"></span></div>
<div id="cards">
{cards}
</div>
<script>
const cards = Array.from(document.querySelectorAll(".card"));
const holder = document.getElementById("cards"), shown = document.getElementById("shown");
function update() {{
  const order = document.getElementById("order"), query = document.getElementById("filter").value.toLowerCase();
  const sorted = cards.slice();
  if (order && order.value !== "page") {{
    const sign = order.value === "best" ? -1 : 1;
    sorted.sort((a, b) => sign * (Number(a.dataset.score) - Number(b.dataset.score)));
  }}
  let count = 0;
  for (const card of sorted) {{
    const visible = card.textContent.toLowerCase().includes(query);
    card.hidden = !visible; count += visible; holder.appendChild(card);
  }}
  shown.textContent = count + " of " + cards.length + " images";
}}
for (const id of ["order", "filter"]) {{
  const control = document.getElementById(id); if (control) control.addEventListener("input", update);
}}
update();
</script></body></html>
"""


def thumbnail_uri(open_image, source):
    """The image as a data: URI of a JPEG whose longest side is at most GALLERY_THUMBNAIL (a few kilobytes), so
    the page holds its images and opens anywhere; None when the image cannot be opened."""
    import base64

    try:
        image = open_image(source)
        image.thumbnail((GALLERY_THUMBNAIL, GALLERY_THUMBNAIL))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
    except (Img2GPTError, *IMAGE_ERRORS):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gallery_card(name, thumbnail, caption=None, references=(), scores=None, error=None):
    """One image's card: its thumbnail (or a placeholder), the generated caption, the references and its own
    scores. Every text is escaped: a caption '<script>' is shown, never run."""
    from html import escape

    picture = (f'<img src="{thumbnail}" alt="{escape(name)}">' if thumbnail
               else f'<div class="placeholder">no preview: {escape(name)}</div>')
    parts = [picture, f'<div class="name">{escape(name)}</div>']
    parts.append(f'<div class="caption error">{escape(str(error))}</div>' if error
                 else f'<div class="caption">{escape(caption or "")}</div>')
    if references:
        parts.append('<ul class="references">' + "".join(f"<li>{escape(r)}</li>" for r in references) + "</ul>")
    if scores:
        parts.append('<div class="scores">' + ", ".join(f"{escape(k)} {v:.3f}" for k, v in scores.items()) + "</div>")
    score = (scores or {}).get("CIDEr", 0.0)
    return f'<div class="card" data-score="{score:.6f}">' + "".join(parts) + "</div>"


def write_gallery(path, title, cards, scores=None):
    """A self-contained HTML page (no network: thumbnails embedded, styles and script inline, a content policy
    that forbids loading anything) of the given cards, with a scores table when `scores`; sorted worst first
    by each card's CIDEr when the cards have scores, with a control to sort best first, and a text filter.
    Written atomically."""
    from html import escape

    summary = ""
    if scores:
        summary = ("<table><tr><th>metric</th><th>score</th></tr>" + "".join(
            f'<tr><td>{escape(metric)}</td><td class="score">{value:.4f}</td></tr>' for metric, value in scores.items())
            + "</table>")
    sorting = ('<label>Sort <select id="order"><option value="worst">worst CIDEr first</option>'
               '<option value="best">best CIDEr first</option></select></label>') if scores else ""
    page = GALLERY_PAGE.format(title=escape(title), summary=summary, sorting=sorting, cards="\n".join(cards),
                               style=GALLERY_STYLE, mark=GALLERY_MARK)
    write_atomically(path, lambda file: file.write(page.encode("utf-8")))


def open_keeping_thumbnail(open_image, thumbnails, source):
    """open_image(source), keeping a thumbnail of it in thumbnails[source] for a gallery page: each image is read
    once, for its caption and its card."""
    image = open_image(source)
    thumbnails[source] = thumbnail_uri(lambda _: image.copy(), source)
    return image


def evaluation_gallery(path, report, thumbnails, failures):
    """eval_<checkpoint>.html beside its JSON: the scores, then a card per test image, worst CIDEr first (also
    without JavaScript)."""
    entries = sorted(report["captions"], key=lambda entry: entry["CIDEr"])
    cards = [gallery_card(e["image"], thumbnails.get(e["image"]), e["generated"], e["references"],
                          {"CIDEr": e["CIDEr"], "Bleu_4": e["Bleu_4"]}, failures.get(e["image"])) for e in entries]
    scores = {k: v for k, v in report.items() if isinstance(v, float)}
    write_gallery(path, f"Img2GPT evaluation: {report['checkpoint']} ({report['split']}, {len(entries)} test images)",
                  cards, scores)


def evaluate_on_test(model, tokenizer, processor, data, cfg, checkpoint_name, path, identity):
    """Caption every test image, score against all its references, print the scores as a table and write them
    to `path` (from evaluation_path) with the checkpoint's identity. Returns the scores."""
    from tqdm.auto import tqdm

    names = data.splits["test"]
    if not names:
        raise Img2GPTError("the test split is empty: nothing to evaluate on")
    references = data.captions[data.captions["image_name"].isin(set(names))].groupby("image_name")["caption"]
    references = {name: list(captions) for name, captions in references}
    decoding = decoding_settings(cfg)
    predictions, thumbnails = {}, {}
    opener = partial(open_keeping_thumbnail, data.open_image, thumbnails)
    results = caption_sources(model, tokenizer, processor, names, opener, cfg.batch_size, decoding)
    failures = {}
    for name, caption in tqdm(results, total=len(names), desc="captioning the test split"):
        predictions[name] = "" if isinstance(caption, Exception) else caption  # unreadable now: scores zero
        if isinstance(caption, Exception):
            failures[name] = str(caption)
    if failures:
        print(f"{len(failures)} test image(s) could not be read now and score as empty captions (e.g. "
              f"{next(iter(failures))})")
    per_image = {}
    scores, notes = score_captions(references, predictions, per_image)
    # Printed before writing: a disk that fills up now loses the file, never the numbers.
    print(f"\nTest split ({data.split_name}, {len(names)} images), {checkpoint_name}:\n\n| metric | score |\n|---|---:|")
    print("\n".join(f"| {metric} | {value:.4f} |" for metric, value in scores.items()))
    for note in notes:
        print(f"({note})")
    report = {**scores, "checkpoint": checkpoint_name, **identity, "split": data.split_name,
              "test_images": len(names), "decoding": decoding, "notes": notes,
              "captions": [{"image": n, "generated": predictions[n], "references": references[n], **per_image[n]}
                           for n in names]}
    if Path(path).name == f"eval_{checkpoint_name}.json":  # another evaluation may have written it meanwhile
        path = evaluation_path(Path(path).parent, checkpoint_name, identity, say=lambda _: None)
    write_atomically(path, lambda file: file.write(json.dumps(report, indent=2).encode("utf-8")))
    gallery = Path(path).with_suffix(".html")
    evaluation_gallery(gallery, report, thumbnails, failures)
    print(f"\nWrote {path} and {gallery.name} (open it in a browser: every test image beside its captions)")
    return scores


def evaluate_checkpoint(cfg):
    """--evaluate PATH: score a saved checkpoint on the test split without training. Where the result goes is
    checked and chosen before anything slow."""
    state = load_checkpoint(cfg.evaluate)
    device = resolve_device(cfg.device_choice)
    # --vit-model / --gpt2-model, when set, name other copies of the base models (e.g. local folders).
    vit_model = cfg.vit_model_name if cfg.vit_model_name != VIT_MODEL_NAME else None
    gpt2_model = cfg.gpt2_model_name if cfg.gpt2_model_name != GPT2_MODEL_NAME else None
    check_context(checkpoint_config(state, vit_model, gpt2_model), max_new_tokens=cfg.max_new_tokens,
                  aliases=FLAG_ALIASES)
    output_dir = require_writable_dir(cfg.output_dir)
    checkpoint_name = Path(cfg.evaluate).stem
    identity = checkpoint_identity(cfg.evaluate, state)
    path = evaluation_path(output_dir, checkpoint_name, identity)
    data = prepare_data(cfg)
    model, tokenizer, processor = rebuild_from_checkpoint(state, device, vit_model, gpt2_model, quantize=cfg.quantize)
    return evaluate_on_test(model, tokenizer, processor, data, cfg, checkpoint_name, path, identity)


# --- Output folder, log and plot ------------------------------------------------------------------
def require_writable_dir(output_dir, flag="--output-dir"):
    """OUTPUT_DIR (or the folder of what `flag` names) as a Path, created if needed and proven writable by
    writing a file: a read-only file system or folder is one error line before the work, not a traceback after
    it."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise Img2GPTError(f"{flag} '{folder}' is a file, not a folder: give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{LOCK_FILE}.{os.getpid()}.probe", "wb") as probe:
            probe.write(b"ok")
        os.remove(probe.name)
    except OSError as exc:
        raise Img2GPTError(f"cannot write to {flag} '{folder}' ({exc.strerror or exc}): choose a writable "
                           "folder") from None
    return folder


def afresh_without_last(folder, existing, main):
    """--resume auto in a folder without img2gpt_last.pth: a run that stopped before its first save (the first
    SAVE_INTERVAL batches of a Colab session) left only its log, so the same command starts afresh, keeping
    that log and appending to it. Returns the run files that still stand in the way: none, or refused here
    when epoch checkpoints are there (the new run would write over them)."""
    saved = [name for name in existing if name.endswith(".pth")]
    if saved:
        raise Img2GPTError(f"'{folder}' holds {', '.join(saved[:3])} but no img2gpt_last.pth to continue from: "
                           "start over with --overwrite (deletes them), or give another --output-dir")
    if main:
        kept = (f" (the run in '{folder}' stopped before its first save: its training_log.jsonl is kept and "
                "appended to)") if "training_log.jsonl" in existing else ""
        print(f"--resume auto: no img2gpt_last.pth, starting afresh{kept}")
    return []


def claim_output_dir(cfg, held, main=True):
    """(OUTPUT_DIR, checkpoint to resume from or None), checked before anything slow: the folder must be
    writable; a second training run is refused while one holds it (an flock, which the kernel drops when a
    killed run dies, so none is left stuck); a fresh run refuses a folder that holds a run unless --overwrite,
    which deletes that run's files; --resume auto resumes from its img2gpt_last.pth when there is one. The lock
    is released when the ExitStack `held` closes. Only the main process of a data-parallel run locks and
    deletes."""
    import fcntl

    folder = require_writable_dir(cfg.output_dir)
    if main:
        lock = held.enter_context(open(folder / LOCK_FILE, "a+"))
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise Img2GPTError(f"another training run (pid {holder}) is writing to '{folder}': wait for it to end, "
                               "or give this one another --output-dir") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
    resume = cfg.resume_from
    existing = sorted({p.name for pattern in RUN_FILES for p in folder.glob(pattern)})
    odd = [name for name in existing if not (folder / name).is_file() or (folder / name).is_symlink()]
    if odd:  # a folder or a link named like a run's file: --overwrite must not fail, or delete what it points to
        raise Img2GPTError(f"'{folder / odd[0]}' is not a regular file, where a run keeps its {odd[0]}: move it out "
                           "of --output-dir, or give another --output-dir")
    if resume == "auto":
        resume = str(folder / "img2gpt_last.pth") if (folder / "img2gpt_last.pth").is_file() else None
        if resume is None and not cfg.overwrite:
            existing = afresh_without_last(folder, existing, main)
        elif main:
            print(f"--resume auto: {'continuing ' + resume if resume else 'no img2gpt_last.pth, starting afresh'}")
    if resume and cfg.overwrite:
        raise Img2GPTError("--overwrite starts afresh and --resume continues: give one of them")
    if existing and not resume and main:
        if not cfg.overwrite:
            raise Img2GPTError(f"'{folder}' already holds a run ({', '.join(existing[:3])}"
                               f"{', ...' if len(existing) > 3 else ''}): continue it with --resume auto, or start "
                               "over with --overwrite (deletes its checkpoints, log and plot)")
        return folder, resume, existing  # deleted by prepare_run once the data and the models are ready
    return folder, resume, []


def delete_previous_run(folder, names):
    """--overwrite: the previous run's files go only when the new run has its data and models, so a mistyped
    --data-dir or model name never costs the old run."""
    for name in names:
        (folder / name).unlink(missing_ok=True)
    if names:
        print(f"--overwrite: deleted {len(names)} file(s) of the previous run in '{folder}'")


class JsonlLog:
    """training_log.jsonl: one JSON record per line, flushed at once so a disconnect loses nothing."""

    def __init__(self, path, enabled=True):
        self.path, self.file = Path(path), None
        if enabled:  # in data-parallel training only the main process writes
            self.file = open(self.path, "a", encoding="utf-8")
            if self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
                self.file.write("\n")  # a run killed mid-line: start on a fresh line

    def write(self, **record):
        if self.file:  # NaN and inf are not JSON: they are written as null
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def read_log(path):
    """The records of training_log.jsonl, skipping what is not a whole record (a line cut short by a kill)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def loss_curves(records, batches_per_epoch):
    """(steps, train losses, epoch-end steps, validation losses) from training_log.jsonl records. A batch that
    a resumed run trained again counts once, with its later loss."""
    train = {}
    for r in records:
        if r.get("type") == "batch":
            train[(r["epoch"] - 1) * batches_per_epoch + r["step"]] = r["loss"]
    val = {r["epoch"] * batches_per_epoch: r["val_loss"] for r in records
           if r.get("type") == "epoch" and r.get("val_loss") is not None}
    steps = sorted(train)
    return steps, [train[s] for s in steps], sorted(val), [val[s] for s in sorted(val)]


def plot_losses(log_path, png_path, batches_per_epoch):
    """OUTPUT_DIR/loss.png: train loss per step (raw and smoothed) and validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display in Colab subprocesses or on servers
    import matplotlib.pyplot as plt

    steps, losses, val_steps, val_losses = loss_curves(read_log(log_path), batches_per_epoch)
    window = max(1, len(losses) // 50)  # a moving average over ~2% of the run
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss per batch")
    axes.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"train loss, mean of {window}")
    axes.plot(val_steps, val_losses, "o-", color="tab:orange", linewidth=2, label="validation loss (epoch end)")
    axes.set(xlabel=f"batch ({batches_per_epoch} per epoch)", ylabel="cross-entropy loss", title="Img2GPT training")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    write_atomically(png_path, lambda file: figure.savefig(file, format="png"))
    plt.close(figure)


# --- Training -------------------------------------------------------------------------------------
DIVERGED = ("training diverged{where}: lower --learning-rate and --resume auto (it continues from img2gpt_last.pth, "
            "the last save before it, or starts afresh when there was none); if it diverges again from there, that "
            "save already holds the damage: start over with --overwrite and a lower --learning-rate")


def autocast(device, compute_dtype):
    return torch.autocast(device.type, dtype=compute_dtype, enabled=device.type == "cuda")


def new_tally():
    """What an epoch adds up as it goes: its applied losses, caption rows trained and seconds of training."""
    return {"loss_sum": 0.0, "loss_count": 0, "captions": 0, "seconds": 0.0}


def training_state(run, epoch, step, tally, progress=None):
    """Everything besides the weights that a resumed run needs, as plain types and tensors."""
    return {"epoch": epoch, "step": step, "batch_size": run.cfg.batch_size, "seed": run.cfg.seed,
            "stream_progress": progress, "stream_slots": max(1, run.cfg.num_workers) if run.data.stream else None,
            "processes": run.world, "settings": run.settings, "train_split": run.train_split,
            **tally, "optimizer": run.optimizer.state_dict(),
            "schedule": run.schedule, "scaler": run.scaler.state_dict(), "batch_order": BATCH_ORDER,
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}


def save_last(run, epoch, step, tally=None):
    """OUTPUT_DIR/img2gpt_last.pth: weights plus training state after `step` batches of `epoch`. Streamed data
    saves how many batches each slot trained, gathered from every process (each knows its own)."""
    progress = run.progress if run.data.stream and step else None
    if progress and run.world > 1:
        gathered = [None] * run.world
        torch.distributed.all_gather_object(gathered, progress)
        progress = [max(values) for values in zip(*gathered)]
    if run.main:
        save_checkpoint(run.output_dir / "img2gpt_last.pth", run.model, run.model_config,
                        {"training_state": training_state(run, epoch, step, tally or new_tally(), progress),
                         "run_id": run.run_id})


def linear_schedule(warmup, total):
    """The learning-rate plan of a fresh run: linear warm-up to the peak over `warmup` batches, then a straight
    line down to 0 at batch `total` (what transformers' get_linear_schedule_with_warmup does), as plain numbers
    that a checkpoint stores and a resume can extend."""
    return {"warmup": warmup, "from_step": warmup, "from_factor": 1.0, "total": total}


def schedule_factor(plan, step):
    """The fraction of the peak --learning-rate used at batch `step` (counted over all epochs)."""
    if step < plan["warmup"]:
        return step / plan["warmup"]
    return plan["from_factor"] * max(0, plan["total"] - step) / max(1, plan["total"] - plan["from_step"])


def extend_schedule(plan, step, total):
    """The plan of a resume at batch `step` whose --epochs make `total` batches. Past the warm-up, a new line
    from where the rate stands down to 0 at the new end, so more (or fewer) epochs never make it jump; epochs
    added to a run that ended, whose rate reached 0, go from the peak down to 0 (at 0 they would learn nothing)."""
    if total == plan["total"]:
        return plan
    if step < plan["warmup"]:
        return {**plan, "total": total}
    start = 1.0 if step >= plan["total"] else schedule_factor(plan, step)
    return {**plan, "from_step": step, "from_factor": start, "total": total}


def make_scheduler(optimizer, plan, peak, step):
    """A LambdaLR following `plan` under the peak rate `peak`, standing at batch `step`."""
    for group in optimizer.param_groups:  # a resume's optimizer state brings the saved rate: the peak given wins
        group["lr"] = group["initial_lr"] = peak
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(schedule_factor, plan), last_epoch=step - 1)


def check_resume(cfg, state, processes):
    """The model config a resume rebuilds, checked against the run's settings before anything slow loads: what
    the batch order or the trained weights depend on must be as saved; --vit-model / --gpt2-model, when set,
    name other copies of the base models (their families are checked when they load)."""
    train = state.get("training_state")
    if train is None:
        raise Img2GPTError("this checkpoint holds no training state (epoch files hold weights only): "
                           "resume from img2gpt_last.pth in the same OUTPUT_DIR")
    saved = (train["batch_size"], train["seed"], train.get("processes", 1))
    if saved != (cfg.batch_size, cfg.seed, processes):
        raise Img2GPTError(f"resume with the run's own --batch-size {saved[0]}, --seed {saved[1]} and {saved[2]} "
                           "process(es): the batch order depends on them")
    slots = train.get("stream_slots")
    if slots and slots != max(1, cfg.num_workers):
        raise Img2GPTError(f"resume with the run's own --num-workers {slots}: its shards are dealt to that many "
                           "workers per process")
    config = dict(state["config"])
    fixed = {name: {**MODEL_CONFIG_DEFAULTS, **config}.get(name) for name in RESUME_FIXED}
    fixed["warmup_steps"] = train.get("settings", {}).get("warmup_steps", cfg.warmup_steps)
    for name, was in fixed.items():
        if getattr(cfg, name) != was:
            flag = flag_of(name, FLAG_ALIASES)
            what = "schedule depends" if name == "warmup_steps" else "trained weights depend"
            value = shown(was) if isinstance(was, float) else was  # as typed after the flag: no quotes, no .0
            raise Img2GPTError(f"{flag} {shown(getattr(cfg, name))} differs from the run's {shown(was)}, which its "
                               f"{what} on: resume with {flag} {value}, or start a new run in another --output-dir")
    for key, name, default in (("vit_model", cfg.vit_model_name, VIT_MODEL_NAME),
                               ("gpt2_model", cfg.gpt2_model_name, GPT2_MODEL_NAME)):
        if name != default:  # as for --evaluate and inference: the flag names another copy
            config[key] = name
    return config


def check_resume_split(state, train_split):
    """A resume must train on the images the run trained on: other data or split settings are refused."""
    saved = state["training_state"].get("train_split", train_split)  # older checkpoints did not record it
    if saved != train_split:
        raise Img2GPTError(f"the training images differ from the run's ({train_split['images']} now, "
                           f"{saved['images']} then): resume with its own data and --val-images, --test-images "
                           "and --karpathy-split-file")


def resume_changes(cfg, state):
    """{setting: (saved, now)} for the RESUME_MAY_CHANGE settings given other values than the saved run's."""
    saved = state["training_state"].get("settings", {})
    return {name: (saved[name], getattr(cfg, name)) for name in RESUME_MAY_CHANGE
            if name in saved and saved[name] != getattr(cfg, name)}


def restore_training_state(run, state):
    """Put weights, optimizer, GradScaler and RNG back as saved and the schedule at the batch reached, with a
    changed --learning-rate or --epochs in force from there; returns (epoch, step, the epoch's tally so far)."""
    train = state["training_state"]
    load_trained_weights(run.model, state["weights"])
    run.optimizer.load_state_dict(train["optimizer"])
    reached = (train["epoch"] - 1) * run.batches_per_epoch + train["step"]
    # Checkpoints from before the stored plan followed the plain linear schedule of the settings given.
    plan = train.get("schedule", run.schedule)
    run.schedule = extend_schedule(plan, reached, run.total_steps)
    run.schedule_restarted = reached >= plan["total"] and run.schedule != plan  # epochs added to an ended run
    run.scheduler = make_scheduler(run.optimizer, run.schedule, run.cfg.learning_rate, reached)
    run.scaler.load_state_dict(train["scaler"])
    run.progress = train.get("stream_progress")
    random.setstate(train["rng"]["python"])
    torch.set_rng_state(train["rng"]["torch"])
    if train["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(train["rng"]["cuda"])
    return train["epoch"], train["step"], {key: train.get(key, zero) for key, zero in new_tally().items()}


def prepare_run(cfg, held):
    """Data, model, optimizer and schedule of a run, gathered in one namespace the stages share; None when the
    run in OUTPUT_DIR is already complete. OUTPUT_DIR stays locked until the ExitStack `held` closes."""
    from accelerate import PartialState
    from transformers import set_seed

    set_seed(cfg.seed)
    # Under `accelerate launch` there is one process per GPU (or --cpu --num_processes N): each takes its device
    # from accelerate; a plain `python training_script.py` is one process on DEVICE_CHOICE.
    state = PartialState(cpu=cfg.device_choice == "cpu" or not torch.cuda.is_available())  # gloo on CPUs
    device = state.device if state.num_processes > 1 else resolve_device(cfg.device_choice)
    four_bit, compute_dtype = choose_precision(device, cfg.quantize)
    if four_bit:  # before the data and the models: minutes earlier than build_model would say it
        require_4bit_support(device)
    output_dir, resume_from, previous_run = claim_output_dir(cfg, held, main=state.is_main_process)
    cfg.resume_from = resume_from  # "auto" resolved: the path, or None for a fresh run
    resume = load_checkpoint(resume_from) if resume_from else None  # fail fast on a bad path
    if resume and resume.get("training_state", {}).get("epoch", 0) > cfg.num_epochs:
        if state.is_main_process:
            folder = Path(resume_from).parent  # the run's own folder: --resume may name another one's file
            print(f"The run in '{folder}' is complete: all {cfg.num_epochs} epochs are trained "
                  f"({folder / f'img2gpt_epoch_{cfg.num_epochs}.pth'}). Nothing to do.")
        return None
    model_config = check_resume(cfg, resume, state.num_processes) if resume else model_config_from(cfg)
    check_context(model_config, cfg.max_caption_tokens, cfg.max_new_tokens, FLAG_ALIASES)

    if stream_kind(cfg) and state.num_processes > 1:  # one counting pass, its result sent to the others
        data = [None]
        if state.is_main_process:
            try:
                data = [prepare_data(cfg)]
            except Img2GPTError as exc:
                data = [exc]  # the others stop with the same line instead of waiting for data that never comes
        torch.distributed.broadcast_object_list(data, src=0)
        if isinstance(data[0], Exception):
            raise data[0]
        data = data[0]
    else:
        with state.main_process_first():  # the main process downloads; the others then find the cached copy
            data = prepare_data(cfg, main=state.is_main_process)
    captions, splits = data.captions, data.splits
    if not data.train_images:
        raise Img2GPTError(f"too few images to train on ({len(set(captions['image_name'])) + data.train_images})")
    train_split = data.train_split
    if resume:
        check_resume_split(resume, train_split)

    model, tokenizer, processor, model_config = build_model(model_config, device, quantize=cfg.quantize)
    delete_previous_run(output_dir, previous_run)
    datasets = make_datasets(data, processor)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    if data.stream:
        batches_per_epoch = len(train_batches(data, processor, cfg, 1, state.process_index, state.num_processes))
    else:
        batches_per_epoch = len(EpochBatchSampler(datasets["train"].groups, cfg.batch_size, cfg.seed, 1,
                                                  world=state.num_processes))
    train_model = model
    if state.num_processes > 1:  # gradients averaged across processes at each backward
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    total_steps = cfg.num_epochs * batches_per_epoch
    schedule = linear_schedule(min(cfg.warmup_steps, total_steps // 2), total_steps)  # a resume replaces it
    return types.SimpleNamespace(
        cfg=cfg, device=device, four_bit=four_bit, compute_dtype=compute_dtype, output_dir=output_dir,
        model=model, tokenizer=tokenizer, processor=processor, model_config=model_config, data=data,
        datasets=datasets, splits=splits, left_out=data.left_out, resume=resume, trainable=trainable,
        train_model=train_model, rank=state.process_index, world=state.num_processes, main=state.is_main_process,
        optimizer=optimizer, schedule=schedule, scheduler=make_scheduler(optimizer, schedule, cfg.learning_rate, 0),
        settings={name: value for name, value in vars(cfg).items() if isinstance(value, (bool, int, float, str))},
        train_split=train_split, run_id=run_id(resume),
        scaler=torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16),
        samples=sample_set(captions, splits["val"], data.open_image, processor, cfg.num_sample_images),
        batches_per_epoch=batches_per_epoch, total_steps=total_steps, log=None, progress=None)


def run_id(resume):
    """The run's name in its checkpoints and evaluations: kept by a resume, new for a fresh run."""
    import uuid

    saved = (resume or {}).get("run_id") or (resume or {}).get("training_state", {}).get("run_id")
    return saved or uuid.uuid4().hex[:12]


def count_4bit_layers(model):
    """How many bitsandbytes Linear4bit layers the model holds (0 in full precision)."""
    if not model.quantized:
        return 0
    import bitsandbytes as bnb

    return sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())


def print_banner(run):
    precision = (f"4-bit QLoRA: {count_4bit_layers(run.model)} Linear4bit layers, compute {run.compute_dtype}"
                 if run.four_bit else "full precision LoRA")
    splits = run.splits
    print(f"Using device: {run.device} ({precision})\n"
          f"Split: {run.data.split_name}\n"
          f"Images train/val/test: {run.data.train_images}/{len(splits['val'])}/{len(splits['test'])}, "
          f"training captions: {run.data.train_captions}\n"
          f"Batch size {run.cfg.batch_size}, {run.batches_per_epoch} batches per epoch, {run.total_steps} in all\n"
          f"Trainable parameters: {sum(p.numel() for p in run.trainable):,} of "
          f"{sum(p.numel() for p in run.model.parameters()):,}")


def print_resume_changes(run, changes, epoch, step):
    """What a resume does differently from the saved run, from the batch after `step`, and the rate it uses."""
    if not changes:
        return
    print(f"Changed on resume, from epoch {epoch} batch {step + 1}: "
          + ", ".join(f"{flag_of(name, FLAG_ALIASES)} {was} -> {now}" for name, (was, now) in changes.items()))
    if {"learning_rate", "num_epochs"} & changes.keys():
        restarted = " (the saved schedule had ended at 0: the added epochs start again from the peak)"
        print(f"Learning rate now {run.optimizer.param_groups[0]['lr']:.3g} (peak {run.cfg.learning_rate:g}), falling "
              f"linearly to 0 at the end of epoch {run.cfg.num_epochs}{restarted if run.schedule_restarted else ''}")


def sample_captions(run, epoch, step):
    """Print and log captions of the fixed sample images beside one reference caption each."""
    from tqdm.auto import tqdm

    samples = run.samples
    captions = generate_captions(run.model, run.tokenizer, samples["pixel_values"].to(run.device),
                                 **decoding_settings(run.cfg))
    pairs = list(zip(samples["names"], captions, samples["references"]))
    tqdm.write(f"Sample captions after epoch {epoch} step {step}:\n"
               + "\n".join(f"  {name}: {caption!r}  (reference: {ref!r})" for name, caption, ref in pairs))
    run.log.write(type="samples", epoch=epoch, step=step,
                  samples=[{"image": n, "generated": c, "reference": r} for n, c, r in pairs])


def every_process_has(batch, run):
    """Whether every data-parallel process holds a batch for this step (with one process: whether it does)."""
    if run.world == 1:
        return batch is not None
    flag = torch.tensor([0.0 if batch is None else 1.0], device=run.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return flag.item() > 0


def mean_over_processes(value, world):
    """The mean of a scalar tensor over the data-parallel processes (itself with one process)."""
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    return value


def train_one_epoch(run, epoch, start_step=0, tally=None):
    """Batches start_step+1.. of `epoch`; returns the epoch's tally (new_tally) with this process's applied
    losses, caption rows and seconds (the wall time of the training batches: loading, forward, backward and
    optimizer, not sample captions or saves) added. A non-finite loss is not applied; MAX_BAD_BATCHES of them
    in a row stop training."""
    import time

    from tqdm.auto import tqdm

    cfg, model, optimizer = run.cfg, run.train_model, run.optimizer
    tally = tally or new_tally()
    dataset = run.datasets["train"]
    if run.data.stream:  # each slot from where the interrupted run left it (a resume), else from its start
        dataset = train_batches(run.data, run.processor, cfg, epoch, run.rank, run.world,
                                run.progress if start_step else None)
        run.progress = list(dataset.progress)
    loader = make_loader(dataset, run.tokenizer, cfg, epoch, start_step, run.rank, run.world)
    model.train()
    bad_in_row = 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.num_epochs}", initial=start_step,
               total=start_step + len(loader), dynamic_ncols=True, disable=not run.main)
    started = time.perf_counter()  # the clock runs while the loader fetches the next batch
    for step, batch in enumerate(bar, start_step + 1):
        keys = None
        if batch is not None and "where" in batch:  # streamed: the slot's batch, now trained (or skipped)
            slot, number = batch.pop("where")
            run.progress[slot] = number + 1
            keys = batch.pop("keys", None)
            batch = batch if "input_ids" in batch else None
        if not every_process_has(batch, run):  # all processes skip together: none waits for the others forever
            if batch is not None:
                run.log.write(type="skipped", epoch=epoch, step=step, reason="another process had no batch")
            batch = None
        if batch is not None:  # None: every image of the batch failed to decode
            batch = {key: value.to(run.device, non_blocking=True) for key, value in batch.items()}
            with autocast(run.device, run.compute_dtype):
                loss = model(**batch).loss
            value = mean_over_processes(loss.detach(), run.world).item()  # every process decides alike
            if math.isfinite(value):
                run.scaler.scale(loss).backward()
                run.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(run.trainable, 1.0)
                run.scaler.step(optimizer)
                run.scaler.update()
                bad_in_row = 0
                tally["loss_sum"], tally["loss_count"] = tally["loss_sum"] + value, tally["loss_count"] + 1
                tally["captions"] += len(batch["input_ids"])
                elapsed = tally["seconds"] + time.perf_counter() - started
                bar.set_postfix({"loss": f"{value:.4f}", "captions/s": f"{tally['captions'] / elapsed:.1f}"})
                run.log.write(type="batch", epoch=epoch, step=step, loss=value, lr=optimizer.param_groups[0]["lr"],
                              **({"keys": keys} if keys else {}))
            else:
                bad_in_row += 1
                run.log.write(type="nonfinite", epoch=epoch, step=step, loss=str(value))
                if run.main:
                    tqdm.write(f"Skipped batch {step} of epoch {epoch}: loss is {value}")
                if bad_in_row >= cfg.max_bad_batches:
                    raise Img2GPTError(f"{bad_in_row} non-finite losses in a row at epoch {epoch} step {step}: "
                                       + DIVERGED.format(where=""))
            optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()  # the schedule follows batches, applied or not, so resumed runs line up
        tally["seconds"] += time.perf_counter() - started
        if cfg.eval_interval > 0 and step % cfg.eval_interval == 0 and run.samples and run.main:
            sample_captions(run, epoch, step)
        if cfg.save_interval > 0 and step % cfg.save_interval == 0 and bad_in_row == 0:
            save_last(run, epoch, step, tally)
        started = time.perf_counter()
    return tally


@torch.no_grad()
def validation_loss(run):
    """Mean validation loss (None without validation data), each process scoring its share of the batches
    and the sums gathered."""
    run.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)  # (sum of batch losses, batches)
    for batch in make_loader(run.datasets["val"], run.tokenizer, run.cfg, rank=run.rank, world=run.world):
        if batch is None:
            continue
        batch = {key: value.to(run.device) for key, value in batch.items()}
        with autocast(run.device, run.compute_dtype):
            total += torch.tensor([run.model(**batch).loss.item(), 1.0], dtype=torch.float64, device=run.device)
    run.model.train()
    total = mean_over_processes(total, run.world)  # a mean of sums is fine: only their ratio is used
    return (total[0] / total[1]).item() if total[1] > 0 else None


def train(run):
    """The epochs, from the start or from where a resumed checkpoint stopped."""
    epoch, step, tally = 1, 0, new_tally()
    changes = {}
    if run.resume:
        epoch, step, tally = restore_training_state(run, run.resume)
        changes = resume_changes(run.cfg, run.resume)
        if run.main:
            print(f"Resuming from '{run.cfg.resume_from}': epoch {epoch}, after batch {step}")
            grouped = not run.data.stream and any(len(rows) > 1 for rows in run.datasets["train"].groups)
            if step and grouped and run.resume["training_state"].get("batch_order") != BATCH_ORDER:
                print(f"Note: this run was saved by a version that shuffled caption rows one by one; the rest of "
                      f"epoch {epoch} follows the new order of whole images, so some of its captions are trained "
                      "twice in it and others not at all (later epochs are whole)")
            was, now = ("4bit" if bits else "none" for bits in (run.resume.get("trained_in_4bit"), run.four_bit))
            if was != now:  # allowed: the adapters have the same names and shapes either way
                print(f"Note: this run was trained with --quantize {was} and goes on with --quantize {now}")
            print_resume_changes(run, changes, epoch, step)
    # Which rows each process's first batch holds: the record that data-parallel processes got their own share
    # (streamed data: the batch records hold the keys of their images).
    first = None if run.data.stream else next(iter(EpochBatchSampler(
        run.datasets["train"].groups, run.cfg.batch_size, run.cfg.seed, epoch, step, run.rank, run.world)), [])
    first_batches = [first]
    if run.world > 1 and not run.data.stream:
        first_batches = [None] * run.world
        torch.distributed.all_gather_object(first_batches, first)
    run.log.write(type="start", epoch=epoch, step=step, resumed_from=run.cfg.resume_from,
                  changed={name: list(pair) for name, pair in changes.items()},
                  lr=run.optimizer.param_groups[0]["lr"],
                  left_out_images=run.data.left_out_count, processes=run.world, first_batches=first_batches,
                  layout=run.data.layout, split=run.data.split_name,
                  quantize="4bit" if run.four_bit else "none", linear4bit_layers=count_4bit_layers(run.model))
    for epoch in range(epoch, run.cfg.num_epochs + 1):
        tally = train_one_epoch(run, epoch, step, tally)
        step = 0
        train_loss = tally["loss_sum"] / tally["loss_count"] if tally["loss_count"] else float("nan")
        train_loss = mean_over_processes(torch.tensor(train_loss, device=run.device), run.world).item()
        # Caption rows of all processes; seconds of the main process (they step in lockstep).
        captions = round(mean_over_processes(torch.tensor(float(tally["captions"]), device=run.device),
                                             run.world).item() * run.world)
        speed = {"captions": captions, "seconds": round(tally["seconds"], 3)}
        tally = new_tally()
        val_loss = validation_loss(run)
        if not math.isfinite(train_loss) or (val_loss is not None and not math.isfinite(val_loss)):
            run.log.write(type="epoch", epoch=epoch, train_loss=train_loss, val_loss=val_loss)
            raise Img2GPTError(DIVERGED.format(where=f" in epoch {epoch} (train loss {train_loss}, validation loss "
                                                     f"{val_loss})"))
        if run.main:
            val_text = f"{val_loss:.4f}" if val_loss is not None else "n/a (no validation images)"
            print(f"Epoch {epoch}: average train loss {train_loss:.4f}, validation loss {val_text} "
                  f"({speed['captions']:,} captions in {speed['seconds']:.0f} s, "
                  f"{speed['captions'] / max(speed['seconds'], 1e-9):.1f} captions/s)")
            run.log.write(type="epoch", epoch=epoch, train_loss=train_loss, val_loss=val_loss, **speed)
            path = run.output_dir / f"img2gpt_epoch_{epoch}.pth"
            save_checkpoint(path, run.model, run.model_config, {"epoch": epoch, "train_loss": train_loss,
                                                                "val_loss": val_loss, "run_id": run.run_id})
            save_last(run, epoch + 1, 0)  # after the epoch file: a resume never skips an epoch's end
            plot_losses(run.log.path, run.output_dir / "loss.png", run.batches_per_epoch)
            print(f"Saved {path} and {run.output_dir / 'loss.png'}")


def evaluate_last_epoch(run):
    """The test-split scores of the run's last epoch file, written beside it (EVAL_AFTER_TRAINING)."""
    name = f"img2gpt_epoch_{run.cfg.num_epochs}"
    identity = checkpoint_identity(run.output_dir / f"{name}.pth", {"run_id": run.run_id})
    path = evaluation_path(run.output_dir, name, identity)
    evaluate_on_test(run.model, run.tokenizer, run.processor, run.data, run.cfg, name, path, identity)


def interrupted_advice(cfg, run):
    """The line a Ctrl+C during training ends with: what to run next, true for where the run stopped."""
    folder = Path(cfg.output_dir)
    if run is not None and getattr(run, "trained", False):
        last = folder / f"img2gpt_epoch_{cfg.num_epochs}.pth"
        return (f"interrupted during the test-split evaluation: every epoch is trained and saved; score the last "
                f"one with --evaluate {last}")
    instead = " instead of --overwrite" if cfg.overwrite else ""
    last = folder / "img2gpt_last.pth"
    if last.is_file():
        return f"interrupted: run the same command with --resume auto{instead} to continue from {last}"
    if run is not None and cfg.resume_from and Path(cfg.resume_from).is_file():  # another folder's, not saved here
        return (f"interrupted before the first save in '{folder}': run the same command again to continue from "
                f"{cfg.resume_from}")
    if (folder / "training_log.jsonl").is_file():
        return (f"interrupted before the first save (every --save-interval batches): run the same command with "
                f"--resume auto{instead} to start again")
    return "interrupted: nothing was written"


# --- Main: the command line -----------------------------------------------------------------------
def main(argv=None):
    cfg = parse_config(CONSTANTS, argv, FLAG_ALIASES, __doc__)
    check_settings(cfg, TRAINING_RULES, FLAG_ALIASES)
    if cfg.data_dir and cfg.hf_dataset:
        raise Img2GPTError("--data-dir and --hf-dataset both name data to train on: give one of them")
    if cfg.evaluate:
        try:
            return evaluate_checkpoint(cfg)
        except KeyboardInterrupt:
            raise KeyboardInterrupt("interrupted: no result was written; run the same command again to evaluate"
                                    ) from None
    run = None
    try:
        with contextlib.ExitStack() as held:  # OUTPUT_DIR's lock, released however the run ends
            run = prepare_run(cfg, held)
            if run is None:  # already complete: said so
                return
            if run.main:
                print_banner(run)
            run.log = held.enter_context(contextlib.closing(
                JsonlLog(run.output_dir / "training_log.jsonl", enabled=run.main)))
            if run.left_out:
                run.log.write(type="left_out", images=run.left_out)
            train(run)
            run.trained = True
            if cfg.eval_after_training and run.splits["test"] and run.main:
                evaluate_last_epoch(run)
            elif cfg.eval_after_training and run.main:
                print("No test images (--test-images 0, or none in the data's own split): the test-split "
                      "evaluation is left out")
    except torch.cuda.OutOfMemoryError:
        raise Img2GPTError(f"CUDA ran out of memory at BATCH_SIZE {cfg.batch_size}: start over with a smaller "
                           f"--batch-size (e.g. {max(1, cfg.batch_size // 2)}) and --overwrite (a resume keeps the "
                           "batch size it was saved with)") from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_advice(cfg, run)) from None
    if run.world > 1:
        torch.distributed.barrier()  # the others wait for the main process's test-split evaluation
        torch.distributed.destroy_process_group()


def run_cli(main, argv=None, on_interrupt="interrupted", keep_working=True):
    """A script's main as a command: a problem the user can fix is one 'error: ...' line on stderr, exit 1; a
    Ctrl+C is one line (the KeyboardInterrupt's own text when it carries one). Output into a pipe that closes
    (| head) goes quiet: training goes on with its work (keep_working), captioning ends with exit 0."""
    with output_that_may_close(keep_working):
        try:
            main(argv)
        except Img2GPTError as error:
            sys.exit(f"error: {error}")
        except KeyboardInterrupt as interrupt:
            sys.exit(interrupt.args[0] if interrupt.args and isinstance(interrupt.args[0], str) else on_interrupt)
        except OutputClosed:
            sys.exit(0)


class OutputClosed(Exception):
    """Standard output was closed by its reader (| head): nothing more can be shown."""


class ClosableStream:
    """sys.stdout or sys.stderr, made quiet when its reader goes away: the stream's file descriptor then points
    to /dev/null (so nothing buffered fails later, at exit included), and a closed stdout raises OutputClosed
    unless the work should go on without it."""

    def __init__(self, stream, stop_when_closed):
        self._stream, self._stop, self._closed = stream, stop_when_closed, False

    def _gone(self):
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._stream.fileno())
                os.close(devnull)
        if self._stop:
            raise OutputClosed

    def write(self, text):
        if not self._closed:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._gone()
        return len(text)

    def flush(self):
        if not self._closed:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._gone()

    def __getattr__(self, name):  # isatty, fileno, encoding, ... of the stream itself
        return getattr(self._stream, name)


@contextlib.contextmanager
def output_that_may_close(keep_working):
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = ClosableStream(sys.stdout, not keep_working), ClosableStream(sys.stderr, False)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


if __name__ == "__main__":
    run_cli(main)
