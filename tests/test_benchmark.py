"""The benchmark runs (tiny smoke mode, no timing is asserted) and prints every row of its table."""

import re
import subprocess
import sys

from conftest import ROOT


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
                      "checkpoint size", "training images/s, batch 8, fp32 LoRA"]
    for row in rows[1:]:
        value = row.split(" | ")[1]
        assert re.match(r"^\d+\.\d+( s| MB)?$", value), row
    assert "VisionEncoderDecoder peer" in rows[1] and "floor" in rows[2]
