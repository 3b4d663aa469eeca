"""The benchmark runs (tiny smoke mode, no timing is asserted) and prints every row of its table."""

import re
import subprocess
import sys

import torch

import training_script as ts
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import benchmark  # noqa: E402

CPU = torch.device("cpu")
NATIVE = "bfloat16" if ts.cpu_has_native_bf16() else "float32"


def test_benchmark_smoke_mode_prints_the_table():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--smoke"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| measurement | value | compared with | ratio |"
    split = rows.index("| stage | before: peft wrap + merge | now: adapters folded, gc.freeze |")
    rows, stages = rows[:split], rows[split:]  # the main table, then the per-stage table of a 1-image process
    labels = [row.split(" | ")[0].lstrip("| ") for row in rows[1:]]
    assert labels == ["caption latency, 1 image", "caption latency, 1 image", "captions/s, batch 1",
                      "captions/s, batch 8", "option PREFIX_POOL_GRID=2: caption latency, 1 image",
                      "option PREFIX_POOL_GRID=2: captions/s, batch 8",
                      "data pipeline images/s (decode, RGB, preprocess; 2 workers)",
                      "data pipeline images/s from WebDataset shards (2 workers, batch 16)",
                      "counting pass samples/s (shards, before training)",
                      "resident memory after 6 shards of 4 (counting pass + epoch)",
                      "checkpoint size", "training images/s, batch 8, fp32 LoRA",
                      "training images/s, batch 8, 4-bit NF4 LoRA, bf16 compute",
                      "training images/s, batch 8, 4-bit NF4 LoRA, fp32 compute",
                      f"training peak memory (RSS), batch 8, 4-bit ({ts.choose_precision(CPU, '4bit')[1]})",
                      "parameter memory, 4-bit (captioning)", "caption latency, 1 image, 4-bit",
                      "captioning peak memory (RSS), 4-bit",
                      *[label for precision in ("fp32 LoRA", f"4-bit NF4 LoRA, {NATIVE} compute") for label in (
                          f"training captions/s, batch 10 = 2 images x 5, {precision}",
                          f"training captions/s, batch 10 = 2 images x 5, {precision}",
                          f"training peak memory (RSS), batch 10 = 2 images x 5, {precision}")],
                      "training captions/s, batch 10 = 10 images x 1, fp32 LoRA",
                      "whole process, caption 1 image (start to exit)", "whole process, caption 8 images (start to exit)",
                      "prefix prefill, 8 images (GPT-2 reads 8 x prefix tokens once)"]
    table = rows[1:]
    for row in table:
        value = row.split(" | ")[1]
        assert re.match(r"^\d+(\.\d+)?( s| MB)?$", value), row
    assert "VisionEncoderDecoder peer, same LoRA" in table[18] and "one row per caption" in table[19]
    assert "VisionEncoderDecoder peer script" in table[25] and "cross-attention keys/values" in table[27]
    assert "the same JPEGs in a folder, same workers" in table[7] and "after 2 shards" in table[9]
    assert [row.split(" | ")[0].lstrip("| ") for row in stages[1:]] == [*benchmark.STAGES, "total"]
    for row in stages[1:]:
        assert all(re.match(r"^\d+\.\d\d$", cell) for cell in row.strip("| ").split(" | ")[1:]), row
    assert "VisionEncoderDecoder peer" in rows[1] and "floor" in rows[2]
    assert "full-precision LoRA" in rows[13] and "full precision, LoRA merged" in rows[17]


def test_a_measurement_in_a_process_of_its_own_equals_the_same_in_this_one(tmp_path):
    """The smoke run measures in its own process to be quick; the full run starts a process per measurement
    (--worker): that path returns the same figures' keys, from a process that loads the saved models."""
    checkpoint = benchmark.save_base_models(*benchmark.configs(True), tmp_path)
    apart = benchmark.measure_in_process("caption", "none", checkpoint, 1, "float32")
    here = benchmark.measure_here("caption", "none", checkpoint, 1, "float32")
    assert set(apart) == set(here) == {"value", "peak_mb", "parameters_mb"}
    assert apart["parameters_mb"] == here["parameters_mb"] > 0 and apart["value"] > 0 and apart["peak_mb"] > 0
    rates = benchmark.measure_in_process("captions", "none", tmp_path, 1, "float32", "shared")
    assert set(rates) == {"value", "peak_mb"} and rates["value"] > 0
