"""Every numeric setting is checked at start, in both scripts: a value out of range is one error line that names
the flag and what is allowed, before any data or model is loaded."""

import pytest

import inference_script
import training_script as ts
from conftest import train_args
from helpers import cli, one_error_line

TRAINING_CASES = [
    ("--batch-size", "0"), ("--batch-size", "-3"), ("--epochs", "0"), ("--learning-rate", "nan"),
    ("--learning-rate", "inf"), ("--learning-rate", "-0.0001"), ("--lora-r", "0"), ("--lora-alpha", "0"),
    ("--lora-dropout", "1"), ("--lora-dropout", "-0.1"), ("--val-images", "-1"), ("--test-images", "-5"),
    ("--max-new-tokens", "0"), ("--num-beams", "0"), ("--repetition-penalty", "0"),
    ("--no-repeat-ngram-size", "-1"), ("--max-caption-tokens", "1"), ("--num-workers", "-1"),
    ("--warmup-steps", "-1"), ("--eval-interval", "-1"), ("--num-sample-images", "-1"), ("--save-interval", "-1"),
    ("--max-bad-batches", "0"), ("--prefix-pool-grid", "-2"), ("--seed", "-1"),
]
INFERENCE_CASES = [
    ("--request-timeout", "0"), ("--max-image-bytes", "0"), ("--max-new-tokens", "0"), ("--num-beams", "0"),
    ("--repetition-penalty", "0"), ("--no-repeat-ngram-size", "-2"), ("--batch-size", "0"), ("--web-port", "70000"),
]


@pytest.fixture()
def nothing_loads(monkeypatch):
    """Fails the test if a script gets as far as reading data, a checkpoint or a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded something before checking the settings")

    for name in ("prepare_data", "load_checkpoint", "build_model"):
        monkeypatch.setattr(ts, name, refuse)
    monkeypatch.setattr(inference_script, "load_checkpoint", refuse)


@pytest.mark.parametrize("flag,value", TRAINING_CASES)
def test_training_refuses_a_setting_out_of_range(flag, value, flickr_dir, tiny_models, tmp_path, capsys,
                                                 nothing_loads):
    code, _, err = cli(capsys, ts, *train_args(flickr_dir, tiny_models, tmp_path / "out"), flag, value)
    line = one_error_line(err)
    assert code == 1 and line.startswith(f"error: {flag} ") and "is out of range: give " in line, line
    assert not (tmp_path / "out").exists()  # nothing was written either


@pytest.mark.parametrize("flag,value", INFERENCE_CASES)
def test_inference_refuses_a_setting_out_of_range(flag, value, capsys, nothing_loads):
    code, _, err = cli(capsys, inference_script, "--weights", "w.pth", "--device", "cpu", flag, value)
    line = one_error_line(err)
    assert code == 1 and line.startswith(f"error: {flag} ") and "is out of range: give " in line, line


def test_an_empty_image_is_refused_not_the_current_folder(capsys, nothing_loads):
    code, _, err = cli(capsys, inference_script, "--weights", "w.pth", "--device", "cpu", "--image", "  ")
    assert code == 1 and "--image '' names no image" in one_error_line(err)


@pytest.mark.parametrize("module,rules", [(ts, ts.TRAINING_RULES), (inference_script, inference_script.SETTING_RULES)])
def test_every_numeric_setting_has_a_range(module, rules):
    numeric = {name.lower() for name, value in module.CONSTANTS.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    assert numeric == set(rules)


def test_values_at_the_edges_of_the_ranges_are_accepted():
    cfg = ts.parse_config(ts.CONSTANTS, ["--lora-dropout", "0", "--val-images", "0", "--eval-interval", "0",
                                         "--max-caption-tokens", "2", "--seed", "0", "--save-interval", "0"],
                          ts.FLAG_ALIASES)
    ts.check_settings(cfg, ts.TRAINING_RULES, ts.FLAG_ALIASES)
