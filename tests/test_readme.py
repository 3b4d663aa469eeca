"""The README tells the truth: its tables, commands and test command are what the scripts and CI do."""

import ast
import re
import shlex

import pytest

import inference_script
import training_script as ts
from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
SCRIPTS = {"training_script.py": ts, "inference_script.py": inference_script}


def table_rows(heading):
    section = README.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `(--[a-z0-9-]+)` \| (.+?) \| .+ \|$", section, re.M)
    assert rows, heading
    return rows


def parse(module, argv):
    return ts.parse_config(module.CONSTANTS, argv, module.FLAG_ALIASES, script=module.__file__,
                           repeatable=("IMAGE_URL",) if module is inference_script else ())


@pytest.mark.parametrize("heading,module", [("## Training constants and flags", ts), ("## Inference", inference_script)])
def test_constant_tables_match_the_scripts(heading, module):
    rows = table_rows(heading)
    assert [name for name, _, _ in rows] == list(module.CONSTANTS)  # every constant, in the script's order
    for name, flag, default in rows:
        value = module.CONSTANTS[name]
        if name == "DEVICE_CHOICE":
            assert default == "`cuda` if available, else `cpu`"
        else:
            assert ast.literal_eval(default.strip("`")) == value, name
        if isinstance(value, bool):  # --flag / --no-flag
            assert getattr(parse(module, [flag]), name.lower()) is True
            assert getattr(parse(module, ["--no-" + flag[2:]]), name.lower()) is False
            continue
        sample = "7" if isinstance(value, int) else "0.5" if isinstance(value, float) else "x"
        parsed = getattr(parse(module, [flag, sample]), name.lower())
        assert parsed in (7, 0.5, "x", ["x"]), (flag, parsed)


def test_readme_commands_parse():
    commands = re.findall(r"^\$? ?!?python ((?:training|inference)_script\.py.*)$", README, re.M)
    assert len(commands) >= 4
    for command in commands:
        script, *argv = shlex.split(command.split(" > ")[0])  # without a shell redirection
        parse(SCRIPTS[script], argv)  # an unknown or misspelled flag exits


def test_ci_runs_the_readme_test_command():
    assert "pip install -r requirements-dev.txt && python -m pytest tests" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-r requirements-dev.txt" in ci and "\npython -m pytest tests\n" in ci
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text()


def test_requirements_leave_torch_unpinned():
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    names = [re.split(r"[<>=!; ]", line, 1)[0] for line in requirements if line and not line.startswith("#")]
    assert names == ["torch", "torchvision", "transformers", "accelerate", "bitsandbytes", "peft", "kagglehub",
                     "pandas", "tqdm", "requests", "Pillow", "pycocoevalcap", "matplotlib", "webdataset", "datasets"]
    torch_lines = [line for line in requirements if line.startswith("torch")]
    assert not any("==" in line or "<" in line for line in torch_lines)  # Colab keeps its CUDA build
