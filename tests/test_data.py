"""Data stages: the Kaggle layout and its CSV quirks, the split, images, captions and labels."""

import shutil

import pytest
import torch
from PIL import Image

import training_script as ts
from conftest import BROKEN_ROW_CAPTION, QUOTED_CAPTION, load_layout, make_flickr_folder, write_png_header


def test_results_csv_quirks_are_parsed(flickr_dir):
    captions, _, skipped = load_layout(flickr_dir)
    assert list(captions.columns) == ["image_name", "caption"]
    # 24 images x 5 captions, plus 2199200615.jpg (its two rows say the same: one is skipped as repeated)
    # and the missing / corrupt files.
    assert len(captions) == 24 * 5 + 3 and skipped == 1
    broken = captions[captions["image_name"] == "2199200615.jpg"]["caption"].tolist()
    assert broken == [ts.clean_caption(BROKEN_ROW_CAPTION)]  # the row without its second '|' is kept
    assert ts.clean_caption(QUOTED_CAPTION) in captions["caption"].tolist()  # a '"' does not swallow rows
    assert not captions["image_name"].str.startswith(" ").any()
    assert not captions["caption"].str.startswith(" ").any()


def test_clean_caption_glues_pretokenized_punctuation():
    assert ts.clean_caption("  A dog 's ball  is on the grass . ") == "A dog's ball is on the grass."


@pytest.mark.parametrize("layout", ["kaggle", "one_more_level", "one_less_level"])
def test_dataset_files_are_found_at_any_nearby_depth(tmp_path, layout):
    make_flickr_folder(tmp_path / "src", 3, quirks=False)
    source = tmp_path / "src" / "flickr30k_images"
    if layout == "kaggle":
        root = tmp_path / "src"
    elif layout == "one_more_level":
        root = tmp_path / "deeper"
        shutil.copytree(tmp_path / "src", root / "versions" / "1")
    else:  # results.csv and the images side by side in the given folder
        root = tmp_path / "flat"
        shutil.copytree(source / "flickr30k_images", root)
        shutil.copy(source / "results.csv", root / "results.csv")
    kind, files = ts.find_layout(root)
    _, image_dir, _ = ts.load_captions(kind, files, root)
    assert kind == "flickr30k" and [f.name for f in files] == ["results.csv"]
    assert sorted(p.name for p in image_dir.glob("*.jpg")) == ["1000.jpg", "1001.jpg", "1002.jpg"]


def test_missing_data_folder_and_csv_are_clear_errors(tmp_path):
    with pytest.raises(ts.Img2GPTError, match="does not exist"):
        ts.find_layout(tmp_path / "nowhere")
    with pytest.raises(ts.Img2GPTError, match="no captions found .* looked for metadata.jsonl"):
        ts.find_layout(tmp_path)
    (tmp_path / "captions.txt").write_text("image,caption\n")
    with pytest.raises(ts.Img2GPTError, match="is a file: give the folder that holds it"):
        ts.find_layout(tmp_path / "captions.txt")


def test_missing_and_corrupt_images_are_left_out_with_a_count(flickr_dir, capsys):
    captions, image_dir, _ = load_layout(flickr_dir)
    kept, left_out = ts.drop_unusable_images(captions, image_dir)
    names = set(kept["image_name"])
    assert left_out == ["corrupt.jpg", "missing.jpg"]
    assert len(names) == 25 and not names & set(left_out)
    assert "Left out 2 of 27 images" in capsys.readouterr().out


def test_empty_truncated_and_oversized_images_are_unusable(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), "red").save(good, quality=95)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    write_png_header(tmp_path / "bomb.png", 30000, 30000)
    assert ts.is_usable_image(good)
    for name in ("empty.jpg", "bomb.png"):
        assert not ts.is_usable_image(tmp_path / name), name
    for name in ("empty.jpg", "truncated.jpg", "bomb.png"):  # what verify() lets through, decoding refuses
        with pytest.raises(ts.IMAGE_ERRORS):
            ts.load_image(tmp_path / name)


def test_nothing_left_is_an_error(tmp_path):
    make_flickr_folder(tmp_path, 2, quirks=False)
    for picture in (tmp_path / "flickr30k_images" / "flickr30k_images").iterdir():
        picture.write_bytes(b"")
    captions, image_dir, _ = load_layout(tmp_path)
    with pytest.raises(ts.Img2GPTError, match="none of the 2 images"):
        ts.drop_unusable_images(captions, image_dir)


