"""Bad input ends in one clear 'error: ...' line and a non-zero exit, never a traceback, nothing half-done."""

import http.server
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial

import pytest
import torch
from PIL import Image

import inference_script
import training_script as ts
from conftest import ROOT, build_tiny_models, run_script, train_args, write_png_header
from helpers import cli, one_error_line


@pytest.fixture(scope="module")
def checkpoint(flickr_dir, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    ts.run_cli(ts.main, train_args(flickr_dir, tiny_models, out, "--epochs", "1", "--batch-size", "16",
                                   "--eval-interval", "0"))
    return out / "img2gpt_epoch_1.pth"


# --- checkpoints ----------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates a marker file: proof that code inside a .pth ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_checkpoints(folder, good):
    folder.mkdir()
    (folder / "random.pth").write_bytes(bytes(range(256)) * 40)
    torch.save(torch.nn.Linear(3, 3).state_dict(), folder / "state_dict.pth")
    data = good.read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    (folder / "a_folder.pth").mkdir()
    return {
        "missing.pth": "not found",
        "a_folder.pth": "is a folder",
        "random.pth": "not a readable checkpoint",
        "state_dict.pth": "plain state_dict of another model",
        "truncated.pth": "maybe truncated",
    }


def test_bad_checkpoints_are_refused_with_a_reason(checkpoint, tmp_path, capsys):
    for name, reason in bad_checkpoints(tmp_path / "bad", checkpoint).items():
        code, out, err = cli(capsys, inference_script, "--weights", tmp_path / "bad" / name, "--device", "cpu")
        assert code == 1 and reason in one_error_line(err), (name, err)
        assert "Step 1" not in out  # refused before any model is loaded


def test_unreadable_checkpoint(checkpoint, monkeypatch, capsys):
    def denied(*args, **kwargs):  # tests run as root, who reads any file: simulate the OS saying no
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "load", denied)
    code, _, err = cli(capsys, inference_script, "--weights", checkpoint, "--device", "cpu")
    assert code == 1 and "permission denied" in one_error_line(err)


def test_pickle_payload_never_runs(checkpoint, tmp_path):
    marker = tmp_path / "payload_ran"
    state = torch.load(checkpoint, weights_only=True)
    state["extra"] = Payload(marker)
    with open(tmp_path / "evil.pth", "wb") as file:
        torch.save(state, file, pickle_module=pickle)
    assert not marker.exists()
    result = run_script("inference_script.py", "--weights", tmp_path / "evil.pth", "--device", "cpu")
    assert result.returncode == 1 and "never loaded" in one_error_line(result.stderr)
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload does work when unpickled unsafely
    assert marker.exists()


def test_checkpoint_for_other_base_models_names_the_sizes(checkpoint, tmp_path, capsys):
    wide_vit, _ = build_tiny_models(tmp_path / "wide", hidden=48, layers=1)
    code, _, err = cli(capsys, inference_script, "--weights", checkpoint, "--device", "cpu", "--vit-model", wide_vit)
    assert code == 1 and "projection_in is 32 but the base models give 48" in one_error_line(err)


# --- images ---------------------------------------------------------------------------------------
class Handler(http.server.BaseHTTPRequestHandler):
    """/good.png an image, /500 a server error, /page.html HTML, /big.png 50 kB, /nolength 200 kB without a
    Content-Length header; anything else 404."""

    def do_GET(self):
        if self.path == "/500":
            self.send_error(500)
        elif self.path in ("/good.png", "/page.html", "/big.png"):
            body, kind = self.server.files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/nolength":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(200):
                self.wfile.write(b"\0" * 1024)
            self.close_connection = True
        else:
            self.send_error(404)

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client hung up on a body it refused: expected
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    Image.new("RGB", (32, 32), "red").save(folder / "good.png")
    Image.effect_noise((128, 128), 100).convert("RGB").save(folder / "big.png")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.files = {"/good.png": ((folder / "good.png").read_bytes(), "image/png"),
                    "/page.html": (b"<html><body>not an image</body></html>", "text/html"),
                    "/big.png": ((folder / "big.png").read_bytes(), "image/png")}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed = socket.socket()  # a port where nothing listens: connection refused
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    yield {"http": f"http://127.0.0.1:{server.server_address[1]}", "silent": silent.getsockname()[1],
           "closed": closed_port, "big_size": len(server.files["/big.png"][0])}
    server.shutdown()
    silent.close()


