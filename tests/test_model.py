"""Model stages: LoRA targets on the installed transformers, precision choice, flags and checkpoints."""

import subprocess
import sys

import pytest
import torch

import training_script as ts
from conftest import ROOT
from helpers import tiny_config


def test_lora_targets_are_found_on_the_installed_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8), add_pooling_layer=False)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100))
    vit_targets = ts.find_lora_targets(vit)
    assert vit_targets in (["q_proj", "v_proj"], ["query", "value"])  # names before / since transformers 5.9
    assert ts.find_lora_targets(gpt2) == ["c_attn"]
    for model, targets in ((vit, vit_targets), (gpt2, ["c_attn"])):
        wrapped = ts.apply_lora(model, targets, r=4, alpha=8, dropout=0.0)
        adapted = [n for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and n.rsplit(".", 1)[-1] in targets]
        assert len(adapted) == 2 * len(targets)  # every layer's projections got an adapter
        trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


def test_no_lora_target_is_a_clear_error():
    with pytest.raises(ts.Img2GPTError, match="no attention projection"):
        ts.find_lora_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_conv1d_gets_fan_in_fan_out_only_where_present():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = ts.apply_lora(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)), ["c_attn"], 4, 8, 0.0)
    assert gpt2.peft_config["default"].fan_in_fan_out is True
    linear = ts.apply_lora(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4)}), ["q_proj"], 4, 8, 0.0)
    assert linear.peft_config["default"].fan_in_fan_out is False


def test_precision_choice(monkeypatch):
    assert ts.choose_precision(torch.device("cpu")) == (False, torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4
    assert ts.choose_precision(torch.device("cuda")) == (True, torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100
    assert ts.choose_precision(torch.device("cuda")) == (True, torch.bfloat16)


def test_quantization_config_is_nf4_double_quant():
    config = ts.quantization_config(torch.float16)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float16
    assert not config.llm_int8_skip_modules  # keeps transformers' default protected modules (GPT-2's lm_head)
    assert ts.quantization_config(torch.bfloat16) is not config


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ts.Img2GPTError, match="--device cpu"):
        ts.resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="4-bit bitsandbytes needs a CUDA GPU")
def test_4bit_model_builds_and_trains_on_cuda(tiny_models):
    model, tokenizer, _, config = ts.build_model(tiny_config(tiny_models), torch.device("cuda"))
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.lm.modules())
    batch = ts.tokenize_captions(tokenizer, ["a red circle."], 16)
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.autocast("cuda", dtype=ts.choose_precision(torch.device("cuda"))[1]):
        loss = model(pixel_values=torch.rand(1, 3, 32, 32, device="cuda"), **batch).loss
    loss.backward()
    grads = [p.grad for n, p in model.vision.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)  # use_reentrant=False keeps ViT LoRA grads


def test_flags_mirror_the_constants():
    cfg = ts.parse_config(ts.CONSTANTS, [], ts.FLAG_ALIASES)
    assert cfg.batch_size == ts.BATCH_SIZE and cfg.num_epochs == ts.NUM_EPOCHS and cfg.data_dir is None
    argv = ["--data-dir", "d", "--vit-model", "v", "--gpt2-model", "g", "--epochs", "2", "--batch-size", "3",
            "--eval-interval", "4", "--learning-rate", "0.5", "--output-dir", "o", "--device", "cpu", "--lora-r", "2"]
    cfg = ts.parse_config(ts.CONSTANTS, argv, ts.FLAG_ALIASES)
    assert (cfg.data_dir, cfg.vit_model_name, cfg.gpt2_model_name, cfg.num_epochs, cfg.batch_size) == ("d", "v", "g", 2, 3)
    assert (cfg.eval_interval, cfg.learning_rate, cfg.output_dir, cfg.device_choice, cfg.lora_r) == (4, 0.5, "o", "cpu", 2)
    assert ts.parse_config(ts.CONSTANTS, ["--num-epochs", "5"], ts.FLAG_ALIASES).num_epochs == 5
    with pytest.raises(SystemExit):
        ts.parse_config(ts.CONSTANTS, ["--batch-sise", "3"], ts.FLAG_ALIASES)


