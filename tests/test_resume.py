"""A resume does what it is told: a new --learning-rate or --epochs takes effect from the batch reached and is
said; what the trained weights or the batch order depend on is refused when it differs; moved base models are
named with --vit-model / --gpt2-model."""

import shutil

import pytest

import training_script as ts
from conftest import train_args
from helpers import cli, one_error_line, read_log, runs_of, interrupt_training_at

PEAK = 1e-2


def batch_rates(records, batches_per_epoch):
    """{batch counted over all epochs, from 0: the learning rate it was trained with}."""
    return {(r["epoch"] - 1) * batches_per_epoch + r["step"] - 1: r["lr"] for r in records if r["type"] == "batch"}


@pytest.fixture()
def args(flickr_dir, tiny_models, tmp_path):
    return train_args(flickr_dir, tiny_models, tmp_path / "out", "--batch-size", "8", "--eval-interval", "0",
                      "--learning-rate", str(PEAK), "--save-interval", "3")


def test_new_learning_rate_and_epochs_apply_from_the_batch_reached(args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupt_training_at(monkeypatch, 5)  # saved after batch 3 of epoch 1, then stopped in batch 5
    code, _, _ = cli(capsys, ts, *args, "--epochs", "2")
    assert code != 0 and ts.load_checkpoint(out / "img2gpt_last.pth")["training_state"]["step"] == 3

    code, stdout, err = cli(capsys, ts, *args, "--epochs", "3", "--learning-rate", "1e-3", "--resume", "auto")
    assert code == 0, err
    assert "Changed on resume, from epoch 1 batch 4: --learning-rate 0.01 -> 0.001, --epochs 2 -> 3" in stdout
    first, second = runs_of(read_log(out / "training_log.jsonl"))
    per_epoch = max(r["step"] for r in second if r["type"] == "batch" and r["epoch"] == 1)
    # The saved run (no warm-up, 2 epochs) stood at (2B - 3) / 2B of its peak after 3 batches; from there the
    # rate runs under the new peak in a straight line down to 0 at the end of the new 3 epochs.
    standing = (2 * per_epoch - 3) / (2 * per_epoch)
    expected = {t: 1e-3 * standing * (3 * per_epoch - t) / (3 * per_epoch - 3) for t in range(3, 3 * per_epoch)}
    assert batch_rates(second, per_epoch) == pytest.approx(expected, rel=1e-6)
    assert batch_rates(first, per_epoch)[2] == pytest.approx(PEAK * (2 * per_epoch - 2) / (2 * per_epoch))
    assert f"Learning rate now {1e-3 * standing:.3g} (peak 0.001)" in stdout and "end of epoch 3" in stdout
    assert second[0]["changed"] == {"learning_rate": [0.01, 0.001], "num_epochs": [2, 3]}
    assert ts.load_checkpoint(out / "img2gpt_epoch_3.pth")["epoch"] == 3


def test_epochs_added_to_a_finished_run_start_from_the_peak(args, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(capsys, ts, *args, "--epochs", "1")[0] == 0
    code, stdout, err = cli(capsys, ts, *args, "--epochs", "2", "--resume", "auto")
    assert code == 0, err
    assert "Changed on resume, from epoch 2 batch 1: --epochs 1 -> 2" in stdout
    assert "the added epochs start again from the peak" in stdout
    first, second = runs_of(read_log(out / "training_log.jsonl"))
    per_epoch = max(r["step"] for r in first if r["type"] == "batch")
    rates = batch_rates(second, per_epoch)
    # The finished schedule ended at 0, where the added epoch would learn nothing.
    assert rates == pytest.approx({t: PEAK * (2 * per_epoch - t) / per_epoch for t in range(per_epoch, 2 * per_epoch)})
    code, stdout, _ = cli(capsys, ts, *args, "--epochs", "2", "--resume", "auto")  # the same command again
    assert code == 0 and "is complete" in stdout and "Changed on resume" not in stdout


def test_an_unchanged_resume_says_nothing_changed(args, tmp_path, monkeypatch, capsys):
    interrupt_training_at(monkeypatch, 5)
    cli(capsys, ts, *args, "--epochs", "2")
    code, stdout, err = cli(capsys, ts, *args, "--epochs", "2", "--resume", "auto")
    assert code == 0 and "Resuming from" in stdout and "Changed on resume" not in stdout, err
    second = runs_of(read_log(tmp_path / "out" / "training_log.jsonl"))[1]
    assert second[0]["changed"] == {}


@pytest.mark.parametrize("flags, message", [
    (("--lora-r", "16"), "--lora-r 16 differs from the run's 8, which its trained weights depend on: resume "
                         "with --lora-r 8"),
    (("--lora-alpha", "32"), "--lora-alpha 32 differs from the run's 16"),
    (("--projector", "mlp"), "--projector 'mlp' differs from the run's 'linear'"),
    (("--prefix-pool-grid", "2"), "--prefix-pool-grid 2 differs from the run's 0"),
    (("--max-caption-tokens", "20"), "--max-caption-tokens 20 differs from the run's 40"),
    (("--warmup-steps", "5"), "--warmup-steps 5 differs from the run's 0, which its schedule depends on"),
    (("--val-images", "1"), "the training images differ from the run's"),
    (("--seed", "7"), "resume with the run's own --batch-size 8, --seed 42"),
])
def test_resume_refuses_what_the_run_depends_on(args, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert cli(capsys, ts, *args, "--epochs", "1")[0] == 0
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    code, _, err = cli(capsys, ts, *args, "--epochs", "2", *flags, "--resume", "auto")
    assert code == 1 and message in one_error_line(err)
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before


def test_resume_refuses_a_base_model_of_another_family(args, families, tmp_path, capsys):
    assert cli(capsys, ts, *args, "--epochs", "1")[0] == 0
    code, _, err = cli(capsys, ts, *args, "--epochs", "2", "--gpt2-model", families["llama"], "--resume", "auto")
    assert code == 1 and "trained on a 'gpt2' language model but" in one_error_line(err)


def test_moved_base_models_are_named_on_resume(flickr_dir, tiny_models, tmp_path, capsys):
    before, after = tmp_path / "models", tmp_path / "moved"
    copies = [shutil.copytree(folder, before / folder.name) for folder in tiny_models]
    out = tmp_path / "out"
    assert cli(capsys, ts, *train_args(flickr_dir, copies, out, "--epochs", "1", "--batch-size", "8",
                                       "--eval-interval", "0"))[0] == 0
    before.rename(after)
    # Without the flags the checkpoint's own names are used: they are gone.
    common = ["--data-dir", flickr_dir, "--output-dir", out, "--device", "cpu", "--num-workers", "0",
              "--warmup-steps", "0", "--no-eval-after-training", "--batch-size", "8", "--eval-interval", "0",
              "--epochs", "2", "--resume", "auto"]
    code, _, err = cli(capsys, ts, *common)
    assert code == 1 and str(before / tiny_models[0].name) in one_error_line(err)
    moved = [after / folder.name for folder in tiny_models]
    code, stdout, err = cli(capsys, ts, *common, "--vit-model", moved[0], "--gpt2-model", moved[1])
    assert code == 0 and "Resuming from" in stdout, err
    assert ts.load_checkpoint(out / "img2gpt_epoch_2.pth")["config"]["vit_model"] == str(moved[0])
