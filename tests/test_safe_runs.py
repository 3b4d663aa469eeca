"""Runs users start are safe whatever they type: --resume auto is right after any disconnect and every piece of
advice works when followed; the data folder is a boundary; caption files are never silently misread; limits
come from the model; every way out is clean; evaluation results are never replaced silently."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

import inference_script
import training_script as ts
from conftest import ROOT, draw_shape, make_flickr_folder, train_args
from helpers import cli, config_of, one_error_line

FAST = ("--epochs", "1", "--batch-size", "16", "--eval-interval", "0")


@pytest.fixture(scope="module")
def trained(flickr_dir, tiny_models, tmp_path_factory):
    """A complete 1-epoch run: its folder (img2gpt_epoch_1.pth, img2gpt_last.pth, log) and its arguments."""
    out = tmp_path_factory.mktemp("trained")
    args = train_args(flickr_dir, tiny_models, out, *FAST)
    ts.main(args)
    return out, args


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != ".img2gpt.lock"}


# --- 1. --resume auto after any disconnect; advice that works when followed ------------------------------------
def test_resume_auto_after_a_disconnect_before_the_first_save_starts_afresh(flickr_dir, tiny_models, tmp_path,
                                                                           capsys, monkeypatch):
    out = tmp_path / "out"
    args = train_args(flickr_dir, tiny_models, out, *FAST, "--save-interval", "50")
    real_train = ts.train_one_epoch

    def disconnect(run, *a, **k):  # Colab drops after the run logged its start, before any save
        raise KeyboardInterrupt

    monkeypatch.setattr(ts, "train_one_epoch", disconnect)
    code, _, err = cli(capsys, ts, *args)
    assert code == 1 and sorted(p.name for p in out.iterdir()) == [".img2gpt.lock", "training_log.jsonl"]
    advice = err.strip().splitlines()[-1]
    assert "before the first save" in advice and "--resume auto" in advice, err
    old_log = (out / "training_log.jsonl").read_text()

    monkeypatch.setattr(ts, "train_one_epoch", real_train)
    code, _, err = cli(capsys, ts, *args)  # the same command as before: refused, and told what works
    assert code == 1 and "--resume auto" in one_error_line(err)
    code, stdout, err = cli(capsys, ts, *args, "--resume", "auto")  # ... which it does
    assert code == 0, err
    assert (f"--resume auto: no img2gpt_last.pth, starting afresh (the run in '{out}' stopped before its first "
            "save: its training_log.jsonl is kept and appended to)") in stdout
    assert (out / "img2gpt_epoch_1.pth").is_file()
    log = (out / "training_log.jsonl").read_text()
    assert log.startswith(old_log) and len(log) > len(old_log)  # kept, then appended to


def test_resume_auto_refuses_epoch_files_without_a_last_checkpoint_and_its_advice_works(trained, tmp_path, capsys):
    out, args = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("img2gpt_epoch_1.pth", "training_log.jsonl"):
        (copy / name).write_bytes((out / name).read_bytes())
    args = [copy if a == str(out) else a for a in args]
    before = snapshot(copy)
    code, _, err = cli(capsys, ts, *args, "--resume", "auto")
    line = one_error_line(err)
    assert code == 1 and "no img2gpt_last.pth to continue from" in line and "--overwrite" in line
    assert snapshot(copy) == before  # the epoch file is not written over
    code, _, err = cli(capsys, ts, *args, "--resume", "auto", "--overwrite")
    assert code == 0, err


@pytest.mark.parametrize("stage", ["before the first save", "after a save", "evaluation", "--evaluate"])
def test_ctrl_c_advice_works_when_followed(stage, trained, flickr_dir, tiny_models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = train_args(flickr_dir, tiny_models, out, *FAST, "--save-interval", "1")
    if stage == "--evaluate":
        args = train_args(flickr_dir, tiny_models, out, "--evaluate", trained[0] / "img2gpt_epoch_1.pth")
    target = {"before the first save": "save_last", "after a save": "train_one_epoch",
              "evaluation": "evaluate_on_test", "--evaluate": "evaluate_on_test"}[stage]
    real = getattr(ts, target)
    calls = []

    def interrupt(*a, **k):
        calls.append(1)
        if stage == "after a save":
            real(*a, **k)  # every batch of epoch 1 trains and is saved (--save-interval 1); then Ctrl+C
        raise KeyboardInterrupt

    monkeypatch.setattr(ts, target, interrupt)
    evaluation = "--eval-after-training" if stage == "evaluation" else "--no-eval-after-training"
    code, _, err = cli(capsys, ts, *args, evaluation)
    advice = err.strip().splitlines()[-1]
    assert code == 1 and advice.startswith("interrupted"), err
    monkeypatch.setattr(ts, target, real)
    if stage == "--evaluate":
        assert "no result was written" in advice and not list(out.glob("eval_*.json"))
        follow = args
    elif stage == "evaluation":
        assert f"--evaluate {out / 'img2gpt_epoch_1.pth'}" in advice
        follow = train_args(flickr_dir, tiny_models, out, "--evaluate", out / "img2gpt_epoch_1.pth")
    else:
        assert "--resume auto" in advice and ("before the first save" in advice) == (stage == "before the first save")
        follow = [*args, "--no-eval-after-training", "--resume", "auto"]
    code, _, err = cli(capsys, ts, *follow)
    assert code == 0, err
    assert (out / "img2gpt_epoch_1.pth").is_file() or stage == "--evaluate"
    if stage in ("evaluation", "--evaluate"):
        assert list(out.glob("eval_img2gpt_epoch_1*.json"))


def test_a_complete_run_named_by_path_is_said_complete_in_its_own_folder(trained, tmp_path, capsys):
    out, args = trained
    elsewhere = tmp_path / "elsewhere"
    args = [str(elsewhere) if a == str(out) else a for a in args]
    code, stdout, err = cli(capsys, ts, *args, "--resume", out / "img2gpt_last.pth")
    assert code == 0, err
    assert f"The run in '{out}' is complete" in stdout and str(out / "img2gpt_epoch_1.pth") in stdout


# --- 2. The data folder is a boundary -----------------------------------------------------------------------
def test_image_names_that_leave_the_data_folder_are_left_out_and_named(tmp_path, capsys):
    data, secret = tmp_path / "data", tmp_path / "secret"
    (data / "images").mkdir(parents=True)
    secret.mkdir()
    rng = __import__("random").Random(0)
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        draw_shape("red", "circle", rng).save(data / "images" / name)
    draw_shape("blue", "square", rng).save(secret / "private.jpg")
    (data / "images" / "link_out.jpg").symlink_to(secret / "private.jpg")
    (data / "images" / "link_in.jpg").symlink_to(data / "images" / "a.jpg")
    names = ["images/a.jpg", "images/b.jpg", "images/c.jpg", "images/d.jpg", "images/link_in.jpg",
             "../secret/private.jpg", str(secret / "private.jpg"), "images/link_out.jpg", "/etc/hostname"]
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"picture {i}"}) + "\n"
                                                 for i, n in enumerate(names)))
    base = ["--data-dir", data, "--karpathy-split-file", "none"]
    kept = ts.prepare_data(config_of(*base))
    out = capsys.readouterr().out
    inside = {"images/a.jpg", "images/b.jpg", "images/c.jpg", "images/d.jpg", "images/link_in.jpg"}
    assert set(kept.captions["image_name"]) == inside
    assert out.count("Left out 4 images named outside --data-dir") == 1 and "--allow-outside-data-dir" in out
    everything = ts.prepare_data(config_of(*base, "--allow-outside-data-dir"))
    assert {"../secret/private.jpg", "images/link_out.jpg"} <= set(everything.captions["image_name"])
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "../secret/private.jpg", "text": "x"}) + "\n")
    with pytest.raises(ts.Img2GPTError, match="every image the captions name lies outside --data-dir"):
        ts.prepare_data(config_of(*base))


# --- 3. Caption files are never silently misread ------------------------------------------------------------
def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    rng = __import__("random").Random(0)
    for name in names:
        draw_shape("green", "square", rng).save(folder / name)


def test_a_csv_row_with_an_open_quote_or_a_huge_field_is_skipped_alone(tmp_path):
    names = [f"{i}.jpg" for i in range(6)]
    write_images(tmp_path / "Images", names)
    rows = ["image,caption", "0.jpg,a dog runs", '1.jpg,"a cat sits on a mat', "2.jpg,a bird flies",
            f"3.jpg,{'x' * 200_000}", '4.jpg,"a ""quoted"" word, and a comma"', "5.jpg,a fish swims", "6.jpg"]
    (tmp_path / "captions.txt").write_text("\n".join(rows) + "\n")
    captions, _, skipped = ts.load_captions("csv", [tmp_path / "captions.txt"], tmp_path)
    assert dict(zip(captions["image_name"], captions["caption"])) == {
        "0.jpg": "a dog runs", "2.jpg": "a bird flies", "4.jpg": 'a "quoted" word, and a comma',
        "5.jpg": "a fish swims"}
    assert skipped == 3  # the open quote, the huge field, the row without a caption

    (tmp_path / "metadata.csv").write_text("file_name,text\n0.jpg,one\n1.jpg,\"two\n2.jpg,three\n3.jpg,a,b\n")
    captions, _, skipped = ts.load_captions("imagefolder", [tmp_path / "metadata.csv"], tmp_path)
    assert list(captions["image_name"]) == ["0.jpg", "2.jpg"] and skipped == 2


def karpathy_json(path, splits):
    path.write_text(json.dumps({"dataset": "mine", "images": [
        {"filename": f"{i}.jpg", "split": split, "sentences": [{"raw": f"caption {i}"}]}
        for i, split in enumerate(splits)]}))


SPELLINGS = ["train", "TRAIN", " Training ", "restval", "validation", "VAL", "dev", "Test", "TESTING", "holdout",
             "holdout", "Unlabeled"]
EXPECTED = {"train": ["0.jpg", "1.jpg", "2.jpg", "3.jpg"], "val": ["4.jpg", "5.jpg", "6.jpg"],
            "test": ["7.jpg", "8.jpg"]}


def test_split_names_are_read_alike_in_every_reader_and_unknown_ones_are_named(tmp_path, capsys):
    names = [f"{i}.jpg" for i in range(len(SPELLINGS))]
    # A Karpathy JSON as the data itself
    data = tmp_path / "karpathy"
    write_images(data / "images", names)
    karpathy_json(data / "dataset_mine.json", SPELLINGS)
    got = ts.prepare_data(config_of("--data-dir", data))
    assert got.splits == EXPECTED and got.unknown_splits == {"holdout": 2, "Unlabeled": 1}
    out = capsys.readouterr().out
    assert "Left out 3 images whose split is not train, val or test: 'Unlabeled' (1), 'holdout' (2)" in out
    # An imagefolder split column
    folder = tmp_path / "imagefolder"
    write_images(folder, names)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "a picture", "split": s}) + "\n"
                                                   for n, s in zip(names, SPELLINGS)))
    got = ts.prepare_data(config_of("--data-dir", folder))
    assert got.splits == EXPECTED and got.unknown_splits == {"holdout": 2, "Unlabeled": 1}
    # A --karpathy-split-file for a folder without a split of its own
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "a picture"}) + "\n"
                                                   for n in names))
    karpathy_json(tmp_path / "dataset_split.json", SPELLINGS)
    got = ts.prepare_data(config_of("--data-dir", folder, "--karpathy-split-file", tmp_path / "dataset_split.json"))
    assert got.splits == EXPECTED and got.unknown_splits == {"holdout": 2, "Unlabeled": 1}


def test_caption_readers_hold_the_rows_they_keep_and_not_more(tmp_path):
    rows = ["image_name| comment_number| comment"] + [f"{i // 5}.jpg| {i % 5}| caption number {i} of a picture ."
                                                     for i in range(60_000)]
    (tmp_path / "results.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "captions.txt").write_text("image,caption\n" + "".join(f"{r.split('| ')[0]},{r.split('| ')[2]}\n"
                                                                      for r in rows[1:]))
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": r.split("| ")[0], "text":
                                                                 r.split("| ")[2]}) + "\n" for r in rows[1:]))
    for kind, name in (("flickr30k", "results.csv"), ("csv", "captions.txt"), ("imagefolder", "metadata.jsonl")):
        tracemalloc.start()
        result = ts.READERS[kind](tmp_path / name)
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(result[0]) == 60_000
        assert peak < 1.1 * kept, (kind, peak, kept)  # no copy of the file held beside the rows
        del result


# --- 4. Limits come from the model --------------------------------------------------------------------------
def test_caption_lengths_past_the_language_models_positions_are_one_line_before_the_data(
        flickr_dir, tiny_models, trained, tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(ts, "prepare_data", lambda *a, **k: loaded.append(1))
    # The tiny GPT-2 reads 64 positions; the tiny ViT's prefix takes 17 (16 patches and CLS).
    for flag, value, limit in (("--max-caption-tokens", 48, 47), ("--max-new-tokens", 49, 48)):
        code, _, err = cli(capsys, ts, *train_args(flickr_dir, tiny_models, tmp_path / "out", flag, value))
        line = one_error_line(err)
        assert code == 1 and f"{flag} {value} does not fit" in line and f"at most {limit}" in line
    code, _, err = cli(capsys, ts, *train_args(flickr_dir, tiny_models, tmp_path / "out", "--evaluate",
                                               trained[0] / "img2gpt_epoch_1.pth", "--max-new-tokens", 49))
    assert code == 1 and "at most 48" in one_error_line(err)
    assert not loaded
    code, out, err = cli(capsys, inference_script, "--weights", trained[0] / "img2gpt_epoch_1.pth", "--image", "x.jpg",
                         "--device", "cpu", "--max-new-tokens", 49)
    assert code == 1 and "--max-new-tokens 49 does not fit" in one_error_line(err) and "Step 1" not in out
    pooled = {"vit_model": str(tiny_models[0]), "gpt2_model": str(tiny_models[1]), "prefix_pool_grid": 2}
    assert ts.check_context(pooled, 59, 60) == 60  # a 2 x 2 grid + CLS: 5 prefix tokens


def test_the_longest_caption_allowed_trains_and_is_written(flickr_dir, tiny_models, tmp_path, capsys):
    code, _, err = cli(capsys, ts, *train_args(flickr_dir, tiny_models, tmp_path, *FAST, "--max-caption-tokens", 47,
                                               "--max-new-tokens", 48, "--eval-interval", 1))
    assert code == 0, err


def test_numbers_past_what_numpy_and_threading_take_are_refused(capsys):
    code, _, err = cli(capsys, ts, "--seed", 2**32, "--data-dir", "nowhere")
    assert code == 1 and "--seed 4294967296 is out of range" in one_error_line(err)
    assert ts.check_settings(config_of("--seed", 2**32 - 1), ts.TRAINING_RULES, ts.FLAG_ALIASES) is None
    code, _, err = cli(capsys, inference_script, "--request-timeout", 10**10, "--image", "x.jpg")
    assert code == 1 and "--request-timeout 10000000000 is out of range" in one_error_line(err)


@pytest.mark.parametrize("script,flag", [(ts, "--evaluate"), (ts, "--data-dir"), (ts, "--output-dir"),
                                         (ts, "--resume"), (ts, "--karpathy-split-file"), (ts, "--gpt2-model"),
                                         (inference_script, "--weights"), (inference_script, "--vit-model")])
def test_an_empty_path_is_never_taken_as_unset(script, flag, capsys, monkeypatch):
    monkeypatch.setattr(ts, "prepare_run", lambda *a: pytest.fail("a run started"))
    code, _, err = cli(capsys, script, flag, "")
    assert code == 1 and f"{flag} '' names nothing" in one_error_line(err)


# --- 5. Every way out is clean ------------------------------------------------------------------------------
def interrupt_when_ready(code, timeout=60):
    """Run `code` in a child Python that prints READY when the stage under test is under way; send Ctrl+C then.
    Returns (seconds from Ctrl+C to exit, exit code, stderr)."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    for line in child.stdout:  # what the stage prints before it is under way, then READY
        if line.strip() == "READY":
            break
    else:
        pytest.fail(f"never ready: {child.communicate()}")
    sent = time.monotonic()
    child.send_signal(signal.SIGINT)
    try:
        _, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        pytest.fail("still running long after Ctrl+C")
    return time.monotonic() - sent, child.returncode, err


