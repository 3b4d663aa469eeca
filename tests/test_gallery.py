"""Pages that show images beside their captions: eval_<checkpoint>.html from every evaluation and
inference_script.py --html, self-contained, escaped, and checked in a real headless Chromium."""

import base64
import io
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

import inference_script
import training_script as ts
from conftest import train_args
from helpers import cli, chromium_path

HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> a "quoted" & caption'


@pytest.fixture(scope="module")
def evaluated(flickr_dir, tiny_models, tmp_path_factory):
    """A 1-epoch run evaluated after training: (its folder, the JSON report)."""
    out = tmp_path_factory.mktemp("gallery")
    ts.main(train_args(flickr_dir, tiny_models, out, "--epochs", "1", "--batch-size", "16", "--eval-interval", "0",
                       "--eval-after-training", "--test-images", "6", "--max-new-tokens", "6"))
    return out, json.loads((out / "eval_img2gpt_epoch_1.json").read_text())


def thumbnails(page):
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)]


def test_every_evaluation_writes_a_self_contained_gallery(evaluated):
    out, report = evaluated
    page = (out / "eval_img2gpt_epoch_1.html").read_text()
    entries = report["captions"]
    assert page.count('<div class="card"') == len(entries) >= 2
    for metric in ("Bleu_4", "CIDEr", "ROUGE_L"):  # the JSON's numbers, in the table at the top
        assert f"<td>{metric}</td><td class=\"score\">{report[metric]:.4f}</td>" in page
    images = thumbnails(page)
    assert len(images) == len(entries) and all(max(image.size) <= 256 for image in images)
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "<link" not in page  # nothing from the network
    assert len(page) < 30_000 * len(entries)  # kilobytes per image, not megabytes
    scores = [float(s) for s in re.findall(r'data-score="([0-9.]+)"', page)]
    assert scores == sorted(scores)  # worst first
    assert all("CIDEr" in e and "Bleu_4" in e for e in entries)
    assert {round(e["CIDEr"], 3) for e in entries} == {round(s, 3) for s in scores}


def test_captions_and_names_are_escaped_and_a_broken_image_gets_a_placeholder(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (640, 320), "blue").save(good)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    cards = [ts.gallery_card(str(good), ts.thumbnail_uri(ts.load_image, good), HOSTILE, [HOSTILE], {"CIDEr": 0.5}),
             ts.gallery_card('"><b>name</b>', ts.thumbnail_uri(ts.load_image, tmp_path / "broken.jpg"), "a caption")]
    ts.write_gallery(tmp_path / "page.html", "<title> & test", cards, {"CIDEr": 0.5})
    page = (tmp_path / "page.html").read_text()
    assert "<script>window.pwned" not in page and "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page
    assert "<b>name</b>" not in page and "no preview: &quot;&gt;&lt;b&gt;name&lt;/b&gt;" in page
    assert [image.size for image in thumbnails(page)] == [(256, 128)]
    assert not list(tmp_path.glob("*.tmp"))


def test_inference_html_pages_the_captioned_images_beside_json(evaluated, flickr_dir, tmp_path, capsys):
    folder = flickr_dir / "flickr30k_images" / "flickr30k_images"
    images = [folder / "1005.jpg", folder / "1006.jpg", folder / "corrupt.jpg"]
    code, out, err = cli(capsys, inference_script, "--weights", evaluated[0] / "img2gpt_epoch_1.pth", "--device",
                         "cpu", "--max-new-tokens", "5", "--json", "--html", tmp_path / "mine.html",
                         *[arg for image in images for arg in ("--image", image)])
    assert code == 1 and "1 of 3 images could not be captioned" in err  # the broken one, said as before
    records = [json.loads(line) for line in out.splitlines()]  # stdout still only the JSON records
    page = (tmp_path / "mine.html").read_text()
    assert page.count('<div class="card"') == 3 and len(thumbnails(page)) == 2 and "no preview" in page
    for record in records:
        assert (record["caption"] or "") in page and str(record["image"]) in page
    code, _, err = cli(capsys, inference_script, "--weights", evaluated[0] / "img2gpt_epoch_1.pth", "--image",
                       images[0], "--html", tmp_path)
    assert code == 1 and "--html" in err and "is a folder" in err


