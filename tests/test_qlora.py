"""QLoRA on the CPU: bitsandbytes' CPU backend runs the same 4-bit NF4 + LoRA path that CUDA runs in Colab.

The 4-bit tests use the 64-wide tiny models (tiny_models_4bit), the smallest on which bitsandbytes' packed CPU
kernel runs, so inference takes the path a full-size model takes on this machine."""

import re
import sys

import pytest
import torch

import inference_script
import training_script as ts
from conftest import load_layout, run_script, train_args
from helpers import cli, one_error_line, read_log, tiny_config

CPU = torch.device("cpu")
# ViT: q, k, v, o, fc1, fc2 per layer; GPT-2: c_attn, c_proj, c_fc, mlp c_proj per layer (lm_head stays float).
LINEAR4BIT_LAYERS = 2 * 6 + 2 * 4
# Mean KL divergence (nats per caption token) allowed between the full-precision and the 4-bit model of one
# checkpoint: NF4 rounding of the base weights, and bf16 in the packed CPU kernel. It depends on the training
# trajectory: measured on the fixture 0.0006-0.0077 across seeds and data orders (a checkpoint trained in 4-bit
# learns around the rounded weights, so it moves more in full precision), top-1 agreement 91-100%. The same
# checkpoint with one model's trained adapters left out was 0.015-0.56 away (vision) and 0.25-0.66 (language
# model): the precisions must agree ADAPTER_CONTRAST times better than that, which a precision that drops or
# garbles either model's adapters fails.
KL_TOLERANCE = 0.01
ADAPTER_CONTRAST = 5


@pytest.fixture(scope="module")
def runs(flickr_dir, tiny_models_4bit, tmp_path_factory):
    """Two epochs in 4-bit and two in full precision on the Kaggle-shaped fixture, as subprocesses; sample
    captions every 3 batches, so the 4-bit model alternates between captioning and training."""
    results = {}
    for quantize in ("4bit", "none"):
        out = tmp_path_factory.mktemp(f"run_{quantize}")
        result = run_script("training_script.py", *train_args(
            flickr_dir, tiny_models_4bit, out, "--epochs", "2", "--batch-size", "8", "--eval-interval", "3",
            "--learning-rate", "1e-2", "--quantize", quantize))
        assert result.returncode == 0, result.stderr[-3000:]
        results[quantize] = (out, result)
    return results


def test_4bit_epoch_trains_and_saves_the_adapters_of_a_full_precision_run(runs):
    out, result = runs["4bit"]
    compute = ts.choose_precision(CPU, "4bit")[1]  # bf16 where the CPU has bf16 instructions, else fp32
    assert f"Using device: cpu (4-bit QLoRA: {LINEAR4BIT_LAYERS} Linear4bit layers, compute {compute})" in result.stdout
    assert "Sample captions after epoch 1 step 6:" in result.stdout  # captioned, then trained on
    records = read_log(out / "training_log.jsonl")
    (start,) = [r for r in records if r["type"] == "start"]
    assert start["quantize"] == "4bit" and start["linear4bit_layers"] == LINEAR4BIT_LAYERS
    losses = [r["loss"] for r in records if r["type"] == "batch"]
    print(f"\n4-bit losses: {[round(v, 3) for v in losses]}")
    assert len(losses) >= 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3  # it learns

    four_bit = ts.load_checkpoint(out / "img2gpt_epoch_2.pth")
    full = ts.load_checkpoint(runs["none"][0] / "img2gpt_epoch_2.pth")
    assert four_bit["trained_in_4bit"] is True and full["trained_in_4bit"] is False
    (start,) = [r for r in read_log(runs["none"][0] / "training_log.jsonl") if r["type"] == "start"]
    assert start["quantize"] == "none" and start["linear4bit_layers"] == 0
    assert set(four_bit["weights"]) == {"vision_lora", "lm_lora", "projection"}  # adapters and projection only
    for part in four_bit["weights"]:
        shapes = {key: tuple(t.shape) for key, t in four_bit["weights"][part].items()}
        assert shapes == {key: tuple(t.shape) for key, t in full["weights"][part].items()}, part
        assert all(t.dtype == torch.float32 for t in four_bit["weights"][part].values())
    lora_keys = list(four_bit["weights"]["vision_lora"]) + list(four_bit["weights"]["lm_lora"])
    assert lora_keys and all("lora_A" in k or "lora_B" in k for k in lora_keys)


