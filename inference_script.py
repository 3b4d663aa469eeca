"""Img2GPT inference: caption images from URLs or local paths with a checkpoint from training_script.py.

Edit the constants below or override them from the command line:

    python inference_script.py --weights img2gpt_epoch_3.pth --image https://example.com/dog.jpg --image cat.png

The model is rebuilt from the checkpoint's own config with the code that trained it, in the precision QUANTIZE
chooses here whatever precision it was trained in ("auto": 4-bit on CUDA, full precision on the CPU; a
checkpoint trained in 4-bit on a GPU captions on a CPU-only machine).
"""

import gc
import io
import json
import re
import socket
import sys
import threading
from functools import partial
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from training_script import (DECODING_RULES, IMAGE_ERRORS, Img2GPTError, at_least, caption_sources,
                             check_context, check_settings, checkpoint_config, choose_precision, decoding_settings,
                             gallery_card, load_checkpoint, load_image, open_keeping_thumbnail, parse_config,
                             read_text, rebuild_from_checkpoint, require_writable_dir, resolve_device, run_cli,
                             write_gallery)

# --- What to caption ------------------------------------------------------------------------------
MODEL_WEIGHTS_PATH = "img2gpt_epoch_3.pth"  # checkpoint written by training_script.py
IMAGE_URL = "http://images.cocodataset.org/val2017/000000039769.jpg"  # URL, image path, folder, or .txt of those
REQUEST_TIMEOUT = 30.0  # seconds a download may take in all before it is given up
MAX_IMAGE_BYTES = 20_000_000  # largest image download accepted, in bytes

# --- Hardware and base models ---------------------------------------------------------------------
DEVICE_CHOICE = "cuda" if torch.cuda.is_available() else "cpu"  # "cuda", "cuda:N" or "cpu"
QUANTIZE = "auto"  # "auto" (4-bit on CUDA, full precision on a CPU), "4bit" (on any device) or "none"
VIT_MODEL_NAME = None  # vision encoder to load instead of the checkpoint's (e.g. a local copy); None: its own
GPT2_MODEL_NAME = None  # language model to load instead of the checkpoint's; None: its own

# --- Decoding and output --------------------------------------------------------------------------
MAX_NEW_TOKENS = 30  # longest caption, in tokens (generation also stops at EOS)
NUM_BEAMS = 1  # 1: greedy; more: beam search
NO_REPEAT_NGRAM_SIZE = 0  # never repeat an n-gram of this many tokens (0: off)
REPETITION_PENALTY = 1.0  # above 1 discourages repeating tokens (1.0: off)
BATCH_SIZE = 8  # images captioned together (fetched and preprocessed ahead in threads)
JSON_OUTPUT = False  # one JSON record per image on stdout ({"image", "caption", "error"}); progress on stderr
HTML_OUTPUT = None  # also write a page of the captioned images here (thumbnails embedded, opens offline); None: no

# --- Web page -------------------------------------------------------------------------------------
WEB = False  # serve a Gradio page on 127.0.0.1:WEB_PORT instead of captioning IMAGE_URL (needs: pip install gradio)
WEB_PORT = 7860  # port of the --web page

# Every UPPERCASE name bound to a plain value above is a setting with a flag (imported names are not).
CONSTANTS = {name: value for name, value in dict(globals()).items()
             if name.isupper() and isinstance(value, (bool, int, float, str, type(None)))}
FLAG_ALIASES = {"MODEL_WEIGHTS_PATH": "--weights", "IMAGE_URL": "--image", "DEVICE_CHOICE": "--device",
                "VIT_MODEL_NAME": "--vit-model", "GPT2_MODEL_NAME": "--gpt2-model", "JSON_OUTPUT": "--json",
                "HTML_OUTPUT": "--html"}
DIVIDER = "=" * 50
GALLERY_LIMIT = 64  # images the web page's gallery tab captions at a time
SETTING_RULES = {
    # threading's timers (the download deadline) take at most TIMEOUT_MAX seconds (about 292 years)
    "request_timeout": (lambda value: 0 < value <= threading.TIMEOUT_MAX,
                        f"a number of seconds above 0, at most {threading.TIMEOUT_MAX:.0f}"),
    "max_image_bytes": (at_least(1), "1 or more"),
    **DECODING_RULES,
    "batch_size": (at_least(1), "1 or more"),
    "web_port": (lambda port: 1 <= port <= 65535, "a port from 1 to 65535"),
}
Image.init()
# Every file type Pillow opens by itself, for folder scans (.jpg, .png, .webp, .avif, .jfif, .jp2, .tga, .qoi, ...),
# less its stubs that need a handler or an outside program (EPS: Ghostscript; WMF; HDF5, GRIB, BUFR; MPEG headers).
IMAGE_SUFFIXES = {suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN} - {
    ".eps", ".ps", ".wmf", ".emf", ".h5", ".hdf", ".grib", ".bufr", ".mpeg", ".mpg"}
URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def expand_sources(values, in_list=False):
    """Each --image value as the images it names: a URL or file as itself, a folder as the image files in
    it (sorted), a .txt file as its lines (URLs, paths or folders; blank lines and # comments skipped; a .txt
    named inside a list is not opened again)."""
    for value in values:
        path = Path(value).expanduser()
        if URL.match(value):
            yield value
        elif path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            yield from (str(p) for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix.lower() == ".txt" and path.is_file() and not in_list:
            lines = [line.strip() for line in read_text(path).splitlines()]
            lines = [line for line in lines if line and not line.startswith("#")]
            yield from expand_sources(lines, in_list=True)
        else:
            yield value


class Deadline:
    """Ends one download when its time is up, or at once on Deadline.stop_all() (Ctrl+C), by shutting down its
    sockets: that wakes a read blocked on them. A socket's own timeout is no deadline: a server sending a byte
    a second restarts it with every byte, in the headers as in the body."""

    in_flight = set()
    stopped = threading.Event()  # set once by Ctrl+C: downloads queued after it end before they start

    def __init__(self, seconds):
        self.sockets, self.expired, self.lock = [], threading.Event(), threading.Lock()
        self.timer = threading.Timer(seconds, self.expire)
        self.timer.daemon = True

    def __enter__(self):
        Deadline.in_flight.add(self)
        self.timer.start()
        if Deadline.stopped.is_set():
            self.expire()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        Deadline.in_flight.discard(self)

    def watch(self, sock):
        """Called with each socket the download connects (redirects included)."""
        with self.lock:
            self.sockets.append(sock)
            if not self.expired.is_set():
                return
        shut_down(sock)

    def expire(self):
        with self.lock:
            self.expired.set()
            sockets = list(self.sockets)
        for sock in sockets:
            shut_down(sock)

    @classmethod
    def stop_all(cls):
        cls.stopped.set()
        for deadline in list(cls.in_flight):
            deadline.expire()


def shut_down(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def watched_session(watch):
    """A requests Session that hands every socket it connects, through any proxy or redirect, to watch(sock):
    its connection pools are subclassed so that each new connection reports its socket."""
    import requests
    from requests.adapters import HTTPAdapter

    def pool_class(base):
        class Connection(base.ConnectionCls):
            def _new_conn(self):
                sock = super()._new_conn()
                watch(sock)
                return sock

        return type(base.__name__, (base,), {"ConnectionCls": Connection})

    def watching(pools_by_scheme):
        return {scheme: pool_class(base) for scheme, base in pools_by_scheme.items()}

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = watching(self.poolmanager.pool_classes_by_scheme)

        def proxy_manager_for(self, proxy, **kwargs):
            fresh = proxy not in self.proxy_manager
            manager = super().proxy_manager_for(proxy, **kwargs)
            if fresh:
                manager.pool_classes_by_scheme = watching(manager.pool_classes_by_scheme)
            return manager

    session = requests.Session()
    session.mount("http://", Adapter())
    session.mount("https://", Adapter())
    return session


def download(url, timeout, max_bytes):
    """The body of an http(s) URL, streamed so that neither a slow nor a huge answer can hang or fill memory:
    all of it (connecting, headers, body, redirects) ends within `timeout` seconds."""
    import requests
    from urllib3.exceptions import HTTPError

    with Deadline(timeout) as deadline, watched_session(deadline.watch) as session:
        try:
            with session.get(url, timeout=timeout, stream=True, headers={"User-Agent": "Img2GPT"}) as response:
                if response.status_code >= 400:
                    raise Img2GPTError(f"'{url}' answered HTTP {response.status_code} {response.reason}: "
                                       "check the URL")
                declared = response.headers.get("Content-Length") or ""
                if declared.strip().isdigit() and int(declared) > max_bytes:  # a malformed length: read and see
                    raise Img2GPTError(f"'{url}' is larger than {max_bytes:,} bytes (--max-image-bytes)")
                body = bytearray()
                for chunk in response.iter_content(chunk_size=1 << 16):
                    body += chunk
                    if len(body) > max_bytes:
                        raise Img2GPTError(f"'{url}' is larger than {max_bytes:,} bytes (--max-image-bytes)")
                if not deadline.expired.is_set():  # a body cut at the deadline may look complete: it is not
                    return bytes(body), response.headers.get("Content-Type", "")
        except (requests.RequestException, HTTPError, OSError) as exc:
            if not deadline.expired.is_set():
                if isinstance(exc, requests.Timeout):
                    raise Img2GPTError(f"'{url}' did not answer within {timeout:g} s (--request-timeout)") from None
                if isinstance(exc, requests.ConnectionError):
                    raise Img2GPTError(f"could not connect to '{url}': check the address and your connection"
                                       ) from None
                raise Img2GPTError(f"could not download '{url}' ({type(exc).__name__})") from None
    if Deadline.stopped.is_set():
        raise Img2GPTError(f"'{url}': download stopped (interrupted)")
    raise Img2GPTError(f"'{url}' did not answer within {timeout:g} s (--request-timeout)")


def fetch_image(source, timeout, max_bytes):
    """An RGB image from an http(s) URL or a local path; anything else is an Img2GPTError naming the problem."""
    scheme = URL.match(source)
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        raise Img2GPTError(f"'{source}': only http:// and https:// URLs or local file paths are supported")
    if scheme:
        body, content_type = download(source, timeout, max_bytes)
        what, opened = f"'{source}' (Content-Type: {content_type or 'none'})", io.BytesIO(body)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise Img2GPTError(f"image '{source}' not found: give an existing file or an http(s) URL")
        if path.is_dir():
            raise Img2GPTError(f"'{source}' is a folder with no images in it: give an image file or another folder")
        if not path.is_file():  # reading a named pipe or a device would wait forever
            raise Img2GPTError(f"'{source}' is not a regular file (a named pipe or a device): give an image file")
        what, opened = f"'{source}'", path
    try:
        return load_image(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Img2GPTError(f"{what} has more pixels than Pillow decodes safely: resize it first") from None
    except UnidentifiedImageError:
        raise Img2GPTError(f"{what} is not an image in any format Pillow reads: give a JPEG, PNG, ...") from None
    except IMAGE_ERRORS as exc:
        raise Img2GPTError(f"{what} is not a readable image ({exc})") from None


def load_model(weights_path, device, vit_model=None, gpt2_model=None, say=print, quantize="auto",
               max_new_tokens=None):
    """Rebuild the trained model from the checkpoint's config, printing the original design's Step lines.
    MAX_NEW_TOKENS is checked against the language model's positions before anything loads."""
    four_bit, _ = choose_precision(device, quantize)  # an unknown value fails before the checkpoint is read
    state = load_checkpoint(weights_path)
    longest = check_context(checkpoint_config(state, vit_model, gpt2_model), max_new_tokens=max_new_tokens,
                            aliases=FLAG_ALIASES)
    precision = "with 4-bit quantization" if four_bit else "in full precision"
    steps = {1: f"Loading tokenizer and base models ({precision})...",
             2: "Applying the exact same LoRA configurations...",
             3: "Initializing the combined Img2GPT model...",
             4: f"Loading trained weights from '{weights_path}'..."}
    model = rebuild_from_checkpoint(state, device, vit_model, gpt2_model, lambda n: say(f"Step {n}: {steps[n]}"),
                                    quantize)
    say("Model successfully built and ready for inference!")
    model[0].longest_caption = longest  # the web page's token slider stops there
    return model


def announce_batch(sources, say):
    for source in sources:
        say(f"\nPreprocessing image from {'URL' if URL.match(source) else 'path'}: {source}")
    say("Generating caption...")


def serve_web(model, tokenizer, processor, open_image, cfg, say=print):
    """A Gradio page on 127.0.0.1:WEB_PORT: drop an image or paste a URL, get its caption. The model is loaded
    once, before the page starts; Gradio is imported only here."""
    import os

    from training_script import GALLERY_STYLE  # here, not at the top: an UPPERCASE str there would be a flag

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local page
    try:
        import gradio as gr
    except ImportError:
        raise Img2GPTError("the web page needs Gradio: pip install gradio") from None

    def caption(image_path, url, num_beams, max_new_tokens):
        url = (url or "").strip()
        if not image_path and url and not re.match(r"^https?://", url, re.I):  # never a path on this server
            raise gr.Error("The URL box takes http:// and https:// URLs only: drop a file into the image box.")
        source = image_path or url
        if not source:
            raise gr.Error("Drop an image or paste its URL first.")
        settings = {**decoding_settings(cfg), "num_beams": int(num_beams),
                    "max_new_tokens": min(int(max_new_tokens), longest)}  # past the LM's positions: an IndexError
        _, result = next(caption_sources(model, tokenizer, processor, [source], open_image, 1, settings))
        if isinstance(result, Exception):  # what the command line would print as an error line
            raise gr.Error(str(result))
        return result

    def gallery(files, urls):
        """Cards for dropped files and http(s) URLs (one a line), as the --html page shows them."""
        lines = [line.strip() for line in (urls or "").splitlines() if line.strip()]
        if any(not re.match(r"^https?://", line, re.I) for line in lines):  # never a path on this server
            raise gr.Error("The URL list takes http:// and https:// URLs only: drop files for the others.")
        sources = [*(files or []), *lines]
        if not sources:
            raise gr.Error("Drop some images or paste their URLs first.")
        if len(sources) > GALLERY_LIMIT:
            raise gr.Error(f"At most {GALLERY_LIMIT} images at a time.")
        thumbnails, cards, uploaded = {}, [], set(files or [])
        opener = partial(open_keeping_thumbnail, open_image, thumbnails)
        settings = {**decoding_settings(cfg), "max_new_tokens": min(cfg.max_new_tokens, longest)}
        report(caption_sources(model, tokenizer, processor, sources, opener, cfg.batch_size, settings), False,
               thumbnails, cards, quiet=True, name=lambda source: Path(source).name if source in uploaded else source)
        return f'<div id="cards">{"".join(cards)}</div>'

    longest = min(80, getattr(model, "longest_caption", None) or 80)
    with gr.Blocks(title="Img2GPT") as page:
        gr.Markdown(f"# Img2GPT\nCaptions by `{Path(cfg.model_weights_path).name}`. Drop an image or paste a URL.")
        with gr.Tab("Caption"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", label="Image")
                    url = gr.Textbox(label="...or an image URL", placeholder="https://...")
                    beams = gr.Slider(1, 8, value=cfg.num_beams, step=1, label="Beams (1: greedy)")
                    tokens = gr.Slider(min(5, longest), longest, value=min(cfg.max_new_tokens, longest), step=1,
                                       label="Max new tokens")
                    button = gr.Button("Caption", variant="primary")
                with gr.Column():
                    result = gr.Textbox(label="Caption", elem_id="caption", interactive=False)
        with gr.Tab("Gallery"):
            files = gr.File(file_count="multiple", file_types=["image"], type="filepath", label="Images")
            urls = gr.Textbox(lines=3, label="...or image URLs, one a line", placeholder="https://...")
            make = gr.Button("Make the gallery", variant="primary")
            cards = gr.HTML(elem_id="gallery")
        button.click(caption, inputs=[image, url, beams, tokens], outputs=result, api_name="caption")
        make.click(gallery, inputs=[files, urls], outputs=cards, api_name="gallery")
    say(f"Serving the Img2GPT page on http://127.0.0.1:{cfg.web_port} (Ctrl+C stops it)")
    try:
        page.launch(server_name="127.0.0.1", server_port=cfg.web_port, quiet=True, css=GALLERY_STYLE)
    except OSError as exc:  # the port was taken between the check at start and now
        raise Img2GPTError(f"the page could not start on port {cfg.web_port} ({exc}): pick another --web-port") from None


def require_free_port(port):
    """The --web port must be free before minutes of model loading, not found busy after them."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise Img2GPTError(f"--web-port {port} is busy on 127.0.0.1 ({exc.strerror}): stop what uses it, or "
                               "pick another --web-port") from None


def report(results, json_output, thumbnails=None, cards=None, quiet=False, name=str):
    """Print each (source, caption or error) as it comes (nothing when quiet), and append its gallery card
    (with its thumbnail from `thumbnails`, by source; named name(source)) to `cards` when given; returns
    (failed, total)."""
    failed = total = 0
    for source, caption in results:
        total += 1
        failure = caption if isinstance(caption, Exception) else None
        if cards is not None:
            error = str(failure).replace(str(source), name(source)) if failure else None  # no server paths
            cards.append(gallery_card(name(source), thumbnails.get(source), None if failure else caption,
                                      error=error))
        failed += bool(failure)  # one bad image does not stop the others
        if quiet:
            continue
        if json_output:
            print(json.dumps({"image": source, "caption": None if failure else caption,
                              "error": str(failure) if failure else None}), flush=True)
        if failure:
            print(f"error: {failure}", file=sys.stderr)
        elif not json_output:
            print(f"\n{DIVIDER}\n      INFERENCE RESULT\n{DIVIDER}\nImage URL: {source}\nGenerated Caption: {caption}\n{DIVIDER}")
    return failed, total


def require_html_path(path):
    """--html must name an .html file in a folder that can be written, and never a file other than a page
    Img2GPT wrote (the checkpoint, an image): checked before the model loads."""
    from training_script import GALLERY_MARK  # here, not at the top: an UPPERCASE str there would be a flag

    path = Path(path)
    if path.is_dir():
        raise Img2GPTError(f"--html '{path}' is a folder: give a file name such as captions.html")
    if path.suffix.lower() not in (".html", ".htm"):
        raise Img2GPTError(f"--html '{path}' does not end in .html: give a page name such as captions.html")
    if path.exists():
        head = b""
        if path.is_file():  # a named pipe would block the read
            with open(path, "rb") as file:
                head = file.read(200)
        if GALLERY_MARK.encode() not in head:
            raise Img2GPTError(f"--html '{path}' is a file Img2GPT did not write: give another name, it is never "
                               "written over")
    require_writable_dir(path.parent, flag="--html's folder")


def main(argv=None):
    cfg = parse_config(CONSTANTS, argv, FLAG_ALIASES, __doc__, repeatable=("IMAGE_URL",), script=__file__)
    if any(not value.strip() for value in cfg.image_url):  # '' would caption the whole current folder
        raise Img2GPTError("--image '' names no image: give a URL, an image path, a folder or a .txt list")
    check_settings(cfg, SETTING_RULES, FLAG_ALIASES)
    # With --json, stdout carries only the records, so that scripts can read it line by line.
    say = partial(print, file=sys.stderr) if cfg.json_output else print
    device = resolve_device(cfg.device_choice)
    if cfg.web:
        require_free_port(cfg.web_port)
    if cfg.html_output:
        cfg.html_output = str(Path(cfg.html_output).expanduser())  # "~/x.html" quoted past the shell
        require_html_path(cfg.html_output)
    say(f"Using device: {device}")
    model, tokenizer, processor = load_model(cfg.model_weights_path, device, cfg.vit_model_name,
                                             cfg.gpt2_model_name, say, cfg.quantize, cfg.max_new_tokens)
    # What is loaded now (the libraries' objects, the model) lives until exit: moved out of the collector's
    # sight, no collection walks it again, the last one at exit included (about 1 s here, benchmarks/).
    gc.freeze()
    open_image = partial(fetch_image, timeout=cfg.request_timeout, max_bytes=cfg.max_image_bytes)
    if cfg.web:
        return serve_web(model, tokenizer, processor, open_image, cfg, say)
    thumbnails, cards = ({}, []) if cfg.html_output else (None, None)
    if cfg.html_output:  # each image is fetched once: its thumbnail is made from the copy being captioned
        open_image = partial(open_keeping_thumbnail, open_image, thumbnails)
    results = caption_sources(model, tokenizer, processor, expand_sources(cfg.image_url), open_image,
                              cfg.batch_size, decoding_settings(cfg), on_batch=partial(announce_batch, say=say))
    try:
        failed, total = report(results, cfg.json_output, thumbnails, cards)
    except KeyboardInterrupt:
        Deadline.stop_all()  # downloads in flight end now, not at their deadlines, so the process exits at once
        raise
    if cards:
        write_gallery(cfg.html_output, f"Img2GPT captions by {Path(cfg.model_weights_path).name}", cards)
        say(f"\nWrote {cfg.html_output} (open it in a browser: every image beside its caption)")
    if failed:
        sys.exit(f"error: {failed} of {total} images could not be captioned")
    if total == 0:
        raise Img2GPTError("no images to caption: the folders or .txt files given name none")


if __name__ == "__main__":
    run_cli(main, keep_working=False)  # a closed stdout (| head -1) has read all it wants: stop captioning
