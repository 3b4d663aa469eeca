"""Data as it comes when it outgrows a folder, built from shape pictures: WebDataset shards as img2dataset writes
them (KEY.jpg, KEY.txt, KEY.json, with NNNNN.parquet and NNNNN_stats.json beside each shard) and a Hugging Face
dataset of parquet files with an Image column and a list of captions per row."""

import io
import json
import random
import tarfile
from pathlib import Path

from conftest import COLORS, SHAPES, draw_shape, shape_captions


def shape_samples(count, seed=0):
    """[(index, JPEG bytes, captions)] of `count` shape pictures."""
    rng, samples = random.Random(seed), []
    for index in range(count):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        buffer = io.BytesIO()
        draw_shape(color, shape, rng).save(buffer, format="JPEG")
        samples.append((index, buffer.getvalue(), shape_captions(color, shape)))
    return samples


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, samples, shards, caption_in="txt"):
    """`samples` dealt in order to `shards` shards folder/00000.tar...: KEY.jpg, the first caption as KEY.txt
    (caption_in "json": only in KEY.json) and KEY.json; keys as img2dataset makes them (shard and index).
    Returns {shard path: [sample names as training names them (shard stem/key)]}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for shard in range(shards):
        part = samples[shard::shards]
        path = folder / f"{shard:05d}.tar"
        names = []
        with tarfile.open(path, "w") as tar:
            for k, (_, image, captions) in enumerate(part):
                key = f"{shard:05d}{k:04d}"
                add_member(tar, f"{key}.jpg", image)
                if caption_in == "txt":
                    add_member(tar, f"{key}.txt", captions[0].encode("utf-8"))
                add_member(tar, f"{key}.json", json.dumps({"key": key, "caption": captions[0], "status": "success",
                                                          "width": 32, "height": 32}).encode("utf-8"))
                names.append(f"{shard:05d}/{key}")
        keys = [name.split("/")[1] for name in names]
        table = {"key": keys, "caption": [c[0] for _, _, c in part], "status": ["success"] * len(keys)}
        pq.write_table(pa.table(table), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(part), "successes": len(part),
                                                                   "failed_to_download": 0}))
        written[path] = names
    return written


def write_hf_dataset(folder, samples, files, split_column=False):
    """folder/data/train-0000i-of-0000n.parquet: columns image (Image), caption (list of captions) and, with
    split_column, split (train, val, test by index mod 5: 3 train, 1 val, 1 test). Returns the folder."""
    import datasets

    features = {"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))}
    if split_column:
        features["split"] = datasets.Value("string")
    (Path(folder) / "data").mkdir(parents=True, exist_ok=True)
    for part in range(files):
        chosen = samples[part::files]
        columns = {"image": [{"bytes": image, "path": f"{index}.jpg"} for index, image, _ in chosen],
                   "caption": [captions for _, _, captions in chosen]}
        if split_column:
            columns["split"] = [("train", "train", "train", "val", "test")[index % 5] for index, _, _ in chosen]
        dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        dataset.to_parquet(str(Path(folder) / "data" / f"train-{part:05d}-of-{files:05d}.parquet"))
    return Path(folder)
