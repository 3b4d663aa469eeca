"""Data that outgrows a folder: WebDataset shards (a folder, a brace pattern, http URLs) and Hugging Face parquet
datasets are streamed; the held-out split is fixed by key hashes (or the data's own); every training sample is
read once per epoch across processes and workers, which take the same number of steps; a resume reads exactly
what the interrupted run had not; bad shards and samples are left out and counted."""

import http.server
import io
import json
import tarfile
import threading
import time
from collections import Counter

import pytest
from PIL import Image

import training_script as ts
from conftest import train_args
from helpers import cli, config_of, one_error_line
from streams import add_member, shape_samples, write_hf_dataset, write_shards


@pytest.fixture(scope="module")
def samples():
    return shape_samples(60)


@pytest.fixture(scope="module")
def shards(samples, tmp_path_factory):
    """Five shards of 12 samples (an uneven count for 2 processes x 2 workers); {path: [names]}."""
    folder = tmp_path_factory.mktemp("shards")
    return folder, write_shards(folder, samples, 5)


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[1])
    tokenizer.pad_token = tokenizer.eos_token  # as build_model sets it
    return tokenizer


@pytest.fixture(scope="module")
def processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 32, "width": 32})


def epoch_keys(data, processor, tokenizer, cfg, epoch, rank=0, world=1, progress=None, stop_after=None):
    """[(where, keys)] of the batches this process's loader gives for `epoch`, as training reads them."""
    dataset = ts.train_batches(data, processor, cfg, epoch, rank, world, progress)
    batches = []
    for batch in ts.make_loader(dataset, tokenizer, cfg, epoch):
        batches.append((tuple(batch["where"]), batch.get("keys", [])))
        if stop_after and len(batches) == stop_after:
            break
    return dataset, batches


@pytest.fixture(scope="module")
def shard_server(shards):
    """http://127.0.0.1:PORT/ serving the shard folder; /stall.tar sends 2 KiB of a shard, then nothing."""
    folder, written = shards
    head = next(iter(written)).read_bytes()[:2048]

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            if self.path.startswith("/stall"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(head) * 50))
                self.end_headers()
                self.wfile.write(head)
                self.wfile.flush()
                time.sleep(4)
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_folder_a_pattern_and_urls_read_the_same_samples(shards, shard_server):
    folder, written = shards
    every = sorted(name for names in written.values() for name in names)
    found, splits = [], []
    for spec in (folder, f"{folder}/{{00000..00004}}.tar", f"{shard_server}/{{00000..00004}}.tar"):
        data = ts.prepare_data(config_of("--data-dir", spec), main=False)
        assert data.layout == "webdataset"
        found.append(data.stream.units)
        splits.append(data.splits)
        held = data.splits["val"] + data.splits["test"]
        assert data.train_images + len(held) == 60 and set(held) <= set(every)
        assert data.train_captions == 60 - len(held)  # one caption (KEY.txt) per img2dataset sample
    assert found[0] == found[1] == sorted(map(str, written))  # the .parquet and _stats.json are no shards
    assert found[2] == [f"{shard_server}/{path.name}" for path in sorted(written)]
    assert splits[0] == splits[1] == splits[2]  # held out by the names, wherever the shards are read from


def test_captions_come_from_the_json_when_there_is_no_txt(samples, tmp_path):
    write_shards(tmp_path, samples[:20], 2, caption_in="json")
    data = ts.prepare_data(config_of("--data-dir", tmp_path, "--val-images", "2", "--test-images", "2"), main=False)
    assert data.train_images == 16 and data.train_captions == 16
    truth = {f"{i % 2:05d}/{i % 2:05d}{i // 2:04d}": captions[0] for i, (_, _, captions) in enumerate(samples[:20])}
    for name, caption in zip(data.captions["image_name"], data.captions["caption"]):
        assert caption == ts.clean_caption(truth[name])


