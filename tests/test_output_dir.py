"""A run is never lost: a used OUTPUT_DIR is refused unless --resume or --overwrite, --resume auto continues or
starts afresh, one run per folder at a time, broken log lines are skipped, unwritable folders and full disks
are one error line with nothing half-written left behind."""

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import training_script as ts
from conftest import ROOT, run_script, train_args
from helpers import cli, one_error_line


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def starts(folder):
    return [r for r in ts.read_log(Path(folder) / "training_log.jsonl") if r["type"] == "start"]


@pytest.fixture()
def one_epoch(flickr_dir, tiny_models, tmp_path):
    """A complete 1-epoch run in tmp_path/out and the arguments that made it."""
    out = tmp_path / "out"
    args = train_args(flickr_dir, tiny_models, out, "--epochs", "1", "--batch-size", "16", "--eval-interval", "0")
    ts.main(args)
    return out, args


def test_a_used_folder_is_refused_and_resume_auto_says_the_run_is_complete(one_epoch, capsys):
    out, args = one_epoch
    before = snapshot(out)
    assert {"img2gpt_epoch_1.pth", "img2gpt_last.pth", "training_log.jsonl", "loss.png"} <= set(before)
    code, _, err = cli(capsys, ts, *args)  # the same command again: Colab's re-run cell
    line = one_error_line(err)
    assert code == 1 and "already holds a run" in line and "--resume auto" in line and "--overwrite" in line
    assert snapshot(out) == before  # nothing touched

    code, stdout, _ = cli(capsys, ts, *args, "--resume", "auto")
    assert code == 0 and f"The run in '{out}' is complete: all 1 epochs are trained" in stdout
    assert snapshot(out) == before

    code, _, err = cli(capsys, ts, *args, "--resume", "auto", "--overwrite")
    assert code == 1 and "give one of them" in one_error_line(err)


def test_overwrite_starts_afresh_without_the_old_run(one_epoch, capsys):
    out, args = one_epoch
    (out / "img2gpt_epoch_7.pth").write_bytes(b"an epoch of the old run")  # the new run will not write it
    code, stdout, _ = cli(capsys, ts, *args, "--overwrite")
    assert code == 0 and "--overwrite: deleted 5 file(s) of the previous run" in stdout
    assert not (out / "img2gpt_epoch_7.pth").exists()
    assert len(starts(out)) == 1  # loss.png is drawn from this run's log only
    assert ts.load_checkpoint(out / "img2gpt_epoch_1.pth")["epoch"] == 1


def test_resume_auto_starts_afresh_in_an_empty_folder(flickr_dir, tiny_models, tmp_path):
    out = tmp_path / "new" / "nested"
    result = run_script("training_script.py", *train_args(flickr_dir, tiny_models, out, "--epochs", "1",
                                                          "--batch-size", "16", "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--resume auto: no img2gpt_last.pth, starting afresh" in result.stdout
    (start,) = starts(out)
    assert start["resumed_from"] is None and (out / "img2gpt_epoch_1.pth").is_file()


def wait_for(condition, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_second_run_is_refused_while_the_first_holds_the_folder(flickr_dir, tiny_models, tmp_path):
    out = tmp_path / "out"
    args = train_args(flickr_dir, tiny_models, out, "--epochs", "200", "--batch-size", "16", "--eval-interval", "0",
                      "--save-interval", "1")
    first = subprocess.Popen([sys.executable, str(ROOT / "training_script.py"), *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (out / "img2gpt_last.pth").exists()), "the first run did not start training"
        second = run_script("training_script.py", *args, "--resume", "auto")
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"another training run (pid {first.pid}) is writing to '{out}'" in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # A killed run leaves no lock behind: the next run continues it.
    third = run_script("training_script.py", *train_args(flickr_dir, tiny_models, out, "--epochs", "1",
                                                         "--batch-size", "16", "--eval-interval", "0",
                                                         "--save-interval", "1"), "--resume", "auto")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Resuming from" in third.stdout or "is complete" in third.stdout  # not refused


def test_a_log_line_cut_short_by_a_kill_is_skipped(one_epoch, capsys):
    out, args = one_epoch
    broken = '{"type": "batch", "epoch": 1, "st'  # what a kill in the middle of a write leaves
    with open(out / "training_log.jsonl", "a") as log:
        log.write(broken)
    records = ts.read_log(out / "training_log.jsonl")
    assert records and all(isinstance(r, dict) for r in records)
    args = [a if a != "1" else "2" for a in args]  # --epochs 2: one more epoch, drawn from the same log
    code, stdout, err = cli(capsys, ts, *args, "--resume", "auto")
    assert code == 0, err
    assert "Saved" in stdout and (out / "img2gpt_epoch_2.pth").is_file()
    lines = (out / "training_log.jsonl").read_text().splitlines()
    assert lines.count(broken) == 1  # the new run started on a line of its own
    assert all(isinstance(json.loads(line), dict) for line in lines if line != broken)


def test_an_output_dir_that_cannot_be_written_stops_before_the_data(flickr_dir, tiny_models, tmp_path, capsys,
                                                                       monkeypatch):
    loaded = []
    monkeypatch.setattr(ts, "prepare_data", lambda *a, **k: loaded.append(1))
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    code, _, err = cli(capsys, ts, *train_args(flickr_dir, tiny_models, file))
    assert code == 1 and f"--output-dir '{file}' is a file" in one_error_line(err)

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, err = cli(capsys, ts, *train_args(flickr_dir, tiny_models, tmp_path / "ro"))
    assert code == 1 and "cannot write to --output-dir" in one_error_line(err) and "Read-only file system" in err
    assert not loaded


def test_a_full_disk_is_one_error_line_and_leaves_the_last_checkpoint_whole(flickr_dir, tiny_models, tmp_path,
                                                                             capsys, monkeypatch):
    out = tmp_path / "out"
    args = train_args(flickr_dir, tiny_models, out, "--epochs", "1", "--batch-size", "8", "--eval-interval", "0",
                      "--save-interval", "2")
    real_save, saves = torch.save, []

    def filling_save(state, file, *a, **k):
        saves.append(1)
        if len(saves) == 2:  # the second save meets a full disk halfway
            file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, file, *a, **k)

    monkeypatch.setattr(torch, "save", filling_save)
    code, _, err = cli(capsys, ts, *args)
    line = one_error_line(err)
    assert code == 1 and f"could not write '{out / 'img2gpt_last.pth'}' (No space left on device)" in line
    assert not list(out.glob("*.tmp"))  # no stray temporary file
    assert ts.load_checkpoint(out / "img2gpt_last.pth")["training_state"]["step"] == 2  # the previous save
