"""What several test modules share: parsing training settings, running a script's command line in-process, reading
its one error line and its training log, interrupting training, a tiny model config, and where Chromium is."""

import json
import shutil
from pathlib import Path

import pytest

import training_script as ts


def config_of(*argv):
    """The training settings these command-line arguments give, as training_script parses them."""
    return ts.parse_config(ts.CONSTANTS, [str(a) for a in argv], ts.FLAG_ALIASES)


def cli(capsys, script, *argv):
    """(exit code, stdout, stderr) of a script's main run through its command-line entry point."""
    with pytest.raises(SystemExit) as exit_info:
        ts.run_cli(script.main, [str(a) for a in argv])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    code = exit_info.value.code
    if isinstance(code, str):  # sys.exit("message") prints it to stderr and exits 1
        err, code = err + code + "\n", 1
    return code, out, err


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def runs_of(records):
    """The log split at each 'start' record: one list of records per run (what comes before the first is not)."""
    runs = []
    for record in records:
        if record["type"] == "start":
            runs.append([])
        if runs:
            runs[-1].append(record)
    return runs


def interrupt_training_at(monkeypatch, call):
    """The `call`-th training forward pass raises KeyboardInterrupt, as Ctrl+C there would."""
    forward, calls = ts.Img2GPT.forward, []

    def patched(self, *args, **kwargs):
        if self.training:
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ts.Img2GPT, "forward", patched)


def chromium_path():
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def tiny_config(models, **overrides):
    return {"vit_model": str(models[0]), "gpt2_model": str(models[1]), "lora_r": 4, "lora_alpha": 8,
            "lora_dropout": 0.0, "max_caption_tokens": 16, **overrides}