def test_help_lists_every_flag_with_its_default():
    for script in ("training_script.py", "inference_script.py"):
        result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        help_text = " ".join(result.stdout.split())
        if script == "training_script.py":
            for flag in ("--data-dir", "--vit-model", "--gpt2-model", "--epochs", "--batch-size", "--eval-interval",
                         "--learning-rate", "--output-dir", "--device"):
                assert flag in help_text
            assert "(default: 16)" in help_text and "LoRA rank" in help_text
        else:
            for flag in ("--weights", "--image", "--device", "--vit-model", "--gpt2-model"):
                assert flag in help_text


def test_checkpoint_holds_only_trained_weights_and_restores_them(tiny_models, tmp_path):
    model, tokenizer, _, config = ts.build_model(tiny_config(tiny_models), torch.device("cpu"))
    for name, param in model.named_parameters():  # move the zero-initialised LoRA B away from zero
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.1)
    path = tmp_path / "img2gpt_epoch_1.pth"
    ts.save_checkpoint(path, model, config, {"epoch": 1})
    state = torch.load(path, weights_only=True)
    assert state["config"]["vision_lora_targets"] and state["config"]["projection_in"] == 32
    keys = [k for part in state["weights"].values() for k in part]
    assert keys and all("lora_" in k for part in ("vision_lora", "lm_lora") for k in state["weights"][part])
    assert set(state["weights"]["projection"]) == {"weight", "bias"}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for part in state["weights"].values() for t in part.values()) == trainable

    fresh, _, _, _ = ts.build_model(state["config"], torch.device("cpu"))
    pixels, batch = torch.rand(1, 3, 32, 32), ts.tokenize_captions(tokenizer, ["a red circle."], 16)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(model(pixel_values=pixels, **batch).logits, fresh(pixel_values=pixels, **batch).logits)
        ts.load_trained_weights(fresh, state["weights"])
        assert torch.allclose(model(pixel_values=pixels, **batch).logits, fresh(pixel_values=pixels, **batch).logits)

    del state["weights"]["lm_lora"][next(iter(state["weights"]["lm_lora"]))]
    with pytest.raises(ts.Img2GPTError, match="missing"):
        ts.load_trained_weights(fresh, state["weights"])


def test_checkpoint_from_other_base_models_is_refused(tiny_models, tmp_path):
    _, _, _, config = ts.build_model(tiny_config(tiny_models), torch.device("cpu"))
    with pytest.raises(ts.Img2GPTError, match="projection_in is 768"):
        ts.build_model({**config, "projection_in": 768}, torch.device("cpu"))


def randomized_model(models):
    model, tokenizer, _, config = ts.build_model(tiny_config(models), torch.device("cpu"))
    torch.manual_seed(0)
    for param in model.parameters():  # LoRA B starts at zero: give the adapters something to merge
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.2)
    return model.eval(), tokenizer


def test_merged_lora_gives_the_same_outputs(tiny_models):
    model, tokenizer = randomized_model(tiny_models)
    pixels, batch = torch.rand(2, 3, 32, 32), ts.tokenize_captions(tokenizer, ["a red circle.", "one cat."], 16)
    with torch.no_grad():
        before = model(pixel_values=pixels, **batch).logits
        ts.merge_lora(model)
        after = model(pixel_values=pixels, **batch).logits
    assert not any("lora_" in name for name, _ in model.named_parameters())
    assert torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("projector", ["linear", "mlp"])