def test_every_bad_image_is_reported_and_the_good_ones_captioned(checkpoint, servers, tmp_path, capsys):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (40, 40), "blue").save(good)
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 50)
    write_png_header(tmp_path / "bomb.png", 30000, 30000)
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "text.jpg").write_text("just some text")
    base = servers["http"]
    expected = {  # source -> what its error line says
        f"{base}/missing.jpg": "HTTP 404",
        f"{base}/500": "HTTP 500",
        f"{base}/page.html": "(Content-Type: text/html) is not an image",
        f"{base}/big.png": "larger than 20,000 bytes",
        f"{base}/nolength": "larger than 20,000 bytes",
        f"http://127.0.0.1:{servers['closed']}/x.jpg": "could not connect",
        f"http://127.0.0.1:{servers['silent']}/x.jpg": "did not answer within 2 s",
        "ftp://example.com/x.jpg": "only http:// and https://",
        "file:///etc/passwd": "only http:// and https://",
        str(tmp_path / "nowhere.jpg"): "not found",
        str(tmp_path / "folder.jpg"): "is a folder with no images",
        str(tmp_path / "truncated.jpg"): "not a readable image",
        str(tmp_path / "corrupt.jpg"): "not a readable image",
        str(tmp_path / "text.jpg"): "not an image in any format Pillow reads",
        str(tmp_path / "bomb.png"): "more pixels than Pillow decodes safely",
    }
    assert servers["big_size"] > 20_000
    sources = [f"{base}/good.png", *expected, str(good)]
    started = time.monotonic()
    code, out, err = cli(capsys, inference_script, "--weights", checkpoint, "--device", "cpu", "--max-new-tokens", "3",
                         "--request-timeout", "2", "--max-image-bytes", "20000",
                         *[arg for source in sources for arg in ("--image", source)])
    assert time.monotonic() - started < 60  # the silent server is bounded by the timeout
    assert code == 1 and "Traceback" not in err
    assert out.count("Generated Caption: ") == 2
    assert f"Image URL: {base}/good.png" in out and f"Image URL: {good}" in out
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    print("\n".join(errors))
    assert len(errors) == len(expected) + 1
    for line, (source, reason) in zip(errors, expected.items()):
        assert reason in line and source.split("://")[-1][:20] in line, (source, line)
    assert errors[-1] == f"error: {len(expected)} of {len(sources)} images could not be captioned"


