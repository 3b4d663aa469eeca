"""The --web page: through gradio_client against the running server, and in a real headless Chromium."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import training_script as ts
from conftest import ROOT, train_args
from helpers import chromium_path


@pytest.fixture(scope="module")
def checkpoint(flickr_dir, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("web")
    ts.main(train_args(flickr_dir, tiny_models, out, "--epochs", "2", "--batch-size", "8", "--eval-interval", "0",
                       "--learning-rate", "5e-3"))
    return out / "img2gpt_epoch_2.pth"


@pytest.fixture(scope="module")
def page(checkpoint):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, str(ROOT / "inference_script.py"), "--weights", str(checkpoint),
                               "--device", "cpu", "--web", "--web-port", str(port), "--max-new-tokens", "8"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stdout.read()
        try:
            if requests.get(url, timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.5)
    else:
        pytest.fail("the page did not come up within 120 s")
    yield url
    server.terminate()
    server.wait(timeout=30)


def cli_caption(checkpoint, image):
    """What the command line says for the same image and settings: the page must say the same."""
    import inference_script

    cfg = ts.parse_config(inference_script.CONSTANTS, ["--device", "cpu", "--max-new-tokens", "8"],
                          inference_script.FLAG_ALIASES, script=inference_script.__file__)
    model, tokenizer, processor = inference_script.load_model(checkpoint, ts.resolve_device("cpu"), say=lambda _: None)
    pixels = ts.preprocess(processor, [inference_script.fetch_image(str(image), 10, 10**7)])
    return ts.generate_captions(model, tokenizer, pixels, **ts.decoding_settings(cfg))[0]


def test_page_captions_an_upload_and_a_url(page, checkpoint, flickr_dir, image_server):
    from gradio_client import Client, handle_file

    image = flickr_dir / "flickr30k_images" / "flickr30k_images" / "1009.jpg"
    expected = cli_caption(checkpoint, image)
    client = Client(page, verbose=False)
    assert client.predict(handle_file(str(image)), "", 1, 8, api_name="/caption") == expected
    assert client.predict(None, f"{image_server}/1009.jpg", 1, 8, api_name="/caption") == expected
    beams = client.predict(None, f"{image_server}/1009.jpg", 3, 5, api_name="/caption")  # the page's settings
    assert isinstance(beams, str) and len(beams.split()) <= 5
    with pytest.raises(Exception, match="answered HTTP 404"):
        client.predict(None, f"{image_server}/missing.jpg", 1, 8, api_name="/caption")
    with pytest.raises(Exception, match="Drop an image or paste its URL"):
        client.predict(None, "", 1, 8, api_name="/caption")
    for path in ("/etc/hostname", "/root", str(image), "file:///etc/hostname"):  # the box reads no server path
        with pytest.raises(Exception, match="takes http:// and https:// URLs only"):
            client.predict(None, path, 1, 8, api_name="/caption")


def test_a_busy_port_is_one_error_line_before_the_model_loads(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, str(ROOT / "inference_script.py"), "--weights", tmp_path / "x.pth",
                                 "--device", "cpu", "--web", "--web-port", str(port)], capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: --web-port {port} is busy on 127.0.0.1" in result.stderr.strip().splitlines()[-1]
    assert "Step 1" not in result.stdout and "Serving" not in result.stdout


@pytest.mark.skipif(chromium_path() is None, reason="no Chromium installed (apt-get install chromium)")
def test_page_in_a_real_browser(page, checkpoint, flickr_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    image = flickr_dir / "flickr30k_images" / "flickr30k_images" / "1009.jpg"
    expected = cli_caption(checkpoint, image)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"])
        tab = browser.new_page(viewport={"width": 1100, "height": 700})
        tab.goto(page)
        tab.locator("input[type=file]").first.set_input_files(str(image))
        tab.wait_for_timeout(500)
        tab.get_by_role("button", name="Caption").click()
        caption = tab.locator("#caption textarea")
        tab.wait_for_function("() => document.querySelector('#caption textarea').value.length > 0", timeout=60_000)
        seen = caption.input_value()
        shot = Path(os.environ.get("IMG2GPT_SCREENSHOT", tmp_path / "web_page.png"))
        tab.screenshot(path=str(shot))
        browser.close()
    print(f"the browser saw the caption {seen!r}")
    assert seen == expected and shot.stat().st_size > 10_000


def test_gallery_tab_shows_every_image_beside_its_caption(page, checkpoint, flickr_dir, image_server):
    from gradio_client import Client, handle_file

    folder = flickr_dir / "flickr30k_images" / "flickr30k_images"
    client = Client(page, verbose=False)
    html = client.predict([handle_file(str(folder / "1009.jpg")), handle_file(str(folder / "corrupt.jpg"))],
                          f"{image_server}/1010.jpg\n{image_server}/missing.jpg", api_name="/gallery")
    assert html.count('<div class="card"') == 4 and html.count("data:image/jpeg;base64,") == 2
    for name, image in (("1009.jpg", folder / "1009.jpg"), (f"{image_server}/1010.jpg", folder / "1010.jpg")):
        card = html.split(f'<div class="name">{name}</div>', 1)[1].split("</div>", 2)[0]
        assert card.endswith(cli_caption(checkpoint, image)), card
    assert "answered HTTP 404" in html and ("is not an image" in html or "is not a readable image" in html)
    for bad in ("/etc/hostname", "file:///etc/hostname"):  # the list reads no server path
        with pytest.raises(Exception, match="takes http:// and https:// URLs only"):
            client.predict([], bad, api_name="/gallery")