def test_folded_adapters_equal_peft_merge_bit_for_bit(tiny_models, tmp_path, projector):
    """rebuild_from_checkpoint folds the saved LoRAs into the base weights without peft; the reference is peft's
    own path: wrap, load the adapters, merge_and_unload."""
    model, tokenizer, _, config = ts.build_model(tiny_config(tiny_models, projector=projector), torch.device("cpu"))
    torch.manual_seed(0)
    for param in model.parameters():  # LoRA B starts at zero: give the adapters something to fold
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.2)
    ts.save_checkpoint(tmp_path / "trained.pth", model, config, {"epoch": 1})
    state = ts.load_checkpoint(tmp_path / "trained.pth")
    reference, _, _, _ = ts.build_model(state["config"], torch.device("cpu"), quantize="none")
    ts.load_trained_weights(reference, state["weights"])
    reference = ts.merge_lora(reference).eval()
    folded, _, _ = ts.rebuild_from_checkpoint(state, torch.device("cpu"), quantize="none")
    assert not any("lora" in name for name, _ in folded.named_parameters())
    expected = dict(reference.named_parameters())
    assert {name for name, _ in folded.named_parameters()} == set(expected)
    for name, param in folded.named_parameters():
        assert torch.equal(param, expected[name]), name
    pixels = torch.rand(3, 3, 32, 32)
    batch = ts.tokenize_captions(tokenizer, ["a red circle.", "one cat.", "a blue square on white."], 16)
    with torch.no_grad():
        assert torch.equal(folded(pixel_values=pixels, **batch).logits, reference(pixel_values=pixels, **batch).logits)
    assert ts.generate_captions(folded, tokenizer, pixels, 12) == ts.generate_captions(reference, tokenizer, pixels, 12)
    state["weights"]["lm_lora"] = {k: v[:, :2] if "lora_A" in k else v for k, v in state["weights"]["lm_lora"].items()}
    with pytest.raises(ts.Img2GPTError, match="'lm_lora' does not fit the model"):
        ts.rebuild_from_checkpoint(state, torch.device("cpu"), quantize="none")


def test_decoding_settings_reach_generate(tiny_models):
    model, tokenizer = randomized_model(tiny_models)
    pixels = torch.rand(3, 3, 32, 32)
    greedy = ts.generate_captions(model, tokenizer, pixels, max_new_tokens=12)
    beams = ts.generate_captions(model, tokenizer, pixels, max_new_tokens=12, num_beams=4)
    assert len(greedy) == len(beams) == 3
    seen = {}
    generate = model.lm.generate
    model.lm.generate = lambda **kwargs: seen.update(kwargs) or generate(**kwargs)
    ts.generate_captions(model, tokenizer, pixels, max_new_tokens=5, num_beams=2, no_repeat_ngram_size=3,
                         repetition_penalty=1.5)
    settings = ("max_new_tokens", "num_beams", "no_repeat_ngram_size", "repetition_penalty")
    assert tuple(seen[k] for k in settings) == (5, 2, 3, 1.5)
    assert seen["eos_token_id"] == tokenizer.eos_token_id and seen["attention_mask"].shape == (3, 17)
    cfg = ts.parse_config(ts.CONSTANTS, ["--num-beams", "3", "--no-repeat-ngram-size", "2",
                                         "--repetition-penalty", "1.3", "--max-new-tokens", "9"], ts.FLAG_ALIASES)
    assert ts.decoding_settings(cfg) == {"max_new_tokens": 9, "num_beams": 3, "no_repeat_ngram_size": 2,
                                         "repetition_penalty": 1.3}


def test_pool_patches_averages_the_patch_grid():
    hidden = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)  # CLS + a 4x4 grid of patches
    pooled = ts.pool_patches(hidden, 2)
    assert pooled.shape == (2, 5, 3)
    assert torch.equal(pooled[:, 0], hidden[:, 0])  # CLS kept as it is
    top_left = hidden[:, 1:][:, [0, 1, 4, 5]].mean(dim=1)  # patches (0,0), (0,1), (1,0), (1,1)
    assert torch.allclose(pooled[:, 1], top_left)
    with pytest.raises(ts.Img2GPTError, match="square patch grid"):
        ts.pool_patches(torch.zeros(1, 1 + 12, 3), 2)


def test_pooled_prefix_is_stored_and_rebuilt(tiny_models, tmp_path):
    model, tokenizer, _, config = ts.build_model(tiny_config(tiny_models, prefix_pool_grid=2), torch.device("cpu"))
    assert model.prefix(torch.rand(1, 3, 32, 32)).shape == (1, 5, 32)
    ts.save_checkpoint(tmp_path / "pooled.pth", model, config, {"epoch": 1})
    state = ts.load_checkpoint(tmp_path / "pooled.pth")
    assert state["config"]["prefix_pool_grid"] == 2
    rebuilt, _, _, _ = ts.build_model(state["config"], torch.device("cpu"))
    assert rebuilt.pool_grid == 2
    legacy = {k: v for k, v in state["config"].items() if k != "prefix_pool_grid"}  # older checkpoints
    assert ts.build_model(legacy, torch.device("cpu"))[0].pool_grid == 0
    captions = ts.generate_captions(rebuilt, tokenizer, torch.rand(2, 3, 32, 32), max_new_tokens=4)
    assert len(captions) == 2
