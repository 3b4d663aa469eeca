"""The benchmark runs (tiny smoke mode, no timing is asserted) and prints every row of its table."""

import re
import subprocess
import sys

import torch

import training_script as ts
from conftest import ROOT

CPU = torch.device("cpu")


def test_benchmark_smoke_mode_prints_the_table():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--smoke"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| measurement | value | compared with | ratio |"
    labels = [row.split(" | ")[0].lstrip("| ") for row in rows[1:]]
    assert labels == ["caption latency, 1 image", "caption latency, 1 image", "captions/s, batch 1",
                      "captions/s, batch 8", "option PREFIX_POOL_GRID=2: caption latency, 1 image",
                      "option PREFIX_POOL_GRID=2: captions/s, batch 8",
                      "data pipeline images/s (decode, RGB, preprocess; 2 workers)",
                      "checkpoint size", "training images/s, batch 8, fp32 LoRA",
                      "training images/s, batch 8, 4-bit NF4 LoRA, bf16 compute",
                      "training images/s, batch 8, 4-bit NF4 LoRA, fp32 compute",
                      f"training peak memory (RSS), batch 8, 4-bit ({ts.choose_precision(CPU, '4bit')[1]})",
                      "parameter memory, 4-bit (captioning)", "caption latency, 1 image, 4-bit",
                      "captioning peak memory (RSS), 4-bit"]
    for row in rows[1:]:
        value = row.split(" | ")[1]
        assert re.match(r"^\d+(\.\d+)?( s| MB)?$", value), row
    assert "VisionEncoderDecoder peer" in rows[1] and "floor" in rows[2]
    assert "full-precision LoRA" in rows[10] and "full precision, LoRA merged" in rows[14]
