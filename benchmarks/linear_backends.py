"""F.linear (MKL sgemm) vs oneDNN's inner product on the CPU, for the model's own linear shapes.

    python -m benchmarks.linear_backends [--threads N] [--quick]

Why `idefics2_mini.backends.cpu.linear` sends big fp32 weights to oneDNN for some input row counts
(all of them on AMD; 2 to 511 on Intel CPUs) and keeps small ones on F.linear: for each weight
shape of Idefics2-8B (and of the e2e benchmark's tiny model) and each number of input rows
(1 and 8 = decode, 99 / 359 = prefill of one image's prompt unsplit / split, 3220 = the patches
of one image in the vision tower and projector), the median time of both backends on the same
plain [out, in] weight, and the weight read rate (bytes of the weight / time).
Results: benchmarks/results/<machine>/linear_backends.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info, median_call_us, write_markdown
from idefics2_mini.backends import cpu

# (name, out, in): the 8B decoder, projector and vision tower, and the tiny model of e2e.py
SHAPES = [
    ("8B lm_head", 32003, 4096),
    ("8B gate+up (fused)", 28672, 4096),
    ("8B down", 4096, 14336),  # also the projector's down
    ("8B q+k+v (fused)", 6144, 4096),
    ("8B o_proj", 4096, 4096),
    ("8B vision fc1", 4304, 1152),
    ("8B vision q+k+v (fused)", 3456, 1152),
    ("8B projector gate+up", 28672, 1152),
    ("tiny lm_head", 32003, 128),
    ("tiny gate+up (fused)", 512, 128),
    ("tiny down", 128, 256),
]
QUICK_SHAPES = ["8B o_proj", "tiny lm_head", "tiny gate+up (fused)"]
# Input rows: 1 and 8 = decode, 99 / 359 = prefill of one image's prompt unsplit / split; the
# vision tower and the projector also see every patch of an image: 3220 for a 980x653 photo.
ROWS = (1, 8, 99, 359)
PATCH_ROWS = 3220
PATCH_SHAPES = ["8B vision fc1", "8B vision q+k+v (fused)", "8B projector gate+up", "8B down"]


def rows_text(row_range: tuple[int, int | None]) -> str:
    low, high = row_range
    return f"at least {low}" if high is None else f"{low} to {high}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=0.5, help="time spent on each measurement")
    parser.add_argument("--quick", action="store_true", help="three shapes, short runs (a smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<machine>)")
    args = parser.parse_args(argv)
    if not cpu.ONEDNN_LINEAR:
        sys.exit("this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    torch.set_num_threads(args.threads)
    info = machine_info(torch.device("cpu"), args.threads)
    shapes = [s for s in SHAPES if not args.quick or s[0] in QUICK_SHAPES]
    seconds = 0.05 if args.quick else args.seconds
    onednn = cpu._onednn_linear_op

    lines = [
        f"# CPU linear backends: F.linear (MKL) vs oneDNN — {info['cpu']}", "",
        f"- {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}, {info['date']}; fp32, "
        f"plain [out, in] weights, inference (no grad); median of repeated calls ({seconds} s each)",
        "- `linear` in idefics2_mini/cpu.py uses oneDNN when the weight has at least "
        f"{cpu.ONEDNN_MIN_WEIGHT_ELEMENTS:,} elements and the input has {rows_text(cpu.ONEDNN_ROWS)} rows "
        "(`ONEDNN_ROWS`, by CPU vendor), else F.linear",
        "- ratio = oneDNN time / F.linear time (below 1: oneDNN faster); GB/s = weight bytes / time",
        "", "| weight | [out, in] | rows | F.linear µs | oneDNN µs | ratio | oneDNN GB/s | picked |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    with torch.no_grad():
        for name, out_features, in_features in shapes:
            weight = torch.randn(out_features, in_features)
            for rows in ROWS + ((PATCH_ROWS,) if name in PATCH_SHAPES and not args.quick else ()):
                x = torch.randn(rows, in_features)
                mkl = median_call_us(lambda: F.linear(x, weight), seconds)
                dnn = median_call_us(lambda: onednn(x, weight, None, "none", [], ""), seconds)
                big = weight.numel() >= cpu.ONEDNN_MIN_WEIGHT_ELEMENTS
                picked = "oneDNN" if big and cpu.onednn_takes(rows) else "F.linear"
                row = (f"| {name} | [{out_features}, {in_features}] | {rows} | {mkl:,.0f} | {dnn:,.0f} | "
                       f"{dnn / mkl:.2f} | {weight.numel() * 4 / dnn / 1e3:.1f} | {picked} |")
                print(row, flush=True)
                lines.append(row)
    write_markdown(args.out, info, "linear_backends.md", lines)


if __name__ == "__main__":
    main()
