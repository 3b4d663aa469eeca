"""Data-parallel training: the sampler's shares, and two real processes on the CPU through accelerate."""

import json
import os
import subprocess
import sys

import training_script as ts
from conftest import ROOT, load_layout, run_script, train_args


def test_each_process_gets_its_own_equal_share_of_batches():
    whole = list(ts.EpochBatchSampler(100, 8, seed=1, epoch=3))
    assert len(whole) == 13 and sorted(i for b in whole for i in b) == list(range(100))
    shares = [list(ts.EpochBatchSampler(100, 8, seed=1, epoch=3, rank=r, world=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 6  # lockstep: the 13th batch is left out of this epoch
    assert shares[0] == whole[0:12:2] and shares[1] == whole[1:12:2]
    assert not {i for b in shares[0] for i in b} & {i for b in shares[1] for i in b}
    resumed = list(ts.EpochBatchSampler(100, 8, seed=1, epoch=3, start=4, rank=1, world=2))
    assert resumed == shares[1][4:]


def test_two_processes_train_one_checkpoint(flickr_dir, tiny_models, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # accelerate 1.15 starts a single process for --cpu unless MPI is set up; --multi_gpu runs torchrun, which
    # on a CPU-only machine gives two gloo processes.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "training_script.py"),
               *train_args(flickr_dir, tiny_models, tmp_path, "--epochs", "1", "--batch-size", "8",
                           "--eval-interval", "5")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Epoch 1: average train loss") == 1  # printed by the main process only
    assert result.stdout.count("Sample captions after epoch 1 step 5:") == 1
    records = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    (start,) = [r for r in records if r["type"] == "start"]
    assert start["processes"] == 2
    captions, splits, image_dir = _train_rows(flickr_dir)
    rows = captions[captions["image_name"].isin(set(splits["train"]))]
    dataset = ts.CaptionDataset(zip(rows["image_name"], rows["caption"]), None, None)
    size = len(dataset)
    expected = [list(ts.EpochBatchSampler(dataset.groups, 8, 42, 1, rank=r, world=2))[0] for r in range(2)]
    assert start["first_batches"] == expected and expected[0] != expected[1]  # each its own half
    steps = [r["step"] for r in records if r["type"] == "batch"]
    assert steps == list(range(1, (-(-size // 8)) // 2 + 1))  # half of the epoch's batches each
    assert [p.name for p in sorted(tmp_path.glob("*.pth"))] == ["img2gpt_epoch_1.pth", "img2gpt_last.pth"]

    image = flickr_dir / "flickr30k_images" / "flickr30k_images" / "1004.jpg"
    result = run_script("inference_script.py", "--weights", tmp_path / "img2gpt_epoch_1.pth", "--image", image,
                        "--device", "cpu", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Image URL: {image}" in result.stdout


def _train_rows(flickr_dir):
    """(captions, splits, image_dir) as the training script builds them, to size its dataset."""
    captions, image_dir, _ = load_layout(flickr_dir)
    captions, _ = ts.drop_unusable_images(captions, image_dir, verbose=False)
    splits = ts.split_by_image(captions["image_name"], ts.VAL_IMAGES, ts.TEST_IMAGES, ts.SEED)
    return captions, splits, image_dir
