"""Training on streamed data end to end: shards in a folder (interrupted and resumed: by keys, exactly the rest),
over HTTP, a local Hugging Face parquet dataset, and two processes under accelerate; each learns, checkpoints,
and its checkpoint captions."""

import functools
import http.server
import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter

import pytest

import training_script as ts
from conftest import ROOT, draw_shape, run_script, train_args
from helpers import cli, config_of, interrupt_training_at, read_log, runs_of
from streams import shape_samples, write_hf_dataset, write_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_shards")
    write_shards(folder, shape_samples(64, seed=3), 5)
    return folder


def epoch_losses(records):
    return {r["epoch"]: r["train_loss"] for r in records if r["type"] == "epoch"}


def batch_keys(records, epoch):
    return Counter(key for r in records if r["type"] == "batch" and r["epoch"] == epoch for key in r["keys"])


def test_shards_train_and_a_resume_reads_exactly_the_rest(shard_dir, tiny_models, tmp_path, monkeypatch, capsys):
    args = train_args(shard_dir, tiny_models, tmp_path / "out", "--batch-size", "4", "--num-workers", "2",
                      "--eval-interval", "0", "--save-interval", "3", "--learning-rate", "1e-2", "--epochs", "3")
    interrupt_training_at(monkeypatch, 5)  # saved after batch 3 of epoch 1, stopped in batch 5
    code, _, _ = cli(capsys, ts, *args)
    assert code != 0
    monkeypatch.undo()
    code, stdout, err = cli(capsys, ts, *args, "--resume", "auto")
    assert code == 0, err
    assert "Resuming from" in stdout and "after batch 3" in stdout
    first, second = runs_of(read_log(tmp_path / "out" / "training_log.jsonl"))
    saved = Counter(key for r in first if r["type"] == "batch" and r["step"] <= 3 for key in r["keys"])
    data = ts.prepare_data(config_of("--data-dir", shard_dir), main=False)
    resumed = batch_keys(second, 1)
    assert not saved & resumed and sum(saved.values()) == 12  # 3 batches of 4
    held = set(data.splits["val"] + data.splits["test"])
    expected = Counter(f"{shard:05d}/{shard:05d}{k:04d}" for shard in range(5) for k in range(13 if shard < 4 else 12))
    expected = Counter({name: 1 for name in expected if name not in held})
    assert saved + resumed == expected  # every training sample of epoch 1, once
    assert batch_keys(second, 2) == expected == batch_keys(second, 3)
    losses = epoch_losses(second)
    assert losses[3] < losses[1]  # it learns
    assert sorted(p.name for p in (tmp_path / "out").glob("*.pth")) == [
        "img2gpt_epoch_1.pth", "img2gpt_epoch_2.pth", "img2gpt_epoch_3.pth", "img2gpt_last.pth"]


@pytest.fixture()
def http_shards(shard_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shard_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{{00000..00004}}.tar"
    server.shutdown()


def test_shards_over_http_train_like_local_ones(http_shards, shard_dir, tiny_models, tmp_path, capsys):
    common = ("--batch-size", "4", "--num-workers", "2", "--eval-interval", "0", "--epochs", "2")
    code, stdout, err = cli(capsys, ts, *train_args(http_shards, tiny_models, tmp_path / "web", *common))
    assert code == 0, err
    code, _, err = cli(capsys, ts, *train_args(shard_dir, tiny_models, tmp_path / "local", *common))
    assert code == 0, err
    web, local = (read_log(tmp_path / name / "training_log.jsonl") for name in ("web", "local"))
    assert [r.get("keys") for r in web if r["type"] == "batch"] == [r.get("keys") for r in local
                                                                     if r["type"] == "batch"]
    assert epoch_losses(web) == pytest.approx(epoch_losses(local))  # the same samples, the same training
    image = tmp_path / "picture.jpg"
    draw_shape("red", "circle", random.Random(0)).save(image)
    result = run_script("inference_script.py", "--weights", tmp_path / "web" / "img2gpt_epoch_2.pth", "--image",
                        image, "--device", "cpu", "--max-new-tokens", "5")
    assert result.returncode == 0 and "Generated Caption:" in result.stdout, result.stderr[-2000:]


def test_a_hugging_face_parquet_dataset_trains_and_evaluates(tiny_models, tmp_path, capsys):
    folder = write_hf_dataset(tmp_path / "hf", shape_samples(40, seed=5), 3, split_column=True)
    code, stdout, err = cli(capsys, ts, "--hf-dataset", folder, *train_args(
        "", tiny_models, tmp_path / "out", "--batch-size", "8", "--eval-interval", "4", "--epochs", "2",
        "--learning-rate", "1e-2", "--eval-after-training")[2:])
    assert code == 0, err
    assert "Split: the data's own split" in stdout and "Images train/val/test: 24/8/8, training captions: 120" in stdout
    assert "Sample captions after epoch 1 step 4:" in stdout
    records = read_log(tmp_path / "out" / "training_log.jsonl")
    losses = epoch_losses(records)
    assert losses[2] < losses[1]
    report = json.loads((tmp_path / "out" / "eval_img2gpt_epoch_2.json").read_text())
    assert report["test_images"] == 8 and all(len(c["references"]) == 5 for c in report["captions"])
    assert (tmp_path / "out" / "eval_img2gpt_epoch_2.html").read_text().count("<img") == 8


def test_two_processes_train_on_shards_in_lockstep(shard_dir, tiny_models, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "training_script.py"),
               *train_args(shard_dir, tiny_models, tmp_path, "--epochs", "2", "--batch-size", "4",
                           "--num-workers", "2", "--eval-interval", "3", "--save-interval", "2")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Counting the samples of") == 1  # one counting pass, sent to the other process
    assert result.stdout.count("Epoch 2: average train loss") == 1
    records = read_log(tmp_path / "training_log.jsonl")
    cfg = config_of("--data-dir", shard_dir, "--batch-size", "4", "--num-workers", "2")
    data = ts.prepare_data(cfg, main=False)
    for epoch in (1, 2):
        mine = ts.train_batches(data, None, cfg, epoch, 0, 2)
        steps = [r["step"] for r in records if r["type"] == "batch" and r["epoch"] == epoch]
        assert steps == list(range(1, len(mine) + 1))  # the main process's steps: its planned batches, all
        assert len(mine) == len(ts.train_batches(data, None, cfg, epoch, 1, 2))
    state = ts.load_checkpoint(tmp_path / "img2gpt_last.pth")["training_state"]
    assert state["processes"] == 2 and state["epoch"] == 3
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["img2gpt_epoch_1.pth", "img2gpt_epoch_2.pth",
                                                             "img2gpt_last.pth"]
