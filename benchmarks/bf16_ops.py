"""The bf16 pieces of a CPU decode step and image prefill that issue 18 found slow, each timed in
the form torch runs by default and in the form idefics2_mini runs (backends/cpu.py, kernels/rmsnorm.py).

    python -m benchmarks.bf16_ops [--threads N] [--quick]

1. One and eight input rows through each 8B weight shape: F.linear (oneDNN's bf16 inner
   product) as it is, one row run as two rows (oneDNN's one-row kernel reads some shapes far
   below the memory bandwidth; which form `backends.cpu.settle_one_row` picks where gemv.c is
   not built), and gemv.c (`backends.gemv`, what `backends.cpu.linear` runs for up to 8 rows).
2. The last token's hidden state [1, 1, 4096], a slice of [1, T, 4096], through the 8B lm_head:
   F.linear on the slice (matmul cannot fold it: bmm over an expanded weight, copied in bf16)
   against the slice reshaped to [1, 4096] (what `backends.cpu.linear` does).
3. RMSNorm of bf16 rows: the reference's cast order written out (eight ops) against torch's
   fused op without a weight, then the weight (`kernels.rmsnorm.rms_norm_reference`, the same
   bits), for a decode row and for the perceiver's 3220 context rows.

Results: benchmarks/results/<machine>/bf16_ops.md. Times are medians of repeated calls, each
form measured in turn and the round repeated (best round kept), after waiting for a quiet CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info, median_call_us, wait_for_quiet_machine, write_markdown
from idefics2_mini.backends import cpu, gemv

SHAPES = [  # (name, out, in): the 8B decoder's and lm_head's weights as a decode step reads them
    ("8B lm_head", 32003, 4096),
    ("8B gate+up (fused)", 28672, 4096),
    ("8B down", 4096, 14336),
    ("8B q+k+v (fused)", 6144, 4096),
    ("8B o_proj", 4096, 4096),
    ("8B projector down / perceiver", 4096, 16384),
    ("8B vision fc2", 1152, 4304),
]
QUICK_SHAPES = ["8B o_proj"]


def best_of(fns: dict, seconds: float, rounds: int) -> dict[str, float]:
    """Median µs per call of each fn, the best of `rounds` rounds that alternate the fns."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], median_call_us(fn, seconds))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=0.2, help="time per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one shape, short runs (a smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<machine>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(torch.device("cpu"), args.threads)
    seconds, rounds = (0.02, 1) if args.quick else (args.seconds, args.rounds)
    wait = (lambda: None) if args.quick else (lambda: wait_for_quiet_machine(300, threshold=0.1))
    bf16 = torch.bfloat16
    lines = [
        f"# bf16 operations of a CPU decode step and image prefill — {info['cpu']}", "",
        f"- {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}, {info['date']}; bf16, "
        f"inference; median µs of repeated calls ({seconds} s each), best of {rounds} alternating rounds; "
        "GB/s = weight bytes / time. The CPU is shared: other engineers' work may have run meanwhile.",
        "", "## One input row through a bf16 weight", "",
        "| weight | [out, in] | 1 row: F.linear µs | as two rows µs | gemv.c µs | 1 row GB/s: F.linear / two / gemv.c "
        "| 8 rows: F.linear µs | gemv.c µs | 8 rows GB/s: F.linear / gemv.c | settled (no gemv.c) |",
        "|---|---|---:|---:|---:|---|---:|---:|---|---|",
    ]
    cpu.ONE_ROW_AS_TWO.clear()
    have_gemv = gemv.LIBRARY.get() is not None
    with torch.no_grad():
        for name, out_features, in_features in SHAPES:
            if args.quick and name not in QUICK_SHAPES:
                continue
            weight = torch.randn(out_features, in_features).to(bf16)
            one = torch.randn(1, in_features).to(bf16)
            two = one.expand(2, in_features).contiguous()
            eight = torch.randn(8, in_features).to(bf16)
            fns = {"one": lambda: F.linear(one, weight), "two": lambda: F.linear(two, weight),
                   "eight": lambda: F.linear(eight, weight)}
            if have_gemv:
                fns |= {"gemv": lambda: gemv.bf16_linear(one, weight), "gemv8": lambda: gemv.bf16_linear(eight, weight)}
            wait()
            times = best_of(fns, seconds, rounds)
            settled = "as two rows" if cpu.settle_one_row(weight) else "one row"
            gb = weight.numel() * 2 / 1e3
            g1, g8 = times.get("gemv", float("nan")), times.get("gemv8", float("nan"))
            row = (f"| {name} | [{out_features}, {in_features}] | {times['one']:,.0f} | {times['two']:,.0f} | {g1:,.0f} | "
                   f"{gb / times['one']:.1f} / {gb / times['two']:.1f} / {gb / g1:.1f} | {times['eight']:,.0f} | {g8:,.0f} | "
                   f"{gb / times['eight']:.1f} / {gb / g8:.1f} | {settled} |")
            print(row, flush=True)
            lines.append(row)

        lines += ["", "## The last token through the lm_head [32003, 4096]", "",
                  "| input | µs |", "|---|---:|"]
        weight = torch.randn(32003, 4096).to(bf16)
        hidden = torch.randn(1, 40, 4096).to(bf16)
        last = hidden[:, -1:]
        wait()
        times = best_of({"slice": lambda: F.linear(last, weight),
                         "flat": lambda: F.linear(last.reshape(1, 4096), weight)}, seconds, rounds)
        lines += [f"| F.linear on the [1, 1, 4096] slice of [1, 40, 4096] (bmm over the expanded weight) | "
                  f"{times['slice']:,.0f} |",
                  f"| the slice reshaped to [1, 4096] (`backends.cpu.linear`) | {times['flat']:,.0f} |"]
        print(lines[-2], lines[-1], sep="\n", flush=True)
        del weight

        lines += ["", "## RMSNorm of bf16 rows (width 4096)", "",
                  "| rows | written out (reference cast order) µs | fused op, no weight, then × weight µs | ratio |",
                  "|---:|---:|---:|---:|"]
        norm_weight = torch.randn(4096).to(bf16)
        for rows in (1, 3220):
            x = torch.randn(1, rows, 4096).to(bf16)

            def written_out():
                x32 = x.float()
                return norm_weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf16)

            def fused():
                return norm_weight * F.rms_norm(x, (4096,), None, 1e-5)

            assert torch.equal(written_out(), fused())
            wait()
            times = best_of({"written": written_out, "fused": fused}, seconds, rounds)
            lines.append(f"| {rows} | {times['written']:,.0f} | {times['fused']:,.0f} | "
                         f"{times['fused'] / times['written']:.2f} |")
            print(lines[-1], flush=True)
    write_markdown(args.out, info, "bf16_ops.md", lines)


if __name__ == "__main__":
    main()