def test_the_held_out_split_is_fixed_disjoint_and_sized(shards):
    folder, written = shards
    first = ts.prepare_data(config_of("--data-dir", folder, "--val-images", "4", "--test-images", "3"), main=False)
    again = ts.prepare_data(config_of("--data-dir", f"{folder}/{{00000..00004}}.tar", "--val-images", "4",
                                   "--test-images", "3"), main=False)
    assert (len(first.splits["val"]), len(first.splits["test"])) == (4, 3)
    assert first.splits == again.splits and first.train_split == again.train_split
    assert not set(first.splits["val"]) & set(first.splits["test"])
    assert "hash" in first.split_name
    other_seed = ts.prepare_data(config_of("--data-dir", folder, "--val-images", "4", "--test-images", "3",
                                        "--seed", "7"), main=False)
    assert other_seed.splits["val"] != first.splits["val"]
    small = ts.prepare_data(config_of("--data-dir", folder), main=False)  # 10% of 60 each, not 1014 / 1000
    assert (len(small.splits["val"]), len(small.splits["test"])) == (6, 6)


def test_two_processes_of_two_workers_read_every_sample_once_in_equal_steps(shards, processor, tokenizer):
    folder, written = shards
    cfg = config_of("--data-dir", folder, "--num-workers", "2", "--batch-size", "4")
    data = ts.prepare_data(cfg, main=False)
    held = set(data.splits["val"] + data.splits["test"])
    expected = Counter(name for names in written.values() for name in names if name not in held)
    for epoch in (1, 2):
        read, lengths, steps = Counter(), [], []
        for rank in range(2):
            dataset, batches = epoch_keys(data, processor, tokenizer, cfg, epoch, rank, world=2)
            lengths.append(len(dataset))
            steps.append(len(batches))
            read.update(key for _, keys in batches for key in keys)
            assert {where[0] for where, _ in batches} == {2 * rank, 2 * rank + 1}  # both workers of this process
            assert all(len(keys) <= 4 for _, keys in batches)
        assert steps[0] == steps[1] == lengths[0] == lengths[1]  # lockstep, and the bars' totals are true
        assert read == expected  # no duplicates, none missing
    # Each process reads its own shards, each worker its own part of them.
    slots = ts.deal_units(data.stream.train_rows, 2, 2)
    assert sorted(u for slot in slots for u in slot) == list(range(5)) and all(slots)


def test_epochs_differ_in_order_and_the_same_epoch_is_the_same(shards, processor, tokenizer):
    folder, _ = shards
    cfg = config_of("--data-dir", folder, "--num-workers", "0", "--batch-size", "4")
    data = ts.prepare_data(cfg, main=False)
    one = epoch_keys(data, processor, tokenizer, cfg, 1)[1]
    assert one == epoch_keys(data, processor, tokenizer, cfg, 1)[1]
    assert one != epoch_keys(data, processor, tokenizer, cfg, 2)[1]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_resume_reads_exactly_the_batches_the_interrupted_run_had_not(shards, processor, tokenizer, workers):
    folder, _ = shards
    cfg = config_of("--data-dir", folder, "--num-workers", workers, "--batch-size", "3")
    data = ts.prepare_data(cfg, main=False)
    _, whole = epoch_keys(data, processor, tokenizer, cfg, 2)
    dataset, trained = epoch_keys(data, processor, tokenizer, cfg, 2, stop_after=5)
    progress = list(dataset.progress)
    for (slot, number), _ in trained:  # what training records as each batch is taken
        progress[slot] = number + 1
    resumed_set, rest = epoch_keys(data, processor, tokenizer, cfg, 2, progress=progress)
    assert len(resumed_set) == len(whole) - 5 == len(rest)
    assert sorted(trained + rest) == sorted(whole)


