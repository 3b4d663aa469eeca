"""Every caption layout Img2GPT reads (Flickr8k, COCO, a Karpathy JSON, Hugging Face imagefolder metadata, a
plain image,caption CSV) is recognised by content, read with its quirks, trained, sampled and evaluated;
Karpathy's split is downloaded once and cached, and a failed download is said loudly."""

import json
from pathlib import Path

import pandas as pd
import pytest

import training_script as ts
from conftest import load_layout, shape_captions, train_args
from layouts import BUILDERS, karpathy_entries, karpathy_splits

N_IMAGES = 20
KIND = {"flickr8k": "csv", "coco": "coco", "karpathy": "karpathy", "imagefolder-jsonl": "imagefolder",
        "imagefolder-csv": "imagefolder", "plain-csv": "csv"}
# Rows each fixture holds that are skipped: Flickr8k a blank caption and a repeated row; COCO one annotation
# of an unlisted image in each file; the jsonl a broken line.
SKIPPED = {"flickr8k": 2, "coco": 2, "karpathy": 0, "imagefolder-jsonl": 1, "imagefolder-csv": 0, "plain-csv": 0}
SPLIT = {"flickr8k": "karpathy (flickr8k)", "coco": "karpathy (coco)", "karpathy": "the data's own split",
         "imagefolder-jsonl": "the data's own split",
         "imagefolder-csv": "seeded (seed 42), your own images have no standard split",
         "plain-csv": "seeded (seed 42), your own images have no standard split"}


@pytest.fixture(scope="module", params=list(BUILDERS))
def layout(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, root, BUILDERS[request.param](root, N_IMAGES)


@pytest.fixture()
def karpathy_hub(tmp_path, monkeypatch):
    """kagglehub.dataset_download serving Karpathy files written from `files` ({dataset: content}); the calls
    it got are in `calls`. img2gpt's cache is a fresh folder."""
    import kagglehub

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hub = type("Hub", (), {"files": {}, "calls": []})()

    def download(handle, path=None, **kwargs):
        hub.calls.append((handle, path))
        dataset = Path(path).stem.removeprefix("dataset_")
        if dataset not in hub.files:
            raise ConnectionError("no connection to kaggle.com")
        target = tmp_path / "kaggle" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(hub.files[dataset]))
        return str(target)

    monkeypatch.setattr(kagglehub, "dataset_download", download)
    return hub


def karpathy_file(truth, dataset):
    """Karpathy's file for the fixture's images: two val, two test, the rest train or restval."""
    filepath = (lambda name: Path(name).parent.name) if dataset == "coco" else None
    return {"dataset": dataset, "images": karpathy_entries(truth, karpathy_splits(len(truth)), filepath)}


def test_each_layout_is_recognised_and_read_with_its_quirks(layout):
    name, root, truth = layout
    kind, files = ts.find_layout(root)
    captions, image_dir, skipped = load_layout(root)
    assert kind == KIND[name] and skipped == SKIPPED[name], (kind, files, skipped)
    assert set(captions["image_name"]) == set(truth)
    assert all((image_dir / image).is_file() for image in truth)
    for image, (color, shape) in truth.items():  # every caption of every image, cleaned, once
        listed = captions.loc[captions["image_name"] == image, "caption"].tolist()
        assert {ts.clean_caption(c) for c in shape_captions(color, shape)} <= set(listed)
        assert len(listed) == len(set(listed))
    extra = set(captions["caption"]) - {ts.clean_caption(c) for cs in map(lambda v: shape_captions(*v), truth.values())
                                        for c in cs}
    if name == "flickr8k":  # a quoted caption with commas and quotes, one whose comma was not quoted
        first_color, first_shape = next(iter(truth.values()))
        assert extra == {f'a {first_color} {first_shape}, "small", on white.',
                         f"a {first_color} {first_shape}, drawn plainly."}
    elif name == "imagefolder-csv":  # Latin-1, a '|' inside
        assert extra == {"a café | with a pipe."}
    else:
        assert not extra
    if name in ("karpathy", "imagefolder-jsonl"):
        held_out = 2 if name == "karpathy" else 1  # Karpathy: two val, two test; the jsonl one of each
        counts = captions.drop_duplicates("image_name")["split"].value_counts().to_dict()
        assert counts == {"train": N_IMAGES - 2 * held_out, "val": held_out, "test": held_out}