def test_csv_without_known_columns_is_no_layout(tmp_path):
    make_flickr_folder(tmp_path, 2, quirks=False)
    csv_path = tmp_path / "flickr30k_images" / "results.csv"
    csv_path.write_text("name,caption\n1000.jpg,a red circle\n")
    with pytest.raises(ts.Img2GPTError, match="no captions found"):
        ts.find_layout(tmp_path)


def test_split_is_by_image_disjoint_and_deterministic():
    names = [f"{i}.jpg" for i in range(500)] * 5  # five captions per image
    split = ts.split_by_image(names, 1014, 1000, seed=42)
    sets = {k: set(v) for k, v in split.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(names)
    assert (len(sets["val"]), len(sets["test"])) == (50, 50)  # at most 10% each on small data
    assert ts.split_by_image(list(reversed(names)), 1014, 1000, seed=42) == split  # same split every run
    assert ts.split_by_image(names, 1014, 1000, seed=7) != split


def test_split_sizes_full_flickr30k_and_tiny_sets():
    full = ts.split_by_image([f"{i}.jpg" for i in range(31783)], 1014, 1000, seed=0)
    assert [len(full[k]) for k in ("train", "val", "test")] == [31783 - 2014, 1014, 1000]
    for n in (3, 4, 12):
        split = ts.split_by_image([f"{i}.jpg" for i in range(n)], 1014, 1000, seed=0)
        assert all(len(split[k]) >= 1 for k in ("train", "val", "test")), (n, split)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_images_of_any_mode_become_rgb(tmp_path, mode):
    path = tmp_path / "picture.png"
    if mode == "I;16":  # 16-bit grayscale, as some scanners write
        image = Image.new("I;16", (20, 10), 40000)
    else:
        image = Image.new("RGB", (20, 10), (200, 30, 30)).convert(mode)
    image.save(path, format="TIFF" if mode == "CMYK" else "PNG")
    loaded = ts.load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 10)
    if mode == "I;16":
        assert loaded.getpixel((0, 0))[0] == 40000 // 256


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.save(tmp_path / "clear.png")
    assert ts.load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view": a portrait photo stored landscape
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert ts.load_image(tmp_path / "rotated.jpg").size == (20, 40)


def test_labels_mask_padding_and_keep_eos(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[1])
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    batch = ts.tokenize_captions(tokenizer, ["a red circle.", "a blue square on a white background."], 40)
    short_len = int(batch["attention_mask"][0].sum())
    assert short_len < batch["input_ids"].shape[1]  # the short caption is padded
    for row in range(2):
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, n - 1] == eos and batch["labels"][row, n - 1] == eos  # EOS is a target
        assert (batch["labels"][row, n:] == -100).all()  # padding (also EOS ids) is not
        assert torch.equal(batch["labels"][row, :n], batch["input_ids"][row, :n])
    truncated = ts.tokenize_captions(tokenizer, ["a blue square on a white background."], 4)
    assert truncated["input_ids"].shape[1] == 4 and truncated["labels"][0, -1] == eos  # cut, still ends


def test_prefix_positions_are_never_targets(tiny_models):
    model, tokenizer, _, _ = ts.build_model(
        {"vit_model": str(tiny_models[0]), "gpt2_model": str(tiny_models[1]), "lora_r": 4, "lora_alpha": 8,
         "lora_dropout": 0.0, "max_caption_tokens": 16}, torch.device("cpu"))
    seen = {}
    forward = model.lm.forward

    def spy(**kwargs):
        seen.update(kwargs)
        return forward(**kwargs)

    model.lm.forward = spy
    batch = ts.tokenize_captions(tokenizer, ["a red circle.", "a blue square here."], 16)
    pixels = torch.rand(2, 3, 32, 32)
    loss = model(pixel_values=pixels, **batch).loss
    prefix_len = 1 + (32 // 8) ** 2  # CLS + patches
    labels = seen["labels"]
    assert labels.shape[1] == prefix_len + batch["input_ids"].shape[1]
    assert (labels[:, :prefix_len] == -100).all()
    assert torch.equal(labels[:, prefix_len:], batch["labels"])
    assert seen["attention_mask"][:, :prefix_len].all()
    assert torch.isfinite(loss)