def broken_shards(samples, folder):
    """Four shards, each with one problem: cut short mid-member, a .jpg that is text, a sample with no caption,
    and a sample with no image. Returns the names that can train."""
    written = write_shards(folder, samples[:24], 4)
    paths = list(written)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[:len(data) // 2 + 100])  # a download cut short
    with tarfile.open(paths[1], "a") as tar:
        add_member(tar, "0000199.jpg", b"<html>not found</html>")
        add_member(tar, "0000199.txt", b"a page that is not an image")
    with tarfile.open(paths[2], "a") as tar:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
        add_member(tar, "0000299.jpg", buffer.getvalue())
        add_member(tar, "0000299.json", json.dumps({"status": "success"}).encode())
    with tarfile.open(paths[3], "a") as tar:
        add_member(tar, "0000399.txt", b"a caption without its picture")
    return paths


def test_bad_shards_and_samples_are_left_out_by_name_and_counted(samples, tmp_path, capsys):
    paths = broken_shards(samples, tmp_path)
    data = ts.prepare_data(config_of("--data-dir", tmp_path, "--val-images", "0", "--test-images", "0"))
    out = capsys.readouterr().out
    assert "Left out 1 of 4 shard(s) from where they could not be read (e.g. 00000: ReadError" in out
    assert "Left out 3 samples without an image, a caption or a known split" in out
    reasons = dict(line.split(": ", 1) for line in data.left_out)
    assert reasons["00001/0000199"] == "not an image" and reasons["00002/0000299"] == "no caption"
    assert reasons["00003/0000399"].startswith("no image") and "00000 (from there on)" in reasons
    kept = data.train_images
    assert 18 <= kept < 24 - 0  # three whole shards and what the cut one holds before the cut
    assert data.stream.train_rows[1:] == [6, 6, 6]
    assert paths[0].exists()


def test_a_missing_or_stalling_url_is_left_out_within_the_timeout(shard_server, capsys):
    spec = f"{shard_server}/{{00000,00001,00002,missing,stall}}.tar"
    started = time.perf_counter()
    data = ts.prepare_data(config_of("--data-dir", spec, "--request-timeout", "1", "--val-images", "0",
                                  "--test-images", "0"))
    took = time.perf_counter() - started
    out = capsys.readouterr().out
    assert "Left out 2 of 5 shard(s)" in out
    problems = [line for line in data.left_out if "(from there on)" in line]
    assert any("missing" in line and "404" in line for line in problems), problems
    assert any("stall" in line and "timed out" in line.lower() for line in problems), problems
    assert data.train_images >= 36 and took < 4  # the stall ended at the 1 s timeout, not the server's 4 s


def test_nothing_readable_is_one_error_line(tmp_path, tiny_models, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"this is no tar file" * 100)
    code, _, err = cli(capsys, ts, *train_args(tmp_path / "shards", tiny_models, tmp_path / "out"))
    assert code != 0 and "nothing could be read from 1 WebDataset shard(s)" in one_error_line(err)
    code, _, err = cli(capsys, ts, *train_args(f"{tmp_path}/none/{{0..3}}.tar", tiny_models, tmp_path / "out2"))
    assert code != 0 and "nothing could be read" in one_error_line(err)
    assert not (tmp_path / "out" / "img2gpt_last.pth").exists()


def test_hugging_face_columns_and_own_split(samples, tmp_path, tiny_models, capsys):
    plain = write_hf_dataset(tmp_path / "plain", samples[:30], 3)
    data = ts.prepare_data(config_of("--hf-dataset", plain), main=False)
    assert data.layout == "huggingface" and data.train_images == 24 and data.train_captions == 24 * 5
    assert len(data.stream.units) == 3 and "hash" in data.split_name
    split = write_hf_dataset(tmp_path / "split", samples[:30], 2, split_column=True)
    data = ts.prepare_data(config_of("--hf-dataset", split), main=False)
    assert data.split_name == "the data's own split" and data.train_images == 18
    assert (len(data.splits["val"]), len(data.splits["test"])) == (6, 6)
    for flag, value, expected in (("--caption-column", "nope", "--caption-column 'nope' is not a column of"),
                                  ("--image-column", "caption", "holds no images")):
        code, _, err = cli(capsys, ts, "--hf-dataset", plain, flag, value, "--device", "cpu", "--vit-model",
                           tiny_models[0], "--gpt2-model", tiny_models[1], "--output-dir", tmp_path / "out")
        assert code != 0 and expected in one_error_line(err)
    code, _, err = cli(capsys, ts, "--hf-dataset", tmp_path / "nowhere", "--device", "cpu", "--vit-model",
                       tiny_models[0], "--gpt2-model", tiny_models[1], "--output-dir", tmp_path / "out")
    assert code != 0 and "cannot read Hugging Face dataset" in one_error_line(err)


def test_batches_are_planned_for_equal_steps_with_every_row_once():
    rows = [40, 3, 17, 0, 29, 5]  # 3 processes x 2 workers, uneven
    sizes = ts.batch_sizes(rows, 8, world=3, workers=2)
    assert [sum(s) for s in sizes] == rows and all(0 < size <= 8 for s in sizes for size in s)
    steps = [len(sizes[2 * r]) + len(sizes[2 * r + 1]) for r in range(3)]
    assert steps == [6] * 3  # process 0 needs 5 + 1 batches of at most 8; the others take smaller ones
    assert all(max(s) - min(s) <= 1 for s in sizes if s)
    with pytest.raises(ts.Img2GPTError, match="cannot be shared by 2 processes: process 1 would hold 1 caption rows"):
        ts.batch_sizes([40, 0, 1, 0], 8, world=2, workers=2)


def test_odd_shard_names_and_captions(samples, tmp_path, capsys):
    write_shards(tmp_path / "a", samples[:10], 1)  # a/00000.tar and b/00000.tar: one file name, two shards
    write_shards(tmp_path / "b", samples[10:20], 1)
    data = ts.prepare_data(config_of("--data-dir", f"{tmp_path}/{{a,b}}/00000.tar", "--val-images", "0",
                                  "--test-images", "0"), main=False)
    assert data.train_captions == 20 and [data.stream.source.name(u) for u in data.stream.units] == ["a/00000",
                                                                                                        "b/00000"]
    quoted = ts.prepare_data(config_of("--data-dir", f"{tmp_path}/*/*.tar", "--val-images", "0", "--test-images", "0"),
                             main=False)  # a wildcard the shell did not expand
    assert quoted.stream.units == data.stream.units
    odd = tmp_path / "odd"
    odd.mkdir()
    with tarfile.open(odd / "00000.tar", "w") as tar:
        for key, caption in (("k1", "café crème".encode("latin-1")), ("k2", None), ("k3", b"a good one")):
            add_member(tar, f"{key}.jpg", samples[0][1])
            if caption is not None:
                add_member(tar, f"{key}.txt", caption)
            else:
                add_member(tar, f"{key}.json", json.dumps({"caption": 123}).encode())  # a number is no caption
    data = ts.prepare_data(config_of("--data-dir", odd, "--val-images", "0", "--test-images", "0"), main=False)
    rows = [(name, captions) for name, _, captions, _ in data.stream.source.samples(data.stream.units[0])]
    assert rows[0] == ("00000/k1", ["café crème"]) and data.train_captions == 2
    assert data.left_out == ["00000/k2: no caption"]


def test_a_named_pipe_among_the_shards_is_left_out_not_waited_on(samples, tmp_path):
    import os

    write_shards(tmp_path, samples[:10], 1)
    os.mkfifo(tmp_path / "00001.tar")
    result = {}
    reader = threading.Thread(target=lambda: result.update(data=ts.prepare_data(config_of(
        "--data-dir", tmp_path, "--val-images", "0", "--test-images", "0"), main=False)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert "data" in result, "reading a named pipe blocked"
    assert result["data"].train_captions == 10
    assert "00001 (from there on): OSError: not a regular file" in result["data"].left_out


def test_one_parquet_file_and_both_sources_at_once(samples, tmp_path, tiny_models, capsys):
    folder = write_hf_dataset(tmp_path / "hf", samples[:20], 1)
    (one,) = (folder / "data").glob("*.parquet")
    data = ts.prepare_data(config_of("--hf-dataset", one, "--val-images", "0", "--test-images", "0"), main=False)
    assert data.train_images == 20
    code, _, err = cli(capsys, ts, "--hf-dataset", folder, "--data-dir", tmp_path, "--device", "cpu",
                       "--output-dir", tmp_path / "out")
    assert code != 0 and "--data-dir and --hf-dataset both name data" in one_error_line(err)