def test_each_layout_trains_samples_and_evaluates(layout, tiny_models, tmp_path, karpathy_hub, capsys):
    name, root, truth = layout
    for dataset in ("flickr8k", "coco"):
        karpathy_hub.files[dataset] = karpathy_file(truth, dataset)
    out = tmp_path / "out"
    ts.main(train_args(root, tiny_models, out, "--epochs", "1", "--batch-size", "8", "--eval-interval", "3",
                       "--eval-after-training", "--karpathy-split-file", "auto", "--max-new-tokens", "5"))
    printed = capsys.readouterr().out
    assert f"Data: {ts.LAYOUTS[KIND[name]]}" in printed and f"Split: {SPLIT[name]}\n" in printed
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["type"] == "start")
    assert start["layout"] == KIND[name] and start["split"] == SPLIT[name]
    assert any(r["type"] == "samples" for r in records)
    report = json.loads((out / "eval_img2gpt_epoch_1.json").read_text())
    assert report["split"] == SPLIT[name] and report["test_images"] == len(report["captions"]) >= 1
    if name in ("flickr8k", "coco", "karpathy"):  # Karpathy's test images: the third and fourth
        assert [c["image"] for c in report["captions"]] == sorted(list(truth)[2:4])
    assert karpathy_hub.calls == ([(ts.KARPATHY_SPLITS, f"caption_datasets/dataset_{name}.json")]
                                  if name in ("flickr8k", "coco") else [])
    # --evaluate scores the checkpoint on the same layout on its own.
    ts.main(["--evaluate", str(out / "img2gpt_epoch_1.pth"), "--data-dir", str(root), "--device", "cpu",
             "--output-dir", str(tmp_path / "scored"), "--max-new-tokens", "5"])
    again = json.loads((tmp_path / "scored" / "eval_img2gpt_epoch_1.json").read_text())
    assert [c["image"] for c in again["captions"]] == [c["image"] for c in report["captions"]]
    assert len(karpathy_hub.calls) <= 1  # the second run read the cached split file


def test_karpathy_split_is_cached_and_restval_and_unlisted_images_train(tmp_path, karpathy_hub):
    names = [f"{1000 + i}.jpg" for i in range(8)]
    truth = {name: ("red", "circle") for name in names[:7]}  # the eighth is not in Karpathy's file
    karpathy_hub.files["flickr30k"] = karpathy_file(truth, "flickr30k")
    path = ts.fetch_karpathy_split("flickr30k")
    assert path == tmp_path / "cache" / "img2gpt" / "dataset_flickr30k.json"
    assert ts.fetch_karpathy_split("flickr30k") == path and len(karpathy_hub.calls) == 1
    splits, _ = ts.karpathy_split(path, names * 5, "flickr30k")
    assert splits == {"train": names[4:], "val": names[:2], "test": names[2:4]}  # restval and 1007.jpg train


def test_a_failed_split_download_is_said_loudly_and_recorded(flickr_dir, tiny_models, tmp_path, karpathy_hub,
                                                            capsys):
    out = tmp_path / "out"
    ts.main(train_args(flickr_dir, tiny_models, out, "--epochs", "1", "--batch-size", "16", "--eval-interval", "0",
                       "--eval-after-training", "--karpathy-split-file", "auto", "--max-new-tokens", "4"))
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "test scores are NOT comparable with published ones" in warnings[0]
    assert "no connection to kaggle.com" in warnings[0]
    name = "seeded (seed 42), NOT Karpathy's: it could not be downloaded"
    start = json.loads((out / "training_log.jsonl").read_text().splitlines()[1])
    assert start["type"] == "start" and start["split"] == name
    assert json.loads((out / "eval_img2gpt_epoch_1.json").read_text())["split"] == name
    assert karpathy_hub.calls == [(ts.KARPATHY_SPLITS, "caption_datasets/dataset_flickr30k.json")]


def test_a_caption_file_with_no_rows_says_so(tmp_path):
    (tmp_path / "captions.txt").write_text("image,caption\n")
    kind, files = ts.find_layout(tmp_path)
    with pytest.raises(ts.Img2GPTError, match="holds no caption rows"):
        ts.load_captions(kind, files, tmp_path)


def test_results_csv_with_a_pipe_in_a_caption_and_latin1_is_read(tmp_path):
    from conftest import make_flickr_folder

    make_flickr_folder(tmp_path, 3, quirks=False)
    csv_path = tmp_path / "flickr30k_images" / "results.csv"
    text = csv_path.read_text() + "1000.jpg| 5| a café sign | reads open .\nno separator here\n"
    csv_path.write_bytes(text.encode("latin-1"))
    captions, _, skipped = load_layout(tmp_path)
    assert "a café sign | reads open." in set(captions["caption"]) and skipped == 1


def test_several_caption_files_name_the_one_used(tmp_path, capsys):
    from layouts import make_plain_csv_folder

    make_plain_csv_folder(tmp_path, 3)
    (tmp_path / "photos" / "more.csv").write_text("image,caption\nholiday 0.jpg,a picture\n")
    kind, files = ts.find_layout(tmp_path)
    assert kind == "csv" and files == [tmp_path / "photos" / "captions.csv"]
    assert f"Found 2 caption files; using {files[0]}" in capsys.readouterr().out


def test_own_images_named_like_flickr30k_keep_a_seeded_split(tmp_path, karpathy_hub):
    names = [f"{i}.jpg" for i in range(1, 31)]  # digits only, like Flickr30k's, but not in Karpathy's file
    karpathy_hub.files["flickr30k"] = karpathy_file({f"{10**9 + i}.jpg": ("red", "circle") for i in range(8)},
                                                    "flickr30k")
    captions = pd.DataFrame({"image_name": names, "caption": ["a picture"] * len(names)})
    cfg = ts.parse_config(ts.CONSTANTS, ["--karpathy-split-file", "auto"], ts.FLAG_ALIASES)
    splits, _, name = ts.choose_split(cfg, captions)
    assert name == "seeded (seed 42), none of Karpathy's flickr30k validation or test images are here"
    assert splits["val"] and splits["test"] and len(karpathy_hub.calls) == 1