class Trickle:
    """A server answering one byte every 0.1 s, for at most 30 s, so that no socket timeout ever fires:
    /headers trickles its status line and headers, /body a body of a declared 100,000 bytes, /unsized a body
    without Content-Length (its end is the connection's end). `connected` is set at each connection."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connected = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connected.set()
            threading.Thread(target=self.answer, args=(connection,), daemon=True).start()

    def answer(self, connection):
        with connection:
            path = connection.recv(4096).split(b" ")[1]
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
            slow = {b"/headers": head + b"X-Padding: " + b"x" * 1000,
                    b"/body": b"Content-Length: 100000\r\n\r\n" + b"\0" * 1000,
                    b"/unsized": b"Connection: close\r\n\r\n" + b"\0" * 1000}[path]
            if path != b"/headers":
                connection.sendall(head)
            started = time.monotonic()
            try:
                for byte in slow:
                    if time.monotonic() - started > 30:
                        return
                    connection.sendall(bytes([byte]))
                    time.sleep(0.1)
            except OSError:  # the client hung up
                return


@pytest.fixture()
def trickle():
    server = Trickle()
    yield server
    server.listener.close()


@pytest.mark.parametrize("path", ["/headers", "/body", "/unsized"])
def test_a_byte_a_second_server_cannot_outlast_the_timeout(trickle, path):
    started = time.monotonic()
    with pytest.raises(ts.Img2GPTError, match=r"did not answer within 1.5 s \(--request-timeout\)"):
        inference_script.download(trickle.url + path, 1.5, 10**6)
    assert time.monotonic() - started < 10  # the server trickles for 30 s


def test_ctrl_c_stops_inference_during_a_slow_download(checkpoint, trickle, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), "red").save(good)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "inference_script.py"), "--weights", str(checkpoint), "--device", "cpu",
         "--request-timeout", "120", "--image", trickle.url + "/body", "--image", str(good)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert trickle.connected.wait(120), "the download never started"
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=20)  # the download's own deadline is 120 s away
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("Ctrl+C did not stop inference") from None
    assert process.returncode == 1 and err.strip().splitlines()[-1] == "interrupted", err
    assert "Traceback" not in err and "Generated Caption" not in out


def test_default_request_timeout_is_under_a_minute():
    assert 0 < inference_script.REQUEST_TIMEOUT < 60


def test_entry_point_prints_no_traceback(tmp_path):
    result = run_script("training_script.py", "--data-dir", tmp_path / "nowhere", "--device", "cpu")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: data folder") and "Traceback" not in result.stderr
    result = run_script("training_script.py", "--device", "cuda:0" if not torch.cuda.is_available() else "nope")
    assert result.returncode == 1 and "Traceback" not in result.stderr


# --- images that pass the up-front check, or fail in unusual ways (issue 10) ------------------------
def test_a_sample_image_cut_short_is_left_out_by_name(tmp_path, capsys):
    import pandas as pd
    from transformers import ViTImageProcessor

    for name, color in (("a.jpg", "red"), ("c.jpg", "blue"), ("d.jpg", "green")):
        Image.new("RGB", (40, 40), color).save(tmp_path / name, quality=95)
    photo = tmp_path / "photo.jpg"
    Image.effect_noise((200, 200), 60).convert("RGB").save(photo, quality=90)
    (tmp_path / "b.jpg").write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])  # a JPEG cut short
    assert ts.is_usable_image(tmp_path / "b.jpg")  # verify() does not see it: the sample set must
    captions = pd.DataFrame({"image_name": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "caption": ["x", "y", "z", "w"]})
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    samples = ts.sample_set(captions, ["b.jpg", "a.jpg", "c.jpg", "d.jpg"], partial(ts.image_in_folder, tmp_path),
                           processor, 2)
    assert samples["names"] == ["a.jpg", "c.jpg"] and samples["references"] == ["x", "z"]
    assert samples["pixel_values"].shape == (2, 3, 32, 32)
    assert "Left out sample image b.jpg: not a decodable image" in capsys.readouterr().out


def unusual_failure(real, bad_name):
    """load_image that raises what a malformed DDS makes Pillow raise, for one file."""
    def load(source):
        if str(source).endswith(bad_name):
            raise NotImplementedError("Unimplemented pixel format")
        return real(source)
    return load


def test_an_image_failing_in_an_unusual_way_is_left_out_in_training(tmp_path, monkeypatch, capsys):
    from transformers import ViTImageProcessor

    for name in ("good.jpg", "odd.dds"):
        Image.new("RGB", (40, 40), "red").save(tmp_path / name, format="JPEG")
    monkeypatch.setattr(ts, "load_image", unusual_failure(ts.load_image, "odd.dds"))
    dataset = ts.CaptionDataset([("good.jpg", "a"), ("odd.dds", "b")], partial(ts.image_in_folder, tmp_path),
                                ViTImageProcessor(size={"height": 32, "width": 32}))
    assert dataset[0] is not None and dataset[1] is None
    assert "Left out odd.dds: not a decodable image (NotImplementedError" in capsys.readouterr().err


def test_an_image_failing_in_an_unusual_way_does_not_take_the_others_down(checkpoint, tmp_path, monkeypatch,
                                                                          capsys):
    for name in ("good.jpg", "odd.dds"):
        Image.new("RGB", (40, 40), "red").save(tmp_path / name, format="JPEG")
    monkeypatch.setattr(inference_script, "load_image", unusual_failure(inference_script.load_image, "odd.dds"))
    code, out, err = cli(capsys, inference_script, "--weights", checkpoint, "--device", "cpu", "--max-new-tokens", "3",
                         "--image", tmp_path / "odd.dds", "--image", tmp_path / "good.jpg")
    assert code == 1 and f"Image URL: {tmp_path / 'good.jpg'}" in out
    assert f"'{tmp_path / 'odd.dds'}' is not a readable image (Unimplemented pixel format)" in err
    assert "1 of 2 images could not be captioned" in err and "Traceback" not in err


# --- lists and folders (issue 10) -------------------------------------------------------------------
def test_lists_are_decoded_tolerantly_and_may_name_folders(tmp_path):
    folder = tmp_path / "holiday photos"
    folder.mkdir()
    for name in ("b.jfif", "a.avif", "c.jpe", "notes.md", "clip.mpg"):
        (folder / name).write_bytes(b"")  # the scan goes by file type; decoding is checked when captioned
    cafe = tmp_path / "café.jpg"
    Image.new("RGB", (8, 8)).save(cafe, format="JPEG")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeff# made by Notepad\r\nhttp://127.0.0.1:9/x.jpg\r\n".encode("utf-8"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(f"{cafe}\n{folder}\n{bom}\n".encode("latin-1"))
    sources = list(inference_script.expand_sources([str(bom), str(latin)]))
    assert sources == ["http://127.0.0.1:9/x.jpg", str(cafe),  # the BOM is not part of the first line
                       *(str(folder / n) for n in ("a.avif", "b.jfif", "c.jpe")),  # a folder named in a list
                       str(bom)]  # a list named in a list is not opened again: it will be reported, not looped


def test_a_named_pipe_never_hangs_a_run(checkpoint, tmp_path, capsys):
    import os

    os.mkfifo(tmp_path / "pipe.jpg")  # nothing ever writes to it: a read would wait forever
    good = tmp_path / "good.jpg"
    Image.new("RGB", (40, 40), "blue").save(good)
    assert not ts.is_usable_image(tmp_path / "pipe.jpg")  # training's check at start passes it over
    started = time.monotonic()
    code, out, err = cli(capsys, inference_script, "--weights", checkpoint, "--device", "cpu", "--max-new-tokens", "3",
                         "--image", tmp_path / "pipe.jpg", "--image", good)
    assert time.monotonic() - started < 60
    assert code == 1 and f"Image URL: {good}" in out
    assert f"'{tmp_path / 'pipe.jpg'}' is not a regular file (a named pipe or a device)" in err
