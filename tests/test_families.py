"""Other encoders and LMs: DINOv2 and CLIP vision towers, a Llama-style LM, the MLP projector."""

import pytest
import torch

import training_script as ts
from conftest import run_script, train_args


def test_lora_targets_and_widths_are_found_for_each_family(families, tiny_models):
    for vision in (families["dinov2"], families["clip"]):
        config = {"vit_model": str(vision), "gpt2_model": str(families["llama"]), "lora_r": 4, "lora_alpha": 8,
                  "lora_dropout": 0.0, "max_caption_tokens": 16, "projector": "mlp"}
        model, tokenizer, _, config = ts.build_model(config, torch.device("cpu"))
        assert config["vision_lora_targets"] == ["q_proj", "v_proj"] and config["lm_lora_targets"] == ["q_proj", "v_proj"]
        assert type(model.vision.get_base_model()).__name__ in ("Dinov2Model", "CLIPVisionModel")  # no text tower
        assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the LM's tokenizer had no pad token
        batch = ts.tokenize_captions(tokenizer, ["a red circle.", "one blue square."], 16)
        loss = model(pixel_values=torch.rand(2, 3, 32, 32), **batch).loss
        loss.backward()
        assert torch.isfinite(loss) and isinstance(model.projection, torch.nn.Sequential)
    assert config["vision_family"] == "clip" and config["lm_family"] == "llama"


def test_unknown_projector_is_refused(tiny_models):
    config = {"vit_model": str(tiny_models[0]), "gpt2_model": str(tiny_models[1]), "lora_r": 4, "lora_alpha": 8,
              "lora_dropout": 0.0, "max_caption_tokens": 16, "projector": "transformer"}
    with pytest.raises(ts.Img2GPTError, match="unknown PROJECTOR 'transformer'"):
        ts.build_model(config, torch.device("cpu"))


def test_dinov2_llama_mlp_trains_and_captions(families, tiny_models, flickr_dir, tmp_path):
    models = (families["dinov2"], families["llama"])
    result = run_script("training_script.py", *train_args(flickr_dir, models, tmp_path, "--epochs", "1",
                                                          "--batch-size", "16", "--projector", "mlp"))
    assert result.returncode == 0, result.stderr[-3000:]
    state = ts.load_checkpoint(tmp_path / "img2gpt_epoch_1.pth")
    assert (state["config"]["vision_family"], state["config"]["lm_family"], state["config"]["projector"]) == (
        "dinov2", "llama", "mlp")
    assert set(state["weights"]["projection"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    image = flickr_dir / "flickr30k_images" / "flickr30k_images" / "1003.jpg"
    result = run_script("inference_script.py", "--weights", tmp_path / "img2gpt_epoch_1.pth", "--image", image,
                        "--device", "cpu", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Image URL: {image}" in result.stdout and "Generated Caption: " in result.stdout

    # Same widths, other family: refused by name before anything is loaded.
    result = run_script("inference_script.py", "--weights", tmp_path / "img2gpt_epoch_1.pth", "--image", image,
                        "--device", "cpu", "--gpt2-model", tiny_models[1])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"trained on a 'llama' language model but '{tiny_models[1]}' is a 'gpt2'" in result.stderr
    assert "Step 1" not in result.stdout