@pytest.mark.skipif(chromium_path() is None, reason="no Chromium installed (apt-get install chromium)")
def test_the_pages_in_a_real_browser(evaluated, flickr_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    out, report = evaluated
    hostile = tmp_path / "hostile.html"
    ts.write_gallery(hostile, "hostile", [ts.gallery_card("x.jpg", None, HOSTILE)])
    scored = tmp_path / "scored.html"  # distinct scores, so that sorting has something to reorder
    picture = flickr_dir / "flickr30k_images" / "flickr30k_images" / "1007.jpg"
    cards = [ts.gallery_card(f"{i}.jpg", ts.thumbnail_uri(ts.load_image, picture), f"caption {i}", [f"reference {i}"],
                             {"CIDEr": score}) for i, score in enumerate([0.3, 0.1, 0.9, 0.5, 0.0])]
    ts.write_gallery(scored, "scored", cards, {"CIDEr": 0.36})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        tab = browser.new_page(viewport={"width": 1200, "height": 900})
        requests = []
        tab.on("request", lambda request: requests.append(request.url))

        def visible_scores():
            return tab.evaluate("Array.from(document.querySelectorAll('.card')).filter(c => !c.hidden)"
                                ".map(c => Number(c.dataset.score))")

        for page, count in ((out / "eval_img2gpt_epoch_1.html", len(report["captions"])), (scored, 5)):
            tab.goto(page.as_uri())
            assert tab.locator(".card").count() == count
            assert tab.evaluate("document.images.length") == count
            assert tab.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        assert visible_scores() == [0.0, 0.1, 0.3, 0.5, 0.9]  # worst first
        tab.select_option("#order", "best")
        assert visible_scores() == [0.9, 0.5, 0.3, 0.1, 0.0]
        tab.fill("#filter", "caption 3")
        assert visible_scores() == [0.5] and tab.locator("#shown").inner_text() == "1 of 5 images"
        tab.fill("#filter", "")
        tab.select_option("#order", "worst")
        tab.goto((out / "eval_img2gpt_epoch_1.html").as_uri())
        shot = Path(os.environ.get("IMG2GPT_GALLERY_SCREENSHOT", tmp_path / "gallery.png"))
        tab.screenshot(path=str(shot), full_page=True)
        tab.goto(hostile.as_uri())
        assert tab.evaluate("window.pwned === undefined")
        assert "window.pwned = 1" in tab.locator(".caption").inner_text()
        browser.close()
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert shot.stat().st_size > 10_000


def test_html_never_writes_over_a_file_it_did_not_write(evaluated, flickr_dir, tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "copy.pth"
    checkpoint.write_bytes((evaluated[0] / "img2gpt_epoch_1.pth").read_bytes())
    image = flickr_dir / "flickr30k_images" / "flickr30k_images" / "1005.jpg"
    run = ["--weights", checkpoint, "--device", "cpu", "--max-new-tokens", "4", "--image", image, "--html"]
    before = checkpoint.read_bytes()
    for target, reason in ((checkpoint, "does not end in .html"), (tmp_path / "notes.html", "Img2GPT did not write"),
                           (tmp_path / "a_file" / "page.html", "--html's folder"), (tmp_path, "is a folder"),
                           (tmp_path / "pipe.html", "Img2GPT did not write")):
        if target.name == "notes.html":
            target.write_text("<html>my own notes</html>")
        if target.name == "pipe.html":
            os.mkfifo(target)  # never opened: reading it would wait forever
        if target.name == "page.html":
            target.parent.write_text("a file where a folder belongs")
        code, out, err = cli(capsys, inference_script, *run, target)
        assert code == 1 and reason in err and "Step 1" not in out, (target, err)
    assert checkpoint.read_bytes() == before and (tmp_path / "notes.html").read_text() == "<html>my own notes</html>"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for _ in range(2):  # "~" the shell left alone is the home folder; a page it wrote it may write again
        code, _, err = cli(capsys, inference_script, *run, "~/pages/mine.html")
        assert code == 0, err
    assert (tmp_path / "home" / "pages" / "mine.html").read_text().count('<div class="card"') == 1