def next_token_logprobs(model, tokenizer, processor, images, captions):
    """log p(caption token i | image, tokens < i) at every caption position, (positions, vocabulary)."""
    pixels = ts.preprocess(processor, [ts.load_image(path) for path in images])
    batch = ts.tokenize_captions(tokenizer, captions, 16)
    with torch.inference_mode():
        logits = model(pixel_values=pixels, **batch).logits.float()
    prefix = logits.shape[1] - batch["input_ids"].shape[1]
    return logits[:, prefix - 1:-1].log_softmax(-1)[batch["attention_mask"].bool()]


def mean_kl(p, q):
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("trained", ["4bit", "none"], ids=["4bit-trained", "full-precision-trained"])
def test_a_checkpoint_gives_the_same_distributions_in_both_precisions(runs, flickr_dir, trained):
    state = ts.load_checkpoint(runs[trained][0] / "img2gpt_epoch_2.pth")
    folder = flickr_dir / "flickr30k_images" / "flickr30k_images"
    images = [folder / f"{1000 + i}.jpg" for i in range(12)]
    captions = load_layout(flickr_dir)[0].drop_duplicates("image_name")
    captions = dict(zip(captions["image_name"], captions["caption"]))
    texts = [captions[path.name] for path in images]

    results = {}
    for quantize in ("none", "4bit"):
        model, tokenizer, processor = ts.rebuild_from_checkpoint(state, CPU, quantize=quantize)
        assert model.quantized == (quantize == "4bit") and (ts.count_4bit_layers(model) > 0) == model.quantized
        results[quantize] = next_token_logprobs(model, tokenizer, processor, images, texts)
        if model.quantized:  # captioning took bitsandbytes' packed CPU kernel wherever this CPU has it
            layers = [m for m in model.modules() if hasattr(m, "cpu_kernel_available")]
            assert layers and all(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                                  == m.cpu_kernel_available for m in layers)
    contrasts = {}
    for part in ("vision_lora", "lm_lora"):  # what a precision that lost one model's adapters would give
        lost = {**state, "weights": {**state["weights"], part: zero_lora_b(state["weights"][part])}}
        model, tokenizer, processor = ts.rebuild_from_checkpoint(lost, CPU, quantize="none")
        contrasts[part] = mean_kl(results["none"], next_token_logprobs(model, tokenizer, processor, images, texts))

    agreement = mean_kl(results["none"], results["4bit"])
    top1 = (results["none"].argmax(-1) == results["4bit"].argmax(-1)).float().mean().item()
    print(f"\n{trained}-trained: KL(full || 4-bit) {agreement:.4f}, top-1 agreement {top1:.1%}; KL(full || without "
          f"vision adapters) {contrasts['vision_lora']:.4f}, (... without LM adapters) {contrasts['lm_lora']:.4f}")
    assert agreement < KL_TOLERANCE
    assert agreement * ADAPTER_CONTRAST < min(contrasts.values())  # far closer than a model missing an adapter
    assert top1 >= 0.85


def zero_lora_b(weights):
    return {key: torch.zeros_like(t) if "lora_B" in key else t for key, t in weights.items()}


def test_4bit_checkpoint_captions_in_both_precisions(runs, flickr_dir):
    image = flickr_dir / "flickr30k_images" / "flickr30k_images" / "1005.jpg"
    captions = {}
    for quantize, step1 in (("4bit", "with 4-bit quantization"), ("none", "in full precision")):
        result = run_script("inference_script.py", "--weights", runs["4bit"][0] / "img2gpt_epoch_2.pth",
                            "--image", image, "--device", "cpu", "--quantize", quantize, "--max-new-tokens", "10")
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"Step 1: Loading tokenizer and base models ({step1})..." in result.stdout
        (captions[quantize],) = re.findall(r"^Generated Caption: (.+)$", result.stdout, re.M)
    print(f"\ncaptions of 1005.jpg: 4-bit {captions['4bit']!r}, full precision {captions['none']!r}")


@pytest.mark.parametrize("vision", ["dinov2", "clip"])
def test_other_families_train_a_step_in_4bit(families, vision):
    config = tiny_config((families[vision], families["llama"]), projector="mlp")
    model, tokenizer, _, config = ts.build_model(config, CPU, quantize="4bit")
    import bitsandbytes as bnb

    for part in (model.vision, model.lm):
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in part.modules())
    # the targets are found among the 4-bit layers, and the adapters sit on them
    assert config["vision_lora_targets"] == ["q_proj", "v_proj"] and config["lm_lora_targets"] == ["q_proj", "v_proj"]
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and isinstance(m.base_layer, bnb.nn.Linear4bit)]
    assert len(adapted) == 2 * 2 + 2 * 2  # q and v in both layers of both models
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    batch = ts.tokenize_captions(tokenizer, ["a red circle.", "one blue square."], 16)
    model.train()
    loss = model(pixel_values=torch.rand(2, 3, 32, 32), **batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in trainable.values())
    optimizer.step()
    # LoRA B starts at zero, so the first step moves B (A's gradient is B-weighted) and the projection
    assert all(not torch.equal(before[n], p) for n, p in trainable.items() if "lora_B" in n or "projection" in n)


