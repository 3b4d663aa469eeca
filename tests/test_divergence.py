"""A run that diverges ends non-zero with one line, never writes or silently loads NaN weights, and keeps its log
strict JSON."""

import json

import pytest
import torch

import training_script as ts
from conftest import run_script, train_args
from helpers import tiny_config


def strict_records(path):
    """Every line of a log as strict JSON: NaN, Infinity and -Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_diverging_run_ends_non_zero_and_keeps_only_finite_checkpoints(flickr_dir, tiny_models, tmp_path):
    out = tmp_path / "out"
    # A huge learning rate, and MAX_BAD_BATCHES above the batches of an epoch: the skip-and-stop rule never fires.
    result = run_script("training_script.py", *train_args(
        flickr_dir, tiny_models, out, "--epochs", "1", "--batch-size", "8", "--learning-rate", "1e6",
        "--eval-interval", "0", "--save-interval", "2", "--max-bad-batches", "100"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "--learning-rate" in errors[0], errors
    assert not list(out.glob("img2gpt_epoch_*.pth"))
    for path in out.glob("*.pth"):  # what is there loads, and holds finite weights
        weights = ts.load_checkpoint(path)["weights"]
        assert all(torch.isfinite(t).all() for part in weights.values() for t in part.values())
    records = strict_records(out / "training_log.jsonl")
    assert any(r["type"] == "nonfinite" for r in records)


def test_a_checkpoint_with_nan_weights_is_refused_everywhere(tiny_models, tmp_path, flickr_dir):
    model, _, _, config = ts.build_model(tiny_config(tiny_models), torch.device("cpu"))
    ts.save_checkpoint(tmp_path / "good.pth", model, config, {"epoch": 1})
    state = torch.load(tmp_path / "good.pth", weights_only=True)
    next(iter(state["weights"]["lm_lora"].values()))[0, 0] = float("nan")
    torch.save(state, tmp_path / "img2gpt_epoch_1.pth")

    result = run_script("inference_script.py", "--weights", tmp_path / "img2gpt_epoch_1.pth", "--device", "cpu",
                        "--image", flickr_dir / "flickr30k_images" / "flickr30k_images" / "1001.jpg")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "holds NaN or inf weights (lm_lora)" in result.stderr.strip().splitlines()[-1]
    assert "Generated Caption" not in result.stdout

    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("inf"))
    with pytest.raises(ts.Img2GPTError, match="training diverged: the vision_lora weights hold NaN or inf"):
        ts.save_checkpoint(tmp_path / "never.pth", model, config, {"epoch": 2})
    assert not list(tmp_path.glob("never.pth*"))


def test_the_log_stays_strict_json(tmp_path):
    log = ts.JsonlLog(tmp_path / "training_log.jsonl")
    log.write(type="epoch", epoch=1, train_loss=float("nan"), val_loss=float("inf"))
    log.close()
    (record,) = strict_records(tmp_path / "training_log.jsonl")
    assert record == {"type": "epoch", "epoch": 1, "train_loss": None, "val_loss": None}


@pytest.mark.parametrize("key,value", [("lora_r", "8"), ("lora_dropout", "0.05"), ("projection_in", 7.5),
                                       ("vit_model", 3), ("lm_lora_targets", "c_attn"), ("prefix_pool_grid", True)])
def test_a_checkpoint_edited_by_hand_is_refused(tiny_models, tmp_path, key, value):
    model, _, _, config = ts.build_model(tiny_config(tiny_models), torch.device("cpu"))
    ts.save_checkpoint(tmp_path / "good.pth", model, config, {"epoch": 1})
    ts.load_checkpoint(tmp_path / "good.pth")  # as written, it loads
    state = torch.load(tmp_path / "good.pth", weights_only=True)
    state["config"][key] = value
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(ts.Img2GPTError, match=f"has config {key} = {value!r} where a .* belongs: it was edited"):
        ts.load_checkpoint(tmp_path / "edited.pth")
    state = torch.load(tmp_path / "good.pth", weights_only=True)
    state["weights"]["projection"]["weight"] = [[1.0]]
    torch.save(state, tmp_path / "edited_weights.pth")
    with pytest.raises(ts.Img2GPTError, match="weights 'projection' that are not tensors"):
        ts.load_checkpoint(tmp_path / "edited_weights.pth")