def test_ctrl_c_while_meteor_scores_ends_at_once():
    seconds, code, err = interrupt_when_ready("""
        import sys, time
        import training_script as ts
        from pycocoevalcap.meteor.meteor import Meteor
        real = Meteor._stat
        def stat(self, *args):
            print("READY", flush=True)
            time.sleep(60)  # Ctrl+C arrives while METEOR is scoring
        Meteor._stat = stat
        refs = {i: ["a dog runs on the grass", "a brown dog"] for i in range(50)}
        ts.run_cli(lambda argv: ts.score_captions(refs, {i: "a dog on grass" for i in range(50)}))
    """)
    assert seconds < 10 and code == 1 and err.strip().splitlines()[-1] == "interrupted", err


def test_ctrl_c_while_images_are_checked_ends_at_once(tiny_models, tmp_path):
    make_flickr_folder(tmp_path, 200, quirks=False)
    seconds, code, err = interrupt_when_ready(f"""
        import time
        import training_script as ts
        def slow_check(path, first=[True]):
            if first:
                first.clear()
                print("READY", flush=True)
            time.sleep(1)  # 200 images, 8 threads: 25 s if the queue were waited for
            return True
        ts.is_usable_image = slow_check
        ts.run_cli(ts.main, ["--data-dir", {str(tmp_path)!r}, "--output-dir", {str(tmp_path / 'out')!r},
                             "--karpathy-split-file", "none", "--vit-model", {str(tiny_models[0])!r},
                             "--gpt2-model", {str(tiny_models[1])!r}, "--device", "cpu"])
    """)
    assert seconds < 6 and code == 1 and err.strip().splitlines()[-1] == "interrupted: nothing was written", err


