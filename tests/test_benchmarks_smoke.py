"""Smoke tests of the benchmarks (run as `python -m benchmarks.<name>` from the repository root),
so that they keep working while the model changes under them: their smallest configuration, one
repeat, into a temporary folder."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_e2e_benchmark_quick_run(tmp_path):
    # With the compiled variants (their first decode compiles: ~15 s each on 2 cores).
    # And the weight-only quantized variants (decode, load, memory).
    impls = ("ours,reference,ours_compiled,reference_compiled" if importlib.util.find_spec("transformers")
             else "ours,ours_compiled") + ",ours_int8,ours_int4"
    out, weights = tmp_path / "results", tmp_path / "weights"
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.e2e", "--quick", "--impls", impls,
         "--out", str(out), "--weights", str(weights)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]

    markdown = (out / "e2e.md").read_text()
    assert "## tiny" in markdown and "decode batch 1" in markdown
    with open(out / "e2e.csv") as f:
        rows = {row["metric"]: row for row in csv.DictReader(f)}
    for metric in ("load (from_pretrained)", "decode batch 1", "decode batch 8", "peak RSS of the whole run"):
        assert float(rows[metric]["ours"]) > 0, metric
        if "reference" in impls:
            assert float(rows[metric]["reference"]) > 0, metric
            assert float(rows[metric]["ratio_ours_over_reference"]) > 0, metric
    prefill = [name for name in rows if name.startswith("prefill")]
    assert len(prefill) == 2 and all(float(rows[name]["ours"]) > 0 for name in prefill)
    compiled = [name for name in rows if "compiled decode (both)" in name]
    assert len(compiled) == 2 and all(float(rows[name]["ours"]) > 0 for name in compiled)
    if "reference" in impls:
        assert all(float(rows[name]["reference"]) > 0 for name in compiled)
        assert "greedy batch-1 outputs of ours and reference agree on" in markdown
        assert "greedy batch-1 outputs of ours_compiled and reference agree on" in markdown
    for bits in (8, 4):
        quantized = [name for name in rows if f"ours int{bits} vs reference" in name and name.startswith("decode")]
        assert len(quantized) == 2 and all(float(rows[name]["ours"]) > 0 for name in quantized)


def test_linear_backends_benchmark_quick_run(tmp_path):
    from idefics2_mini.backends import cpu  # noqa: PLC0415

    if not cpu.ONEDNN_LINEAR:
        return
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.linear_backends", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    table = (tmp_path / "linear_backends.md").read_text()
    assert table.count("| tiny lm_head |") == 4 and "oneDNN" in table


def test_decode_ops_benchmark_quick_run(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.decode_ops", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    table = (tmp_path / "decode_ops.md").read_text()
    assert "| 8 |" in table and table.count("| tiny |") == 3
    assert "| math |" in table and "| SDPA |" in table  # both compiled forms, by cache size
