"""Img2GPT speed and size on this machine, printed as a markdown table.

    python benchmarks/benchmark.py            # full size: ViT-B/16 (224) + GPT-2 small, random weights
    python benchmarks/benchmark.py --smoke    # tiny models, one repeat, all in one process: checks it works

Both models are built from their default configs (no download). The QLoRA rows save them to a temporary
folder and load them the way the scripts do (from_pretrained, 4-bit NF4 through bitsandbytes' CPU backend or
full precision), each measurement in a process of its own so that its peak memory is its own. Every caption
decodes exactly
NEW_TOKENS tokens, greedily, so Img2GPT, its peer and the floor do the same amount of decoding. The peer is
HF's VisionEncoderDecoderModel of the same sizes (GPT-2 reading the ViT through cross-attention, the
architecture of nlpconnect/vit-gpt2-image-captioning). Times are medians of REPEATS runs after one warm-up;
compare the ratios, which are measured in the same run, rather than the absolute times.
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import training_script as ts  # noqa: E402

NEW_TOKENS = 20
REPEATS = 5
POOLED_GRID = 4  # the PREFIX_POOL_GRID option measured beside the default: 1 + 16 prefix tokens instead of 197
QLORA_REPEATS = 3  # repeats of each QLoRA measurement (a full-size training step takes several seconds here)
CAPTIONS_PER_IMAGE = 5  # Flickr30k's and COCO's: the training rows below step on 2 images x 5 captions
STEP_IMAGES = 2
CAPTION_TOKENS = 16  # tokens of each training caption, EOS included


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


def data_pipeline(image_size, count, repeats):
    """(images/s through the training loader: decode, RGB, preprocess with NUM_WORKERS workers;
    images/s of JPEG decoding alone in one process)."""
    from PIL import Image
    from transformers import ViTImageProcessor

    folder = Path(tempfile.mkdtemp())
    for i in range(count):  # Flickr30k-sized photos (about 500 x 375)
        Image.effect_noise((500, 375), 60).convert("RGB").save(folder / f"{i}.jpg", quality=90)
    processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    dataset = ts.CaptionDataset([(f"{i}.jpg", "") for i in range(count)], partial(ts.image_in_folder, folder),
                                processor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=ts.NUM_WORKERS,
                                         collate_fn=lambda batch: batch["pixel_values"])  # as training decodes
    pipeline = median_time(lambda: list(loader), repeats)

    def decode_only():
        for i in range(count):
            with Image.open(folder / f"{i}.jpg") as image:
                image.load()
    return count / pipeline, count / median_time(decode_only, repeats)


def photo_jpegs(count, seed=0):
    """`count` Flickr30k-sized JPEGs (about 500 x 375, noise: no easier to decode than a photo), as bytes."""
    import io

    from PIL import Image

    jpegs = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.effect_noise((500, 375), 60 + (seed + i) % 7).convert("RGB").save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def write_stream_shards(folder, jpegs, shards):
    """The JPEGs as img2dataset shards (KEY.jpg, KEY.txt) in folder, dealt to `shards` shards."""
    import io
    import tarfile

    for shard in range(shards):
        with tarfile.open(Path(folder) / f"{shard:05d}.tar", "w") as tar:
            for k, jpeg in enumerate(jpegs[shard::shards]):
                for suffix, data in (("jpg", jpeg), ("txt", b"a picture of noise")):
                    info = tarfile.TarInfo(f"{shard:05d}{k:04d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def stream_config(data_dir, workers):
    return ts.parse_config(ts.CONSTANTS, ["--data-dir", str(data_dir), "--num-workers", str(workers),
                                          "--val-images", "0", "--test-images", "0"])


def stream_pipeline(image_size, count, repeats):
    """(images/s through the training loader from WebDataset shards; images/s from a folder of the same JPEGs,
    each with NUM_WORKERS workers and training's batch size; the median speed ratio of the two run in turn;
    samples/s of the counting pass)."""
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    jpegs = photo_jpegs(count)
    folder, shards = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    for i, jpeg in enumerate(jpegs):
        (folder / f"{i}.jpg").write_bytes(jpeg)
    write_stream_shards(shards, jpegs, 8)
    cfg = stream_config(shards, ts.NUM_WORKERS)
    counting = median_time(lambda: ts.prepare_data(cfg, main=False), repeats)
    data = ts.prepare_data(cfg, main=False)

    def pixels(batch):
        return batch["pixel_values"]

    def from_shards():
        batches = ts.StreamBatches(data.stream, processor, ts.BATCH_SIZE, ts.SEED, 1, workers=max(1, ts.NUM_WORKERS))
        return list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=ts.NUM_WORKERS,
                                                collate_fn=pixels))

    dataset = ts.CaptionDataset([(f"{i}.jpg", "") for i in range(count)], partial(ts.image_in_folder, folder),
                                processor)

    def from_folder():  # as make_loader reads a folder: whole images per batch, in the epoch's order
        sampler = ts.EpochBatchSampler(dataset.groups, ts.BATCH_SIZE, ts.SEED, 1)
        return list(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=ts.NUM_WORKERS,
                                                collate_fn=pixels))

    assert sum(len(b) for b in from_shards()) == sum(len(b) for b in from_folder()) == count
    shards_time, folder_time, ratio = paired_times(from_shards, from_folder, repeats)
    return count / shards_time, count / folder_time, ratio, count / counting


def paired_times(first, second, repeats):
    """(median time of first, of second, median of the per-pair speed ratios second / first), the two run in
    turn, so that a slow spell of a shared machine slows both alike."""
    first(), second()  # warm-up
    pairs = []
    for _ in range(repeats):
        times = []
        for function in (first, second):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        pairs.append(times)
    return (statistics.median(t for t, _ in pairs), statistics.median(t for _, t in pairs),
            statistics.median(b / a for a, b in pairs))


def resident_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream_memory_worker(shards, per_shard, image_size):
    """In a process of its own: the counting pass and one epoch over `shards` shards read in this process,
    printing the resident memory after the batches of the first 2 shards and after all of them."""
    from transformers import ViTImageProcessor

    folder = Path(tempfile.mkdtemp())
    jpegs = photo_jpegs(per_shard * 4)  # the same pictures again in every shard: as many bytes as new ones
    write_stream_shards(folder, [jpegs[i % len(jpegs)] for i in range(shards * per_shard)], shards)
    data = ts.prepare_data(stream_config(folder, 0), main=False)
    batches = ts.StreamBatches(data.stream, ViTImageProcessor(size={"height": image_size, "width": image_size}),
                               per_shard, ts.SEED, 1)
    marks, read = {}, 0
    for batch in batches:  # one shard per batch (batch size = samples per shard)
        read += 1
        if read in (2, shards):
            marks[read] = resident_mb()
        del batch
    print(json.dumps(marks))


def stream_rows(image_size, smoke, repeats):
    """Rows of streamed data: loader speed against a folder of the same JPEGs, the counting pass, and resident
    memory after 50 shards against after 2 (in a process of its own)."""
    from_shards, from_folder, ratio, counting = stream_pipeline(image_size, 32 if smoke else 1024,
                                                                1 if smoke else 2 * repeats)
    shards, per_shard = (6, 4) if smoke else (50, 40)
    command = [sys.executable, __file__, "--worker", "stream-memory", "--per-image", str(per_shard),
               "--repeats", str(shards), "--checkpoint", str(image_size)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark worker {command[2:]} failed:\n{result.stderr[-3000:]}")
    marks = {int(k): v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    return [
        (f"data pipeline images/s from WebDataset shards ({ts.NUM_WORKERS} workers, batch {ts.BATCH_SIZE})",
         f"{from_shards:.1f}", f"the same JPEGs in a folder, same workers: {from_folder:.1f}/s",
         f"{ratio:.2f}x"),
        ("counting pass samples/s (shards, before training)", f"{counting:.1f}",
         f"loader from shards: {from_shards:.1f} images/s", f"{counting / from_shards:.2f}x"),
        (f"resident memory after {shards} shards of {per_shard} (counting pass + epoch)", f"{marks[shards]:.0f} MB",
         f"after 2 shards: {marks[2]:.0f} MB", f"{marks[shards] / marks[2]:.3f}x"),
    ]


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


def save_base_models(vit_config, gpt2_config, folder):
    """The random-weight models saved like hub models, with an image processor and a small word-level tokenizer
    (random GPT-2 has no vocabulary worth decoding), so the QLoRA rows load them through ts.build_model."""
    from tokenizers import Tokenizer, models
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    folder = Path(folder)
    ViTModel(vit_config, add_pooling_layer=False).save_pretrained(folder / "vit")
    ViTImageProcessor(size={"height": vit_config.image_size, "width": vit_config.image_size}).save_pretrained(
        folder / "vit")
    GPT2LMHeadModel(gpt2_config).save_pretrained(folder / "gpt2")
    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 100)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(folder / "gpt2")
    config = {"vit_model": str(folder / "vit"), "gpt2_model": str(folder / "gpt2"), "lora_r": ts.LORA_R,
              "lora_alpha": ts.LORA_ALPHA, "lora_dropout": ts.LORA_DROPOUT, "max_caption_tokens": 16}
    model, _, _, config = ts.build_model(config, torch.device("cpu"), quantize="none")
    ts.save_checkpoint(folder / "img2gpt.pth", model, config, {})
    return folder / "img2gpt.pth"


def offline_env():
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def whole_process_times(vit_config, gpt2_config, repeats):
    """Seconds from starting the process to its exit, captioning 1 and 8 photos from local files:
    inference_script.py against the peer script (benchmarks/peer_caption.py) on the same saved base models,
    runs alternating, medians. Returns {images: (img2gpt, peer)} and the per-stage table."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = save_base_models(vit_config, gpt2_config, folder)
        photos = []
        for i in range(8):  # Flickr-sized photos
            photos.append(str(Path(folder) / f"photo{i}.jpg"))
            Image.effect_noise((500, 375), 60).convert("RGB").save(photos[-1], quality=90)
        commands = {
            "img2gpt": lambda n: [sys.executable, str(ROOT / "inference_script.py"), "--weights", str(checkpoint),
                                  "--device", "cpu", "--max-new-tokens", str(NEW_TOKENS),
                                  *[arg for photo in photos[:n] for arg in ("--image", photo)]],
            "peer": lambda n: [sys.executable, str(Path(__file__).parent / "peer_caption.py"),
                               str(Path(folder) / "vit"), str(Path(folder) / "gpt2"), str(NEW_TOKENS), *photos[:n]]}
        times = {}
        for count in (1, 8):
            runs = {name: [] for name in commands}
            for _ in range(repeats):
                for name, command in commands.items():
                    start = time.perf_counter()
                    result = subprocess.run(command(count), capture_output=True, text=True, env=offline_env())
                    runs[name].append(time.perf_counter() - start)
                    if result.returncode != 0:
                        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
            times[count] = tuple(statistics.median(runs[name]) for name in commands)
        stages = {path: stage_times(checkpoint, photos[0], path, repeats) for path in ("peft", "fold")}
    return times, stages