def test_training_into_a_pipe_that_closes_goes_on_quietly(flickr_dir, tiny_models, tmp_path):
    args = train_args(flickr_dir, tiny_models, tmp_path, *FAST, "--eval-interval", "1")
    child = subprocess.Popen([sys.executable, str(ROOT / "training_script.py"), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    child.stdout.readline()  # `| head -1`
    child.stdout.close()
    _, err = child.communicate(timeout=600)
    assert child.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err[-2000:]
    assert (tmp_path / "img2gpt_epoch_1.pth").is_file()


def test_captions_into_a_pipe_that_closes_end_quietly(trained, flickr_dir):
    images = sorted((flickr_dir / "flickr30k_images" / "flickr30k_images").glob("1*.jpg"))[:6]
    child = subprocess.Popen([sys.executable, str(ROOT / "inference_script.py"), "--weights",
                              trained[0] / "img2gpt_epoch_1.pth", "--device", "cpu", "--json", "--batch-size", "1",
                              *[arg for image in images for arg in ("--image", image)]],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert json.loads(child.stdout.readline())["caption"]  # `| head -1`
    child.stdout.close()
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err[-2000:]


def test_evaluating_into_a_folder_that_cannot_be_written_stops_before_the_work(trained, flickr_dir, tiny_models,
                                                                               tmp_path, capsys, monkeypatch):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    loaded = []
    monkeypatch.setattr(ts, "prepare_data", lambda *a, **k: loaded.append(1))

    def refusing_open(path, *args, **kwargs):  # a read-only mount: root's permission bits would not stop root
        if str(path).startswith(str(read_only)) and (args[:1] or [kwargs.get("mode", "r")])[0][0] in "wxa":
            raise OSError(30, "Read-only file system")
        return open(path, *args, **kwargs)

    monkeypatch.setattr(ts, "open", refusing_open, raising=False)
    code, _, err = cli(capsys, ts, *train_args(flickr_dir, tiny_models, read_only, "--evaluate",
                                               trained[0] / "img2gpt_epoch_1.pth"))
    assert code == 1 and "cannot write to --output-dir" in one_error_line(err) and not loaded


# --- 6. Results are never replaced silently -----------------------------------------------------------------
def test_a_second_runs_checkpoint_of_the_same_name_is_scored_apart(trained, flickr_dir, tiny_models, tmp_path, capsys):
    other = tmp_path / "other"
    ts.main(train_args(flickr_dir, tiny_models, other, *FAST, "--seed", "7", "--karpathy-split-file", "none"))
    scores = tmp_path / "scores"
    evaluate = [*train_args(flickr_dir, tiny_models, scores), "--max-new-tokens", "4", "--evaluate"]
    first, second = trained[0] / "img2gpt_epoch_1.pth", other / "img2gpt_epoch_1.pth"
    code, _, err = cli(capsys, ts, *evaluate, first)
    assert code == 0, err
    report = json.loads((scores / "eval_img2gpt_epoch_1.json").read_text())
    assert report["checkpoint_path"] == str(first.resolve()) and len(report["checkpoint_sha256"]) == 64
    assert report["run"] == ts.load_checkpoint(first)["run_id"] != ts.load_checkpoint(second)["run_id"]
    kept = (scores / "eval_img2gpt_epoch_1.json").read_bytes()

    code, stdout, err = cli(capsys, ts, *evaluate, second)
    assert code == 0, err
    apart = list(scores.glob("eval_img2gpt_epoch_1_*.json"))
    assert len(apart) == 1 and (scores / "eval_img2gpt_epoch_1.json").read_bytes() == kept
    assert json.loads(apart[0].read_text())["checkpoint_path"] == str(second.resolve())
    assert "holds the result of another checkpoint file" in stdout

    code, _, err = cli(capsys, ts, *evaluate, first)  # the same checkpoint again: its own file, no third one
    assert code == 0 and len(list(scores.glob("eval_*.json"))) == 2


# --- What a hostile try of the above found ------------------------------------------------------------------
def test_odd_caption_files_are_skipped_row_by_row_or_refused_in_one_line(tmp_path):
    images = tmp_path / "coco" / "train2014"
    write_images(images, ["1.jpg", "2.jpg", "3.jpg"])
    (tmp_path / "outside.jpg").write_bytes((images / "1.jpg").read_bytes())
    (tmp_path / "coco" / "annotations").mkdir()
    annotations = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"},
                              {"id": 3, "file_name": str(tmp_path / "outside.jpg")}],
                   "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": [2], "caption": "a list"},
                                   {"image_id": 2, "caption": "two"}, {"image_id": 3, "caption": "outside"}]}
    (tmp_path / "coco" / "annotations" / "captions_train2014.json").write_text(json.dumps(annotations))
    data = ts.prepare_data(config_of("--data-dir", tmp_path / "coco", "--karpathy-split-file", "none"))
    assert sorted(data.captions["caption"]) == ["one", "two"] and data.skipped_rows == 1
    assert any(name.endswith("outside.jpg") for name in data.left_out)

    (tmp_path / "captions.txt").write_text("image,caption\n1.jpg,a name\nbad\x00name.jpg,a NUL in its name\n")
    write_images(tmp_path, ["1.jpg"])
    captions, _, skipped = ts.load_captions("csv", [tmp_path / "captions.txt"], tmp_path)
    assert list(captions["image_name"]) == ["1.jpg"] and skipped == 1

    (tmp_path / "dataset_bad.json").write_text(json.dumps({"images": 5, "sentences": 1, "filename": 1}))
    with pytest.raises(ts.Img2GPTError, match="its images are not a list"):
        ts.read_karpathy(tmp_path / "dataset_bad.json")


