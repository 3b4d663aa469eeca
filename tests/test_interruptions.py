"""Colab disconnects: a killed run resumes where its last save stopped; a kill during a save loses nothing;
non-finite losses and CUDA out-of-memory stop cleanly."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import training_script as ts
from conftest import ROOT, make_flickr_folder, run_script, train_args
from helpers import cli, one_error_line, read_log, runs_of

RESUME_ARGS = ("--epochs", "4", "--batch-size", "16", "--learning-rate", "1e-2", "--lora-r", "16",
               "--eval-interval", "0", "--save-interval", "10")


@pytest.mark.parametrize("quantize", ["none", "4bit"])
def test_killed_run_resumes_from_its_last_save(request, tmp_path, quantize):
    models = request.getfixturevalue("tiny_models_4bit" if quantize == "4bit" else "tiny_models")
    make_flickr_folder(tmp_path / "data", 96, seed=1, quirks=False)  # 78 train images: 25 batches an epoch
    out, log = tmp_path / "out", tmp_path / "out" / "training_log.jsonl"
    args = train_args(tmp_path / "data", models, out, *RESUME_ARGS, "--quantize", quantize)
    process = subprocess.Popen([sys.executable, str(ROOT / "training_script.py"), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # Kill a few batches after the save at epoch 2 batch 10, so some trained batches are lost.
    while time.monotonic() < deadline and process.poll() is None:
        done = [(r["epoch"], r["step"]) for r in read_log(log) if r["type"] == "batch"] if log.exists() else []
        if done and done[-1] >= (2, 13):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    saved = torch.load(out / "img2gpt_last.pth", weights_only=True)["training_state"]
    saved_at = (saved["epoch"], saved["step"])
    assert (2, 10) <= saved_at < (2, 25)

    result = run_script("training_script.py", *args, "--resume", "auto")  # the notebook's way
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from '{out / 'img2gpt_last.pth'}': epoch {saved_at[0]}, after batch {saved_at[1]}" in result.stdout

    first, second = runs_of(read_log(log))
    assert (second[0]["epoch"], second[0]["step"]) == saved_at and second[0]["resumed_from"]
    before = {(r["epoch"], r["step"]): r["loss"] for r in first if r["type"] == "batch"}
    after = {(r["epoch"], r["step"]): r["loss"] for r in second if r["type"] == "batch"}
    assert min(after) == (saved_at[0], saved_at[1] + 1)  # nothing up to the save is trained twice
    everything = {(epoch, step) for epoch in range(1, 5) for step in range(1, 26)}
    assert {p for p in before if p <= saved_at} | set(after) == everything  # and no batch is skipped
    lost = [p for p in before if p > saved_at]
    assert lost  # batches trained after the save, lost with the kill and trained again
    for position in lost:  # same weights, same batch, same dropout: the same loss
        assert after[position] == pytest.approx(before[position], abs=1e-4), position
    start_level = sum(before[(1, s)] for s in (1, 2, 3)) / 3
    last_before = sum(before[(saved_at[0], saved_at[1] - i)] for i in range(3)) / 3
    first_after = sum(after[(saved_at[0], saved_at[1] + 1 + i)] for i in range(3)) / 3
    print(f"\nloss: first 3 batches {start_level:.3f}, last 3 before the save {last_before:.3f}, "
          f"first 3 resumed {first_after:.3f}; saved at {saved_at}, {len(lost)} batches redone")
    # Close to where it stopped, not back at the level the run started from.
    assert abs(first_after - last_before) < 0.2 * abs(first_after - start_level), (start_level, last_before, first_after)
    steps, losses, val_steps, _ = ts.loss_curves(read_log(log), 25)  # what loss.png draws: each batch once
    assert steps == list(range(1, 101)) and losses[saved_at[0] * 25 - 25 + saved_at[1]] == after[(2, saved_at[1] + 1)]
    assert val_steps == [25, 50, 75, 100] and (out / "loss.png").is_file()
    epochs = [r["epoch"] for r in read_log(log) if r["type"] == "epoch"]
    assert epochs == [1, 2, 3, 4]
    assert all((out / f"img2gpt_epoch_{n}.pth").is_file() for n in range(1, 5))


SAVE_THEN_HANG = textwrap.dedent("""
    import io, sys, time, torch
    sys.path.insert(0, {root!r})
    import training_script as ts
    config = {{"vit_model": {vit!r}, "gpt2_model": {gpt2!r}, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
              "max_caption_tokens": 16}}
    model, _, _, config = ts.build_model(config, torch.device("cpu"))
    ts.save_checkpoint({path!r}, model, config, {{"epoch": 1}})
    real_save = torch.save
    def slow_save(state, file, *args, **kwargs):  # half the bytes reach the disk, then the machine stalls
        buffer = io.BytesIO()
        real_save(state, buffer)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        file.flush()
        print("saving", flush=True)
        time.sleep(600)
    torch.save = slow_save
    ts.save_checkpoint({path!r}, model, config, {{"epoch": 2}})