STAGES = ("interpreter and imports", "checkpoint read, configs and family check", "base models load",
          "LoRA: wrap (peft) or nothing (fold)", "projection, model assembly", "trained weights: load + merge / fold",
          "first caption (image read, preprocess, ViT, prefill, decoding)", "interpreter exit")


def stage_times(checkpoint, photo, path, repeats):
    """Median seconds of each of STAGES in a fresh process captioning one photo the way inference_script.py
    does, by `path`: "peft" (wrap both models, load the adapters, merge them, no gc.freeze: before) or "fold"
    (the adapters folded in without peft, gc.freeze after loading: now)."""
    samples = []
    for _ in range(repeats):
        command = [sys.executable, __file__, "--stages", path, "--checkpoint", str(checkpoint), "--photo", photo,
                   "--started", repr(time.time())]
        result = subprocess.run(command, capture_output=True, text=True, env=offline_env())
        ended = time.time()
        if result.returncode != 0:
            sys.exit(f"stage worker failed:\n{result.stderr[-3000:]}")
        marks = json.loads(result.stdout.strip().splitlines()[-1]) + [ended]
        samples.append([later - earlier for earlier, later in zip(marks, marks[1:])])
    return [statistics.median(column) for column in zip(*samples)]


def stage_worker(path, checkpoint, photo, started):
    """Prints the time.time() at the end of each of STAGES but the last (the parent times the exit)."""
    import gc

    marks = [started]
    import inference_script  # noqa: F401  (its imports: what a terminal run pays before anything else)

    marks.append(time.time())
    cpu = torch.device("cpu")
    state = ts.load_checkpoint(checkpoint)
    announce = lambda step: marks.append(time.time())  # noqa: E731  (before Step 1, 2, 3, 4)
    if path == "fold":
        model, tokenizer, processor = ts.rebuild_from_checkpoint(state, cpu, announce=announce, quantize="none")
        gc.freeze()
    else:
        model, tokenizer, processor, _ = ts.build_model(state["config"], cpu, announce, "none")
        announce(4)
        ts.load_trained_weights(model, state["weights"])
        model = ts.merge_lora(model).eval()
    marks.append(time.time())
    open_image = lambda source: inference_script.fetch_image(source, 30, 10**8)  # noqa: E731
    list(ts.caption_sources(model, tokenizer, processor, [photo], open_image, 1,
                            {"max_new_tokens": NEW_TOKENS, "num_beams": 1, "no_repeat_ngram_size": 0,
                             "repetition_penalty": 1.0}))
    marks.append(time.time())
    print(json.dumps(marks))