def test_4bit_model_trains_after_captioning(tiny_models_4bit):
    """bitsandbytes repacks 4-bit weights for a faster CPU kernel at the first eval forward, and that kernel
    has no backward: a run that captioned samples then failed at its next batch. Training models never repack."""
    model, tokenizer, processor, _ = ts.build_model(tiny_config(tiny_models_4bit), CPU, quantize="4bit")
    pixels = torch.rand(2, 3, 32, 32)
    ts.generate_captions(model, tokenizer, pixels, max_new_tokens=3)
    batch = ts.tokenize_captions(tokenizer, ["a red circle.", "one blue square."], 16)
    model.train()
    model(pixel_values=pixels, **batch).loss.backward()
    # every layer's LoRA B gets a gradient (A's is zero while B is): none is cut off by a packed layer
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(grads) == 2 * 2 + 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_merging_a_4bit_model_is_refused(tiny_models_4bit):
    model, _, _, _ = ts.build_model(tiny_config(tiny_models_4bit), CPU, quantize="4bit")
    with pytest.raises(ValueError, match="round its LoRA weights away"):
        ts.merge_lora(model)


def test_quantize_values_and_precision(monkeypatch):
    assert ts.choose_precision(CPU) == (False, torch.float32)  # auto: full precision on a CPU
    assert ts.choose_precision(CPU, "none") == (False, torch.float32)
    assert ts.choose_precision(CPU, "4bit") == (True, torch.bfloat16 if ts.cpu_has_native_bf16() else torch.float32)
    monkeypatch.setattr(ts, "cpu_has_native_bf16", lambda: False)  # bf16 would be emulated: 23x slower
    assert ts.choose_precision(CPU, "4bit") == (True, torch.float32)
    monkeypatch.setattr(ts, "cpu_has_native_bf16", lambda: True)
    assert ts.choose_precision(CPU, "4bit") == (True, torch.bfloat16)
    assert ts.choose_precision(CPU, "none") == (False, torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4: fp16 + GradScaler
    assert ts.choose_precision(torch.device("cuda"), "auto") == (True, torch.float16)
    assert ts.choose_precision(torch.device("cuda"), "none") == (False, torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100: bf16
    assert ts.choose_precision(torch.device("cuda:1"), "none") == (False, torch.bfloat16)
    with pytest.raises(ts.Img2GPTError, match="unknown QUANTIZE '8bit': use one of auto, 4bit, none"):
        ts.choose_precision(CPU, "8bit")


def test_device_map_names_the_device_used(monkeypatch):
    assert ts.device_map_for(CPU) == {"": "cpu"}  # never GPU 0 on a CPU
    assert ts.device_map_for(torch.device("cuda:1")) == {"": 1}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert ts.device_map_for(torch.device("cuda")) == {"": 3}


def test_missing_or_old_bitsandbytes_is_one_clear_error(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.45.5")
    with pytest.raises(ts.Img2GPTError, match=r"bitsandbytes 0\.46 or newer \(installed: 0\.45\.5\).*--quantize none"):
        ts.require_4bit_support(CPU)
    ts.require_4bit_support(torch.device("cuda"))  # CUDA had 4-bit long before
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed: import raises ImportError
    with pytest.raises(ts.Img2GPTError, match="pip install -U bitsandbytes, or use --quantize none"):
        ts.require_4bit_support(CPU)


def test_bad_quantize_and_missing_bitsandbytes_stop_both_scripts_at_once(flickr_dir, tiny_models, tmp_path,
                                                                          capsys, monkeypatch):
    args = train_args(flickr_dir, tiny_models, tmp_path, "--epochs", "1")
    code, _, err = cli(capsys, ts, *args, "--quantize", "8bit")
    assert code == 1 and "unknown QUANTIZE '8bit'" in one_error_line(err)
    code, _, err = cli(capsys, inference_script, "--weights", tmp_path / "none.pth", "--device", "cpu",
                       "--quantize", "4-bit")
    assert code == 1 and "unknown QUANTIZE '4-bit'" in one_error_line(err)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    loaded = []
    monkeypatch.setattr(ts, "prepare_data", lambda *a, **k: loaded.append(1))
    code, out, err = cli(capsys, ts, *args, "--quantize", "4bit")
    assert code == 1 and "--quantize none" in one_error_line(err) and not loaded  # before the data is read
    assert not list(tmp_path.glob("*.pth"))