""")


def test_kill_during_save_keeps_the_previous_checkpoint(tiny_models, tmp_path):
    path = tmp_path / "img2gpt_last.pth"
    code = SAVE_THEN_HANG.format(root=str(ROOT), vit=str(tiny_models[0]), gpt2=str(tiny_models[1]), path=str(path))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "saving"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    (temporary,) = tmp_path.glob("img2gpt_last.pth.*.tmp")  # the writer's own temporary file
    assert temporary.stat().st_size > 0  # killed mid-write
    assert ts.load_checkpoint(path)["epoch"] == 1  # the previous checkpoint is whole


@pytest.fixture()
def small_run(flickr_dir, tiny_models, tmp_path):
    return tmp_path, train_args(flickr_dir, tiny_models, tmp_path, "--epochs", "1", "--batch-size", "8",
                                "--eval-interval", "0", "--save-interval", "2", "--max-bad-batches", "3")


def poison_losses(monkeypatch, bad_calls):
    """Training forward passes numbered in bad_calls return a NaN loss."""
    forward, calls = ts.Img2GPT.forward, []

    def patched(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) in bad_calls:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(ts.Img2GPT, "forward", patched)


def test_one_nan_batch_is_skipped_and_logged(small_run, monkeypatch):
    out, args = small_run
    poison_losses(monkeypatch, {3})
    ts.main(args)
    records = read_log(out / "training_log.jsonl")
    assert [(r["epoch"], r["step"]) for r in records if r["type"] == "nonfinite"] == [(1, 3)]
    steps = [r["step"] for r in records if r["type"] == "batch"]
    assert 3 not in steps and steps[:3] == [1, 2, 4]
    weights = torch.load(out / "img2gpt_epoch_1.pth", weights_only=True)["weights"]
    assert all(torch.isfinite(t).all() for part in weights.values() for t in part.values())


def test_nan_losses_in_a_row_stop_and_keep_the_last_good_checkpoint(small_run, monkeypatch, capsys):
    out, args = small_run
    poison_losses(monkeypatch, set(range(6, 100)))  # batches 1-5 are fine, from 6 on every loss is NaN
    code, _, err = cli(capsys, ts, *args)
    assert code == 1 and "3 non-finite losses in a row at epoch 1 step 8" in one_error_line(err)
    state = ts.load_checkpoint(out / "img2gpt_last.pth")
    assert state["training_state"]["step"] == 4  # the last save before the NaNs
    assert all(torch.isfinite(t).all() for part in state["weights"].values() for t in part.values())
    assert not (out / "img2gpt_epoch_1.pth").exists()


def test_cuda_out_of_memory_names_batch_size(small_run, monkeypatch, capsys):
    def out_of_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ts.Img2GPT, "forward", out_of_memory)
    code, _, err = cli(capsys, ts, *small_run[1])
    assert code == 1 and "BATCH_SIZE 8" in one_error_line(err) and "--batch-size (e.g. 4)" in err


def test_resume_refuses_an_epoch_file_and_a_changed_batch_size(small_run, capsys):
    out, args = small_run
    ts.main(args)
    code, _, err = cli(capsys, ts, *args, "--resume", out / "img2gpt_epoch_1.pth")
    assert code == 1 and "resume from img2gpt_last.pth" in one_error_line(err)
    changed = [a if a != "8" else "4" for a in args]
    code, _, err = cli(capsys, ts, *changed, "--epochs", "2", "--resume", out / "img2gpt_last.pth")  # not complete
    assert code == 1 and "--batch-size 8, --seed 42 and 1 process" in one_error_line(err)
    code, _, err = cli(capsys, ts, *args, "--resume", out / "nope.pth")
    assert code == 1 and "not found" in one_error_line(err)
