"""The two scripts run as a user runs them: train one epoch on the fixture, caption over HTTP and from a path."""

import json

import pytest
import torch

import training_script as ts
from conftest import run_script, train_args
from helpers import cli

RULE = "=" * 50


@pytest.fixture(scope="module")
def trained(flickr_dir, tiny_models, tmp_path_factory):
    """One epoch of training_script.py on the Kaggle-shaped fixture, as a subprocess."""
    out = tmp_path_factory.mktemp("run")
    result = run_script("training_script.py", *train_args(flickr_dir, tiny_models, out, "--epochs", "1",
                                                          "--batch-size", "8", "--eval-interval", "5",
                                                          "--num-workers", "2",  # as users run it
                                                          "--eval-after-training"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_training_prints_progress_and_writes_checkpoint_and_log(trained):
    out, result = trained
    assert "Left out 2 of 27 images" in result.stdout
    assert "Using device: cpu" in result.stdout
    assert "Sample captions after epoch 1 step 5:" in result.stdout
    assert "Epoch 1: average train loss" in result.stdout and "validation loss" in result.stdout
    assert "epoch 1/1" in result.stderr and "loss=" in result.stderr  # the tqdm bar with the batch loss
    assert (out / "img2gpt_epoch_1.pth").is_file()
    from PIL import Image

    with Image.open(out / "loss.png") as plot:
        assert plot.format == "PNG" and plot.size == (800, 450)
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    batches = [r for r in records if r["type"] == "batch"]
    # 20 train images x 5 captions (+ 2 rows of 2199200615.jpg when it lands in train) at batch size 8.
    assert len(batches) in (13, 14) and [r["step"] for r in batches] == list(range(1, len(batches) + 1))
    assert all({"epoch", "step", "loss", "lr"} <= set(r) for r in batches)
    samples = [r for r in records if r["type"] == "samples"]
    assert len(samples) == 2 and samples[0]["samples"][0]["image"] == samples[1]["samples"][0]["image"]
    assert all(s["reference"] for s in samples[0]["samples"])
    (epoch,) = [r for r in records if r["type"] == "epoch"]
    assert epoch["epoch"] == 1 and epoch["train_loss"] > 0 and epoch["val_loss"] > 0
    assert "Test split (seeded (seed 42), 2 images), img2gpt_epoch_1:" in result.stdout
    scores = json.loads((out / "eval_img2gpt_epoch_1.json").read_text())
    assert scores["test_images"] == 2 and len(scores["captions"]) == 2 and "CIDEr" in scores


def test_checkpoint_opens_weights_only_without_frozen_weights(trained, tiny_models):
    state = torch.load(trained[0] / "img2gpt_epoch_1.pth", weights_only=True)
    assert state["format"] == ts.CHECKPOINT_FORMAT and state["epoch"] == 1
    assert state["config"]["vit_model"] == str(tiny_models[0])
    assert set(state["versions"]) == {"torch", "transformers", "peft"}
    assert state["trained_in_4bit"] is False
    for part in ("vision_lora", "lm_lora"):
        assert state["weights"][part] and all("lora_A" in k or "lora_B" in k for k in state["weights"][part])
    assert not any("lora_" in k for k in state["weights"]["projection"])


def check_result_blocks(stdout, sources):
    blocks = stdout.split(f"{RULE}\n      INFERENCE RESULT\n{RULE}\n")[1:]
    assert len(blocks) == len(sources)
    for block, source in zip(blocks, sources):
        lines = block.splitlines()
        assert lines[0] == f"Image URL: {source}"
        assert lines[1].startswith("Generated Caption: ") and len(lines[1]) > len("Generated Caption: ")
        assert lines[2] == RULE


def test_inference_captions_a_url_and_a_path(trained, image_server, flickr_dir):
    url = f"{image_server}/1005.jpg"
    path = flickr_dir / "flickr30k_images" / "flickr30k_images" / "1006.jpg"
    result = run_script("inference_script.py", "--weights", trained[0] / "img2gpt_epoch_1.pth", "--batch-size", "1",
                        "--image", url, "--image", path, "--device", "cpu", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[:7] == ["Using device: cpu",
                         "Step 1: Loading tokenizer and base models (in full precision)...",
                         "Step 2: Applying the exact same LoRA configurations...",
                         "Step 3: Initializing the combined Img2GPT model...",
                         f"Step 4: Loading trained weights from '{trained[0] / 'img2gpt_epoch_1.pth'}'...",
                         "Model successfully built and ready for inference!", ""]
    assert f"Preprocessing image from URL: {url}" in lines and f"Preprocessing image from path: {path}" in lines
    assert lines.count("Generating caption...") == 2
    check_result_blocks(result.stdout, [url, str(path)])


def test_inference_uses_other_copies_of_the_base_models(trained, tiny_models, flickr_dir, tmp_path):
    import shutil

    vit, gpt2 = shutil.copytree(tiny_models[0], tmp_path / "vit"), shutil.copytree(tiny_models[1], tmp_path / "gpt2")
    state = torch.load(trained[0] / "img2gpt_epoch_1.pth", weights_only=True)
    state["config"].update(vit_model="google/vit-base-patch16-224-in21k", gpt2_model="gpt2")  # unreachable here
    torch.save(state, tmp_path / "hub_names.pth")
    path = flickr_dir / "flickr30k_images" / "flickr30k_images" / "1007.jpg"
    result = run_script("inference_script.py", "--weights", tmp_path / "hub_names.pth", "--image", path,
                        "--device", "cpu", "--vit-model", vit, "--gpt2-model", gpt2, "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    check_result_blocks(result.stdout, [str(path)])


def test_one_bad_image_does_not_stop_the_others(trained, flickr_dir, image_server):
    good = flickr_dir / "flickr30k_images" / "flickr30k_images" / "1008.jpg"
    result = run_script("inference_script.py", "--weights", trained[0] / "img2gpt_epoch_1.pth", "--image",
                        f"{image_server}/no-such.jpg", "--image", good, "--device", "cpu", "--max-new-tokens", "4")
    assert result.returncode == 1
    check_result_blocks(result.stdout, [str(good)])
    assert "404" in result.stderr and "1 of 2 images could not be captioned" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_script("inference_script.py", "--weights", tmp_path / "nope.pth", "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: checkpoint")


def test_kaggle_download_path(monkeypatch, flickr_dir, tiny_models, tmp_path):
    """Without --data-dir the script asks kagglehub for KAGGLE_DATASET and trains on what it returns."""
    import kagglehub

    asked = []
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle, *a, **k: asked.append(handle) or str(flickr_dir))
    argv = train_args(flickr_dir, tiny_models, tmp_path, "--epochs", "1", "--batch-size", "16", "--eval-interval", "0")
    argv = argv[2:]  # drop --data-dir
    ts.main(argv)
    assert asked == [ts.KAGGLE_DATASET]
    assert (tmp_path / "img2gpt_epoch_1.pth").is_file()


def test_failed_download_is_a_clear_error(monkeypatch):
    import kagglehub

    def offline(handle, *args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    with pytest.raises(ts.Img2GPTError, match="--data-dir"):
        ts.download_dataset(ts.KAGGLE_DATASET)


def test_batches_folders_and_url_lists_keep_the_input_order(trained, flickr_dir, image_server, tmp_path, capsys):
    import inference_script

    folder = tmp_path / "pictures"
    folder.mkdir()
    images = flickr_dir / "flickr30k_images" / "flickr30k_images"
    for name in ("1010.jpg", "1011.jpg", "1012.jpg"):
        (folder / name).write_bytes((images / name).read_bytes())
    (folder / "notes.md").write_text("not an image, not listed")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{image_server}/1013.jpg\n\n{image_server}/missing.jpg\n{images / '1014.jpg'}\n")
    expected = [str(folder / n) for n in ("1010.jpg", "1011.jpg", "1012.jpg")]
    expected += [f"{image_server}/1013.jpg", f"{image_server}/missing.jpg", str(images / "1014.jpg"),
                 str(images / "1015.jpg")]
    common = ["--weights", trained[0] / "img2gpt_epoch_1.pth", "--device", "cpu", "--max-new-tokens", "6", "--json",
              "--image", folder, "--image", listing, "--image", images / "1015.jpg"]
    code, out, err = cli(capsys, inference_script, *common, "--batch-size", "3")
    assert code == 1 and "error: 1 of 7 images could not be captioned" in err
    records = [json.loads(line) for line in out.splitlines()]  # stdout holds only the records
    assert [r["image"] for r in records] == expected
    assert [r["error"] is None for r in records] == [True] * 4 + [False] + [True] * 2
    assert "404" in records[4]["error"] and records[4]["caption"] is None
    assert all(isinstance(r["caption"], str) for r in records if r["error"] is None)
    assert "Step 4" in err and "Generating caption..." in err
    _, alone, _ = cli(capsys, inference_script, *common, "--batch-size", "1")
    assert [json.loads(line)["caption"] for line in alone.splitlines()] == [r["caption"] for r in records]


def test_script_runs_pasted_into_a_notebook_cell(flickr_dir, tiny_models, tmp_path, monkeypatch):
    """A notebook cell has no __file__ and a kernel argv that is not ours: the edited constants decide."""
    import re
    import sys
    import types

    from conftest import ROOT

    edits = {"DATA_DIR": str(flickr_dir), "VIT_MODEL_NAME": str(tiny_models[0]),
             "GPT2_MODEL_NAME": str(tiny_models[1]), "OUTPUT_DIR": str(tmp_path), "DEVICE_CHOICE": "cpu",
             "NUM_WORKERS": 0, "NUM_EPOCHS": 1, "WARMUP_STEPS": 0, "EVAL_INTERVAL": 0, "EVAL_AFTER_TRAINING": False}
    cell = (ROOT / "training_script.py").read_text()
    for name, value in edits.items():  # what a user does: edit the constants at the top of the cell
        cell, count = re.subn(rf"^{name} = .*?  #", f"{name} = {value!r}  #", cell, count=1, flags=re.M)
        assert count == 1, name
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/root/.local/kernel-1.json"])
    exec(compile(cell, "<notebook cell>", "exec"), {"__name__": "__main__"})
    assert (tmp_path / "img2gpt_epoch_1.pth").is_file()