def test_a_missing_split_trains_in_every_reader(tmp_path):
    names = [f"{i}.jpg" for i in range(12)]
    splits = ["val", "test"] + [None] * 10
    folder = tmp_path / "jsonl"
    write_images(folder, names)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "x", "split": s}) + "\n"
                                                   for n, s in zip(names, splits)))
    folder_csv = tmp_path / "csv"
    write_images(folder_csv, names)
    (folder_csv / "metadata.csv").write_text("file_name,text,split\n" + "".join(f"{n},x,{s or ''}\n"
                                                                               for n, s in zip(names, splits)))
    folder_k = tmp_path / "karpathy"
    write_images(folder_k / "images", names)
    karpathy_json(folder_k / "dataset_mine.json", splits)
    for data_dir in (folder, folder_csv, folder_k):
        data = ts.prepare_data(config_of("--data-dir", data_dir))
        assert (len(data.splits["train"]), data.splits["val"], data.splits["test"], data.unknown_splits) == (
            10, ["0.jpg"], ["1.jpg"], {}), data_dir
    data = ts.prepare_data(config_of("--data-dir", folder, "--karpathy-split-file", folder_k / "dataset_mine.json"))
    assert len(data.splits["train"]) == 10 and data.unknown_splits == {}


def test_a_named_pipe_as_a_checkpoint_or_split_file_is_one_line(trained, flickr_dir, tiny_models, tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.pth")
    os.mkfifo(tmp_path / "fifo.json")
    for script, argv in ((inference_script, ["--weights", tmp_path / "fifo.pth", "--image", "x.jpg"]),
                         (ts, train_args(flickr_dir, tiny_models, tmp_path / "a", "--evaluate", tmp_path / "fifo.pth")),
                         (ts, [*train_args(flickr_dir, tiny_models, tmp_path / "b"), "--karpathy-split-file",
                               tmp_path / "fifo.json"])):
        code, _, err = cli(capsys, script, *argv, "--device", "cpu")
        assert code == 1 and "is not a regular file (a named pipe or a device)" in one_error_line(err)


def test_a_folder_named_like_a_run_file_is_one_line_and_overwrite_waits_for_the_data(trained, flickr_dir, tiny_models,
                                                                                   tmp_path, capsys):
    out, args = trained
    odd = tmp_path / "odd"
    (odd / "loss.png").mkdir(parents=True)
    for extra in ([], ["--overwrite"], ["--resume", "auto"]):
        code, _, err = cli(capsys, ts, *train_args(flickr_dir, tiny_models, odd), *extra)
        assert code == 1 and "loss.png' is not a regular file" in one_error_line(err)
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in out.iterdir():
        if file.is_file():
            (copy / file.name).write_bytes(file.read_bytes())
    before = snapshot(copy)
    code, _, err = cli(capsys, ts, *train_args(tmp_path / "no_such_data", tiny_models, copy), "--overwrite")
    assert code == 1 and "does not exist" in one_error_line(err)
    assert snapshot(copy) == before  # a mistyped --data-dir does not cost the old run


def test_ctrl_c_while_continuing_another_folders_run_advises_that_run(trained, tmp_path, capsys, monkeypatch):
    out, args = trained
    moved = [str(tmp_path / "next") if a == str(out) else a for a in args]
    monkeypatch.setattr(ts, "train_one_epoch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = cli(capsys, ts, *moved, "--epochs", "2", "--resume", out / "img2gpt_last.pth")
    advice = err.strip().splitlines()[-1]
    assert code == 1 and f"continue from {out / 'img2gpt_last.pth'}" in advice and "--resume auto" not in advice


def test_fractional_seconds_and_alpha_are_taken(capsys):
    assert config_of("--lora-alpha", "0.5").lora_alpha == 0.5
    cfg = ts.parse_config(inference_script.CONSTANTS, ["--request-timeout", "2.5"], inference_script.FLAG_ALIASES)
    assert cfg.request_timeout == 2.5
