"""The small per-step pieces of CPU decode that are not linears: choosing the greedy token, and
decode attention eager (SDPA) against compiled (the math Inductor fuses).

    python -m benchmarks.decode_ops [--threads N] [--quick]

- greedy token: `torch.argmax` over a [B, 32003] row (a scalar loop on the CPU) against
  `idefics2_mini.backends.cpu.greedy_argmax` (chunk maxima with the vectorised amax, then argmax
  over 251 chunk maxima and over one 128-wide chunk); both give the same index.
- decode attention: `kernels.attention_decode_reference` eager (one SDPA call) against both forms
  under `torch.compile` (Inductor): the reference (SDPA) and `attention_decode_math` (plain
  math); inside a compiled step `kernels.attention_decode` runs the math for a small cache
  (`COMPILED_MATH_MAX_KV_ELEMENTS`, the "picked" column) and SDPA otherwise. Alone, a compiled call still pays Dynamo's guard check and the
  Python wrapper (~40 us here); inside the compiled decode step the math is fused into the
  surrounding loops, so the compiled figures here are upper bounds of their cost there.

Results: benchmarks/results/<machine>/decode_ops.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from benchmarks.common import machine_info, median_call_us, write_markdown
from idefics2_mini.backends.cpu import greedy_argmax

# `kernels.attention_decode` the attribute is the function; the module is imported by name.
decode_module = importlib.import_module("kernels.attention_decode")

VOCAB = 32003
# (name, batch, q heads, kv heads, cached keys, head dim)
ATTENTION_SHAPES = [
    ("tiny", 1, 4, 2, 64, 32),
    ("tiny", 8, 4, 2, 64, 32),
    ("tiny", 1, 4, 2, 512, 32),
    ("8B", 1, 32, 8, 32, 128),
    ("8B", 1, 32, 8, 128, 128),
    ("8B", 8, 32, 8, 128, 128),
    ("8B", 1, 32, 8, 1024, 128),
    ("8B", 8, 32, 8, 1024, 128),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=0.5, help="time spent on each measurement")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, short runs (a smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<machine>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(torch.device("cpu"), args.threads)
    seconds = 0.05 if args.quick else args.seconds

    lines = [
        f"# CPU decode pieces besides the linears — {info['cpu']}", "",
        f"- {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}, {info['date']}; fp32; "
        f"median of repeated calls ({seconds} s each)", "",
        "## Greedy token over a 32,003-entry vocabulary", "",
        "| batch | torch.argmax µs | greedy_argmax µs | ratio |", "|---:|---:|---:|---:|",
    ]
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        logits = torch.randn(batch, VOCAB, generator=generator)
        if not torch.equal(greedy_argmax(logits), logits.argmax(-1)):
            sys.exit("greedy_argmax disagrees with torch.argmax")
        plain = median_call_us(lambda: logits.argmax(-1), seconds)
        two_level = median_call_us(lambda: greedy_argmax(logits), seconds)
        lines.append(f"| {batch} | {plain:,.1f} | {two_level:,.1f} | {two_level / plain:.2f} |")
        print(lines[-1], flush=True)

    lines += [
        "", "## Decode attention: one query per row against the KV cache", "",
        "| shape | batch | heads q/kv | keys | head dim | eager (SDPA) µs | compiled math µs | compiled SDPA µs "
        "| math / SDPA | picked |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    shapes = [s for s in ATTENTION_SHAPES if not args.quick or s[0] == "tiny"]
    limit = decode_module.COMPILED_MATH_MAX_KV_ELEMENTS
    with torch.no_grad():
        for name, batch, q_heads, kv_heads, slots, head_dim in shapes:
            q = torch.randn(batch, q_heads, head_dim, generator=generator)
            k = torch.randn(batch, kv_heads, slots, head_dim, generator=generator)
            v = torch.randn(batch, kv_heads, slots, head_dim, generator=generator)
            seqlens = torch.full((batch,), slots, dtype=torch.int32)
            key_mask = torch.ones(batch, slots, dtype=torch.bool)
            key_mask[:, :3] = False  # left padding

            def eager():
                return decode_module.attention_decode_reference(q, k, v, seqlens, key_mask=key_mask)

            times = {"eager": median_call_us(eager, seconds)}
            torch._dynamo.reset()  # two graphs per shape; the recompile limit counts all of them
            forms = (("math", decode_module.attention_decode_math), ("SDPA", decode_module.attention_decode_reference))
            for form, function in forms:
                compiled = torch.compile(function, fullgraph=True, dynamic=False)

                def fused():
                    return compiled(q, k, v, seqlens, key_mask=key_mask)

                if (fused() - eager()).abs().max() > 1e-4:
                    sys.exit(f"compiled ({form}) decode attention disagrees with the eager reference "
                             f"({name}, batch {batch})")
                times[form] = median_call_us(fused, seconds)
            picked = "math" if slots * head_dim <= limit else "SDPA"
            lines.append(f"| {name} | {batch} | {q_heads}/{kv_heads} | {slots} | {head_dim} | {times['eager']:,.1f} | "
                         f"{times['math']:,.1f} | {times['SDPA']:,.1f} | {times['math'] / times['SDPA']:.2f} | "
                         f"{picked} |")
            print(lines[-1], flush=True)

    write_markdown(args.out, info, "decode_ops.md", lines)


if __name__ == "__main__":
    main()
