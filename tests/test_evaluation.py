"""Caption metrics: the COCO scorers on the test split, from --evaluate and with Karpathy's split file."""

import json
import shutil
from pathlib import Path

import pytest

import training_script as ts
from conftest import run_script, train_args

ALWAYS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
REFERENCES = {
    "1.jpg": ["A red circle on white.", "a red circle .", "there is a red circle", "one red circle", "a red ball"],
    "2.jpg": ["A blue square.", "a blue square on white .", "one blue square", "the blue square", "a square"],
    "3.jpg": ["A yellow triangle.", "a yellow triangle here", "one yellow triangle", "a triangle", "yellow shape"],
}


def test_perfect_captions_score_higher_than_wrong_ones():
    perfect, perfect_notes = ts.score_captions(REFERENCES, {k: v[0] for k, v in REFERENCES.items()})
    wrong, _ = ts.score_captions(REFERENCES, {k: "a man rides a horse on a beach" for k in REFERENCES})
    expected = ALWAYS + (["METEOR"] if shutil.which("java") else [])
    assert list(perfect) == expected
    for metric in expected:
        assert perfect[metric] > wrong[metric], metric
    assert perfect["Bleu_4"] > 0.9 and wrong["Bleu_1"] < 0.3 and wrong["CIDEr"] < 0.1
    assert any("need Java" in note for note in perfect_notes) == (not shutil.which("java"))
    assert all(isinstance(value, float) for value in perfect.values())


def test_without_java_meteor_and_spice_are_left_out_with_a_note(monkeypatch):
    import os

    java = shutil.which("java")
    if java:  # hide it: PATH without the folders that hold a java
        folders = os.environ["PATH"].split(os.pathsep)
        monkeypatch.setenv("PATH", os.pathsep.join(f for f in folders if not (Path(f) / "java").exists()))
    assert shutil.which("java") is None
    scores, notes = ts.score_captions(REFERENCES, {k: v[0] for k, v in REFERENCES.items()})
    assert list(scores) == ALWAYS
    assert notes == ["tokenizer: PTB-like (Python)", "METEOR and SPICE left out: they need Java (install a JRE to "
                                                     "get them)"]


@pytest.fixture(scope="module")
def checkpoint(flickr_dir, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    ts.main(train_args(flickr_dir, tiny_models, out, "--epochs", "1", "--batch-size", "16", "--eval-interval", "0"))
    return out / "img2gpt_epoch_1.pth"


def test_evaluate_flag_scores_a_checkpoint(checkpoint, flickr_dir, tmp_path):
    result = run_script("training_script.py", "--evaluate", checkpoint, "--data-dir", flickr_dir, "--device", "cpu",
                        "--output-dir", tmp_path, "--num-beams", "2", "--max-new-tokens", "8",
                        "--karpathy-split-file", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| metric | score |" in result.stdout and "| CIDEr |" in result.stdout
    report = json.loads((tmp_path / "eval_img2gpt_epoch_1.json").read_text())
    assert all(isinstance(report[m], float) for m in ALWAYS)
    assert report["split"] == "seeded (seed 42)" and report["test_images"] == 2
    assert report["decoding"] == {"max_new_tokens": 8, "num_beams": 2, "no_repeat_ngram_size": 0,
                                  "repetition_penalty": 1.0}
    test_images = ts.split_by_image([f"{1000 + i}.jpg" for i in range(24)] + ["2199200615.jpg"], 1014, 1000, 42)["test"]
    assert [c["image"] for c in report["captions"]] == test_images
    assert all(len(c["references"]) >= 2 and isinstance(c["generated"], str) for c in report["captions"])
    assert not (tmp_path / "img2gpt_epoch_1.pth").exists()  # evaluating trains nothing


def test_karpathy_split_file_decides_the_test_images(checkpoint, flickr_dir, tmp_path, capsys):
    assignment = {f"{1000 + i}.jpg": "train" for i in range(24)}
    assignment.update({"1003.jpg": "test", "1007.jpg": "test", "1011.jpg": "test", "1001.jpg": "val",
                       "1002.jpg": "restval", "not_here.jpg": "test"})
    split_file = tmp_path / "dataset_flickr30k.json"
    split_file.write_text(json.dumps({"images": [{"filename": n, "split": s, "sentences": []}
                                                 for n, s in assignment.items()]}))
    splits, unknown = ts.karpathy_split(split_file, list(assignment)[:24])
    assert unknown == {}
    assert splits["test"] == ["1003.jpg", "1007.jpg", "1011.jpg"] and splits["val"] == ["1001.jpg"]
    assert "1002.jpg" in splits["train"]  # restval trains
    ts.main(["--evaluate", str(checkpoint), "--data-dir", str(flickr_dir), "--device", "cpu", "--output-dir",
             str(tmp_path), "--karpathy-split-file", str(split_file), "--max-new-tokens", "4"])
    report = json.loads((tmp_path / "eval_img2gpt_epoch_1.json").read_text())
    assert report["split"] == "karpathy (dataset_flickr30k.json)" and [c["image"] for c in report["captions"]] == splits["test"]
    split_file.write_text("{not json")
    with pytest.raises(ts.Img2GPTError, match="Karpathy split file"):
        ts.karpathy_split(split_file, ["1000.jpg"])
