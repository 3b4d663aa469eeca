"""Folders laid out as each dataset Img2GPT reads comes, with the quirks of the real files. Each builder draws
n_images shape pictures and returns {image name as the captions list it: (color, shape)}."""

import csv
import io
import json
import random
from pathlib import Path

from conftest import COLORS, SHAPES, draw_shape, shape_captions


def pictures(folder, names, seed):
    """Draw one shape picture per name into folder; {name: (color, shape)}."""
    rng, truth = random.Random(seed), {}
    for name in names:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
        draw_shape(color, shape, rng).save(Path(folder) / name, format="JPEG")
        truth[name] = (color, shape)
    return truth


def make_flickr8k_folder(root, n_images, seed=0):
    """Kaggle's adityajn105/flickr8k: Images/<digits>_<hex>.jpg and captions.txt, a real CSV with header
    'image,caption': a quoted caption holding commas and quotes, one with an unquoted comma, a blank caption,
    a row listed twice, CRLF line ends."""
    names = [f"{1000268201 + 7919 * i}_{i:010x}.jpg" for i in range(n_images)]
    truth = pictures(Path(root) / "Images", names, seed)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(["image", "caption"])
    for name, (color, shape) in truth.items():
        writer.writerows([name, caption] for caption in shape_captions(color, shape))
    first, (color, shape) = next(iter(truth.items()))
    writer.writerow([first, f'a {color} {shape}, "small", on white .'])
    buffer.write(f"{first},a {color} {shape}, drawn plainly .\r\n")  # the comma is not quoted
    writer.writerow([first, "   "])
    writer.writerow([first, shape_captions(color, shape)[0]])  # listed twice
    (Path(root) / "captions.txt").write_text(buffer.getvalue(), encoding="utf-8", newline="")
    return truth


def coco_names(split, ids):
    return [f"COCO_{split}2014_{image_id:012d}.jpg" for image_id in ids]


def make_coco_folder(root, n_images, seed=0):
    """COCO 2014: annotations/captions_{train,val}2014.json ({images: [{id, file_name}], annotations:
    [{image_id, id, caption}]}) beside train2014/ and val2014/; captions with stray spaces and newlines,
    one annotation of an image id the file does not list."""
    truth, half = {}, n_images // 2
    for split, ids in (("train", range(9, 9 + half)), ("val", range(500, 500 + n_images - half))):
        names = coco_names(split, ids)
        found = pictures(Path(root) / f"{split}2014", names, seed + len(split))
        truth.update({f"{split}2014/{name}": value for name, value in found.items()})
        images = [{"id": image_id, "file_name": name, "height": 32, "width": 32} for image_id, name in zip(ids, names)]
        annotations = [{"image_id": image_id, "id": 10 * image_id + k, "caption": f" {caption}\n"}
                       for image_id, (color, shape) in zip(ids, found.values())
                       for k, caption in enumerate(shape_captions(color, shape))]
        annotations.append({"image_id": 999999, "id": 1, "caption": "an image that is not listed"})
        content = {"info": {"year": 2014}, "licenses": [], "images": images, "annotations": annotations}
        (Path(root) / "annotations").mkdir(parents=True, exist_ok=True)
        (Path(root) / "annotations" / f"captions_{split}2014.json").write_text(json.dumps(content))
    return truth


def karpathy_entries(truth, splits, filepath=None):
    """Karpathy dataset_*.json image entries for the images in truth with the given splits, in order."""
    entries = []
    for (name, (color, shape)), split in zip(truth.items(), splits):
        entry = {"filename": Path(name).name, "split": split,
                 "sentences": [{"raw": c, "tokens": c.split()} for c in shape_captions(color, shape)]}
        if filepath:
            entry["filepath"] = filepath(name)
        entries.append(entry)
    return entries


def karpathy_splits(n_images):
    """Mostly train and restval, with two val and two test images."""
    return ["val", "val", "test", "test"] + ["restval" if i % 3 == 0 else "train" for i in range(n_images - 4)]


def make_karpathy_folder(root, n_images, seed=0):
    """A Karpathy dataset_flickr8k.json with the images in a folder named like neither (pics/)."""
    names = [f"{2000000 + i}_{i:010x}.jpg" for i in range(n_images)]
    truth = pictures(Path(root) / "pics", names, seed)
    content = {"dataset": "flickr8k", "images": karpathy_entries(truth, karpathy_splits(n_images))}
    (Path(root) / "dataset_flickr8k.json").write_text(json.dumps(content))
    return truth


def make_imagefolder(root, n_images, seed=0, kind="jsonl"):
    """Hugging Face imagefolder: metadata.jsonl (captions as lists, subfolders, names with spaces, a split
    column, a broken line) or metadata.csv (Latin-1, one caption a row, a caption with '|', no split)."""
    names = [f"{'cats' if i % 2 else 'dogs'}/my photo {i}.jpg" for i in range(n_images)]
    truth = pictures(root, names, seed)
    splits = ["validation", "test"] + ["train"] * (n_images - 2)
    if kind == "jsonl":
        lines = [json.dumps({"file_name": name, "text": shape_captions(color, shape), "split": split})
                 for (name, (color, shape)), split in zip(truth.items(), splits)]
        lines.insert(3, '{"file_name": "broken.jpg", "text": ')
        (Path(root) / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        rows = [["file_name", "caption"]]
        rows += [[name, caption] for name, (color, shape) in truth.items() for caption in shape_captions(color, shape)]
        rows.append([names[0], "a café | with a pipe ."])
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\r\n").writerows(rows)
        (Path(root) / "metadata.csv").write_bytes(buffer.getvalue().encode("latin-1"))
    return truth


def make_plain_csv_folder(root, n_images, seed=0):
    """Your own images and an image,caption CSV of them, with a UTF-8 BOM, in a subfolder."""
    names = [f"holiday {i}.jpg" for i in range(n_images)]
    truth = pictures(Path(root) / "photos", names, seed)
    rows = [["image", "caption"]] + [[name, c] for name, (color, shape) in truth.items()
                                     for c in shape_captions(color, shape)]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    (Path(root) / "photos" / "captions.csv").write_text("\ufeff" + buffer.getvalue(), encoding="utf-8")
    return truth


BUILDERS = {"flickr8k": make_flickr8k_folder, "coco": make_coco_folder, "karpathy": make_karpathy_folder,
            "imagefolder-jsonl": make_imagefolder, "imagefolder-csv": lambda root, n, seed=0: make_imagefolder(
                root, n, seed, kind="csv"), "plain-csv": make_plain_csv_folder}