def prefill_rows(model, peer, eight, repeats):
    """The prefix's share of an 8-image caption: GPT-2 reading 8 x P prefix tokens once (Img2GPT), against
    the peer's cross-attention keys and values of its 8 x P encoder tokens (computed once per layer),
    measured and in FLOPs (2 per multiply-add of the weight matrices; attention scores left out)."""
    config = model.lm.config
    with torch.inference_mode():
        prefix = model.prefix(eight)
        encoded = peer.encoder(pixel_values=eight).last_hidden_state
    tokens = prefix.shape[0] * prefix.shape[1]
    width, layers = config.n_embd, config.n_layer
    prefill_flops = 2 * tokens * layers * (4 + 8) * width * width  # attention q, k, v, o and the 4x MLP
    cross_flops = 2 * tokens * layers * 2 * width * width  # cross-attention k and v
    cross = [block.crossattention.c_attn for block in peer.decoder.transformer.h]

    @torch.inference_mode()
    def prefill():
        model.lm(inputs_embeds=prefix, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def cross_keys_values():
        for layer in cross:
            layer(encoded)
    return median_time(prefill, repeats), prefill_flops, median_time(cross_keys_values, repeats), cross_flops


def reset_peak_memory():
    """Start the peak resident memory (VmHWM) afresh, so it counts what comes next, not the model loading
    (4-bit loading reads the full-precision weights first). False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(task, quantize, checkpoint, repeats, compute_dtype):
    """One measurement in this process: 'train' (images/s of LoRA training steps at batch 8 on the model as
    training_script builds it) or 'caption' (seconds per 1-image caption on the model as inference rebuilds
    it). compute_dtype "bfloat16" / "float32" is what choose_precision would pick in 4-bit on a CPU with /
    without bf16 instructions. Prints {"value", "peak_mb", "parameters_mb"}: the peak resident memory from
    after loading to the end, and the bytes of the parameters (4-bit ones packed, two to a byte)."""
    ts.cpu_has_native_bf16 = lambda: compute_dtype == "bfloat16"
    state = ts.load_checkpoint(checkpoint)
    cpu = torch.device("cpu")
    if task == "train":
        model, _, _, _ = ts.build_model(state["config"], cpu, quantize=quantize)
    else:
        model, _, _ = ts.rebuild_from_checkpoint(state, cpu, quantize=quantize)
    size = model.vision.config.image_size
    parameters_mb = sum(t.numel() * t.element_size() for t in model.parameters()) / 1e6
    reset_peak_memory()
    if task == "train":
        value = training_throughput(model, size, 8, repeats)
    else:
        value = caption_time(model, fixed_length_tokenizer(0), torch.rand(1, 3, size, size), repeats)
    print(json.dumps({"value": value, "peak_mb": peak_memory_mb(), "parameters_mb": parameters_mb}))


def measure_in_process(task, quantize, checkpoint, repeats, compute_dtype, mode="shared",
                       per_image=CAPTIONS_PER_IMAGE):
    command = [sys.executable, __file__, "--worker", task, "--quantize", quantize, "--checkpoint", str(checkpoint),
               "--repeats", str(repeats), "--compute-dtype", compute_dtype, "--mode", mode, "--per-image",
               str(per_image)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark worker {command[2:]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_here(task, quantize, checkpoint, repeats, compute_dtype, mode="shared", per_image=CAPTIONS_PER_IMAGE):
    """measure_in_process's measurement in this process (--smoke: it checks that the rows are made, in seconds
    instead of a minute of process starts; its memory figures are then not the measurement's own)."""
    import contextlib
    import io

    native = ts.cpu_has_native_bf16  # the workers set it to the compute dtype they are told
    try:
        if task == "captions":
            return caption_training_rate(mode, quantize, checkpoint, repeats, compute_dtype, per_image)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            worker(task, quantize, checkpoint, repeats, compute_dtype)
        return json.loads(printed.getvalue().strip().splitlines()[-1])
    finally:
        ts.cpu_has_native_bf16 = native


def qlora_rows(vit_config, gpt2_config, repeats, measure=measure_in_process):
    """4-bit vs full-precision LoRA on the CPU: training speed (with each 4-bit compute dtype) and memory,
    caption latency and memory. The default compute dtype is this CPU's (choose_precision)."""
    native = "bfloat16" if ts.cpu_has_native_bf16() else "float32"
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = save_base_models(vit_config, gpt2_config, folder)
        full = measure("train", "none", checkpoint, repeats, native)
        bf16, fp32 = (measure("train", "4bit", checkpoint, repeats, d) for d in ("bfloat16", "float32"))
        caption4, caption_full = (measure("caption", q, checkpoint, repeats, native)
                                  for q in ("4bit", "none"))
    default = bf16 if native == "bfloat16" else fp32
    return [
        ("training images/s, batch 8, 4-bit NF4 LoRA, bf16 compute", f"{bf16['value']:.2f}",
         f"full-precision LoRA: {full['value']:.2f}", f"{bf16['value'] / full['value']:.2f}x"),
        ("training images/s, batch 8, 4-bit NF4 LoRA, fp32 compute", f"{fp32['value']:.2f}",
         f"full-precision LoRA: {full['value']:.2f}", f"{fp32['value'] / full['value']:.2f}x"),
        (f"training peak memory (RSS), batch 8, 4-bit ({ts.choose_precision(torch.device('cpu'), '4bit')[1]})",
         f"{default['peak_mb']:.0f} MB", f"full-precision LoRA: {full['peak_mb']:.0f} MB",
         f"{default['peak_mb'] / full['peak_mb']:.2f}x"),
        ("parameter memory, 4-bit (captioning)", f"{caption4['parameters_mb']:.0f} MB",
         f"full precision: {caption_full['parameters_mb']:.0f} MB",
         f"{caption4['parameters_mb'] / caption_full['parameters_mb']:.2f}x"),
        ("caption latency, 1 image, 4-bit", f"{caption4['value']:.3f} s",
         f"full precision, LoRA merged: {caption_full['value']:.3f} s",
         f"{caption4['value'] / caption_full['value']:.2f}x"),
        ("captioning peak memory (RSS), 4-bit", f"{caption4['peak_mb']:.0f} MB",
         f"full precision: {caption_full['peak_mb']:.0f} MB", f"{caption4['peak_mb'] / caption_full['peak_mb']:.2f}x"),
    ]


def training_peer(folder, quantize, compute_dtype):
    """The VisionEncoderDecoder peer as such repos train it: loaded like Img2GPT (4-bit NF4 through
    bitsandbytes, or fp32), with the same LoRA (rank, alpha, dropout; ViT query/value, GPT-2 c_attn)."""
    from peft import prepare_model_for_kbit_training
    from transformers import VisionEncoderDecoderModel

    if quantize == "4bit":
        peer = VisionEncoderDecoderModel.from_pretrained(
            folder / "peer", quantization_config=ts.quantization_config(compute_dtype), device_map={"": "cpu"})
        peer.encoder.pooler = None  # VED rebuilds ViT's unused pooler, absent from the file: never quantized
        prepare_model_for_kbit_training(peer, use_gradient_checkpointing=True,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
        ts.allow_cpu_weight_packing(peer, False)  # as for Img2GPT: the packed CPU kernel has no backward
    else:
        peer = VisionEncoderDecoderModel.from_pretrained(folder / "peer", dtype=torch.float32).requires_grad_(False)
    return ts.apply_lora(peer, ts.find_lora_targets(peer), ts.LORA_R, ts.LORA_ALPHA, ts.LORA_DROPOUT)


def caption_training_rate(mode, quantize, folder, repeats, compute_dtype, per_image):
    """Caption rows/s of LoRA training steps (forward, backward, AdamW) on STEP_IMAGES x per_image captions,
    and the peak resident memory of those steps. mode "shared": Img2GPT now (each image encoded once, its
    captions reading one prefix); "rows": the one-row-per-caption computation it replaced (each caption its
    own [prefix, caption] row); "peer": the VisionEncoderDecoder peer, one (image, caption) pair per row."""
    ts.cpu_has_native_bf16 = lambda: compute_dtype == "bfloat16"
    cpu, dtype = torch.device("cpu"), getattr(torch, compute_dtype)
    images = STEP_IMAGES if per_image > 1 else 10  # one caption each: a batch of 10 rows all the same
    if mode == "peer":
        model = training_peer(Path(folder), quantize, dtype)
        size = model.config.encoder.image_size
    else:
        model, _, _, _ = ts.build_model(ts.load_checkpoint(Path(folder) / "img2gpt.pth")["config"], cpu,
                                        quantize=quantize)
        size = model.vision.config.image_size
    torch.manual_seed(0)
    pixels = torch.rand(images, 3, size, size)
    image_index = torch.arange(images).repeat_interleave(per_image)
    ids = torch.randint(1, 100, (len(image_index), CAPTION_TOKENS))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if mode == "shared":
        inputs.update(pixel_values=pixels, image_index=image_index)
    elif mode == "rows":
        inputs.update(pixel_values=pixels[image_index])
    else:
        inputs = {"pixel_values": pixels[image_index], "labels": ids, "decoder_attention_mask": torch.ones_like(ids)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    reset_peak_memory()

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"value": len(image_index) / median_time(step, repeats), "peak_mb": peak_memory_mb()}


def caption_training_rows(vit_config, gpt2_config, repeats, measure=measure_in_process):
    """Training on 5 captions per image, each measurement in a process of its own: Img2GPT now, the
    one-row-per-caption computation, the VisionEncoderDecoder peer; fp32 LoRA and 4-bit NF4 LoRA (this CPU's
    compute dtype); and one caption per image, now against before."""
    native = "bfloat16" if ts.cpu_has_native_bf16() else "float32"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        save_base_models(vit_config, gpt2_config, folder)
        build_peer(vit_config, gpt2_config).save_pretrained(Path(folder) / "peer")
        for quantize, label in (("none", "fp32 LoRA"), ("4bit", f"4-bit NF4 LoRA, {native} compute")):
            now, rows_, peer = (measure("captions", quantize, folder, repeats, native, mode)
                                for mode in ("shared", "rows", "peer"))
            batch = f"batch {STEP_IMAGES * CAPTIONS_PER_IMAGE} = {STEP_IMAGES} images x {CAPTIONS_PER_IMAGE}"
            rows += [
                (f"training captions/s, {batch}, {label}", f"{now['value']:.2f}",
                 f"VisionEncoderDecoder peer, same LoRA: {peer['value']:.2f}", f"{now['value'] / peer['value']:.2f}x"),
                (f"training captions/s, {batch}, {label}", f"{now['value']:.2f}",
                 f"one row per caption (before): {rows_['value']:.2f}", f"{now['value'] / rows_['value']:.2f}x"),
                (f"training peak memory (RSS), {batch}, {label}", f"{now['peak_mb']:.0f} MB",
                 f"one row per caption: {rows_['peak_mb']:.0f} MB; peer: {peer['peak_mb']:.0f} MB",
                 f"{now['peak_mb'] / rows_['peak_mb']:.2f}x"),
            ]
        single, before = (measure("captions", "none", folder, repeats, native, mode, per_image=1)
                          for mode in ("shared", "rows"))
        rows.append(("training captions/s, batch 10 = 10 images x 1, fp32 LoRA", f"{single['value']:.2f}",
                     f"one row per caption (before): {before['value']:.2f}",
                     f"{single['value'] / before['value']:.2f}x"))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models, one repeat, measurements in this process: only checks it runs")
    parser.add_argument("--only-caption-training", action="store_true",
                        help="only the rows of training on 5 captions per image (the slowest rows)")
    parser.add_argument("--only-streams", action="store_true",
                        help="only the rows of streamed data (WebDataset shards: speed against a folder, memory)")
    parser.add_argument("--worker", choices=("train", "caption", "captions", "stream-memory"),
                        help=argparse.SUPPRESS)  # one measurement
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--per-image", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quantize", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--compute-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--stages", choices=("peft", "fold"), help=argparse.SUPPRESS)  # one per-stage timing
    parser.add_argument("--photo", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "captions":
        return print(json.dumps(caption_training_rate(args.mode, args.quantize, args.checkpoint, args.repeats,
                                                      args.compute_dtype, args.per_image)))
    if args.worker == "stream-memory":
        return stream_memory_worker(args.repeats, args.per_image, int(args.checkpoint))
    if args.worker:
        return worker(args.worker, args.quantize, args.checkpoint, args.repeats, args.compute_dtype)
    if args.stages:
        return stage_worker(args.stages, args.checkpoint, args.photo, args.started)
    repeats = 1 if args.smoke else REPEATS
    vit_config, gpt2_config = configs(args.smoke)
    if args.only_streams:
        print("| measurement | value | compared with | ratio |\n|---|---:|---|---:|")
        for row in stream_rows(vit_config.image_size, args.smoke, repeats):
            print("| " + " | ".join(row) + " |")
        return
    measure = measure_here if args.smoke else measure_in_process
    caption_training = caption_training_rows(vit_config, gpt2_config, 1 if args.smoke else QLORA_REPEATS, measure)
    if args.only_caption_training:
        print("| measurement | value | compared with | ratio |\n|---|---:|---|---:|")
        for row in caption_training:
            print("| " + " | ".join(row) + " |")
        return
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
    streams = stream_rows(size, args.smoke, repeats)
    training_model = build_img2gpt(vit_config, gpt2_config, merged=False)
    checkpoint_bytes, full_bytes = sizes(training_model)
    train_rate = training_throughput(training_model, size, 8, repeats)
    prefill, prefill_flops, cross, cross_flops = prefill_rows(model, peer, eight, repeats)
    del model, peer, pooled, training_model  # the QLoRA rows measure memory in processes of their own
    qlora = qlora_rows(vit_config, gpt2_config, 1 if args.smoke else QLORA_REPEATS, measure)
    whole, stages = whole_process_times(vit_config, gpt2_config, repeats)

    name = "tiny smoke-test models" if args.smoke else "ViT-B/16 (224) + GPT-2 small, random weights"
    print(f"Img2GPT benchmark: {name}; CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.machine()}, bf16 instructions: {'yes' if ts.cpu_has_native_bf16() else 'no'}; "
          f"{NEW_TOKENS} new tokens, greedy; median of {repeats} runs ({QLORA_REPEATS} for the 4-bit rows)\n")
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
        *streams,
        ("checkpoint size", f"{checkpoint_bytes / 1e6:.2f} MB", f"full state_dict: {full_bytes / 1e6:.1f} MB",
         f"{checkpoint_bytes / full_bytes:.2%}"),
        ("training images/s, batch 8, fp32 LoRA", f"{train_rate:.2f}", "", ""),
        *qlora,
        *caption_training,
        *[(f"whole process, caption {count} image{'s' if count > 1 else ''} (start to exit)", f"{ours:.2f} s",
           f"VisionEncoderDecoder peer script: {theirs:.2f} s", f"{ours / theirs:.2f}x")
          for count, (ours, theirs) in whole.items()],
        ("prefix prefill, 8 images (GPT-2 reads 8 x prefix tokens once)",
         f"{prefill:.3f} s", f"peer's cross-attention keys/values: {cross:.3f} s",
         f"{prefill / cross:.2f}x ({prefill_flops / 1e9:.0f} vs {cross_flops / 1e9:.0f} GFLOP)"),
    ]
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\nWhole process, 1 image, by stage (seconds, median):\n\n| stage | before: peft wrap + merge | now: "
          "adapters folded, gc.freeze |\n|---|---:|---:|")
    for stage, before, now in zip(STAGES, stages["peft"], stages["fold"]):
        print(f"| {stage} | {before:.2f} | {now:.2f} |")
    print(f"| total | {sum(stages['peft']):.2f} | {sum(stages['fold']):.2f} |")


if __name__ == "__main__":
    main()
