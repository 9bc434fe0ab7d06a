"""Kernel benchmark: the Triton kernels against PyTorch's best, at the model's real shapes.

    python -m benchmarks.triton_kernels            # full sweep (GPU), or the CPU reference sweep
    python -m benchmarks.triton_kernels --quick    # a few shapes per kernel

(from the repository root, where the top-level `kernels` package is importable).

On a CUDA GPU, for every kernel and shape it times (median of repeated runs, CUDA events):
  triton       the kernel in kernels/ (compiled)
  eager        the torch reference in kernels/ (what the model runs on CPU)
  compile      torch.compile of that reference
  sdpa-flash   F.scaled_dot_product_attention restricted to the flash backend
  sdpa-mem     ... restricted to the memory-efficient backend
and reports median ms, the achieved GB/s (RMSNorm, decode: bytes that must move) or TFLOP/s
(prefill: 4 * visible (query, key) pairs * head_dim per head), and that as a fraction of the
device's peak from benchmarks/gpu_peaks.py. A device-to-device copy is timed too, as the
achievable bandwidth. SDPA has no sliding window and no packed layout: for windowed prefill it
runs plain causal (more work; its TFLOP/s is counted on its own pairs), for packed images it
runs equal-length images as a batch.

The `train` rows time prefill attention forward + backward (dq, dk, dv), as a training step
runs it, on the decoder, vision and perceiver shapes (CPU: the decoder shape, eager reference).
Their TFLOP/s count 3.5x the forward's FLOPs, FlashAttention's convention (the backward's five
matmuls against the forward's two; our separate dq kernel recomputes two more, not counted).

On CPU, Triton kernels only run in the interpreter (orders of magnitude slower than anything
real), so Triton timings need a GPU: the script says so and times only the torch references
(eager and SDPA) on smaller shapes, finishing in a couple of minutes.

Writes benchmarks/results/<device-slug>/kernels.md and kernels.csv (and kernels.png when
matplotlib is installed, the optional `bench` extra).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from benchmarks.common import cpu_name, slug
from benchmarks.gpu_peaks import lookup
from kernels import _triton
from kernels.attention_decode import attention_decode_reference, attention_decode_triton
from kernels.attention_prefill import (
    attention,
    attention_reference,
    attention_triton,
    attention_varlen,
    attention_varlen_reference,
    attention_varlen_triton,
)
from kernels.rmsnorm import rms_norm_reference

HERE = os.path.dirname(os.path.abspath(__file__))

RMS_EPS = 1e-5


# ------------------------------------------------------------------------------ device and timing


def time_ms(fn, device: torch.device, *, warmup: int = 3, reps: int = 20, budget_s: float = 2.0) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    start_all = time.perf_counter()
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


@dataclass
class Row:
    kernel: str
    shape: str
    impl: str
    ms: float | None
    metric: str  # "GB/s" or "TFLOP/s"
    value: float | None
    peak_fraction: float | None
    note: str = ""


class Bench:
    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.quick = quick
        self.rows: list[Row] = []
        self.peak = lookup(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.gpu = device.type == "cuda"
        self._compiled = {}

    def run(self, kernel, shape, impl, fn, *, bytes_moved=None, flops=None, note=""):
        try:
            ms = time_ms(fn, self.device, budget_s=1.0 if self.gpu else 3.0)
        except Exception as error:  # one failing backend must not stop the sweep
            self.rows.append(Row(kernel, shape, impl, None, "", None, None, f"{type(error).__name__}: {str(error)[:80]}"))
            print(f"  {kernel:9s} {shape:34s} {impl:11s} failed: {error!s:.80}")
            return
        if flops is not None:
            metric, value = "TFLOP/s", flops / (ms * 1e-3) / 1e12
            frac = value / self.peak.bf16_tflops if self.peak else None
        else:
            metric, value = "GB/s", bytes_moved / (ms * 1e-3) / 1e9
            frac = value / self.peak.bandwidth_gbs if self.peak else None
        self.rows.append(Row(kernel, shape, impl, ms, metric, value, frac, note))
        pct = f"{100 * frac:5.1f}% of peak" if frac is not None else ""
        print(f"  {kernel:9s} {shape:34s} {impl:11s} {ms:9.3f} ms {value:9.2f} {metric:7s} {pct} {note}")

    def compiled(self, fn):
        if fn not in self._compiled:
            self._compiled[fn] = torch.compile(fn)
        return self._compiled[fn]


def sdpa_backend_fn(backend, q, k, v, **kwargs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "mem": SDPBackend.EFFICIENT_ATTENTION,
              "math": SDPBackend.MATH}[backend]

    def call():
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

    return call


def visible_pairs(q_len: int, k_len: int, causal: bool, window: int | None) -> int:
    if not causal:
        return q_len * k_len
    total = 0
    offset = k_len - q_len
    for i in range(q_len):
        pos = i + offset
        hi = min(pos, k_len - 1)
        lo = 0 if window is None else max(0, pos - window + 1)
        total += max(0, hi - lo + 1)
    return total


# ------------------------------------------------------------------------------ the sweeps


def bench_copy(b: Bench):
    n = 8192 * 4096
    src = torch.randn(n, device=b.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    b.run("copy", f"{n} bf16", "torch", lambda: dst.copy_(src), bytes_moved=2 * 2 * n,
          note="device-to-device copy (achievable bandwidth)")


def bench_rmsnorm(b: Bench):
    rows_list = [1, 64, 1024, 8192] if b.gpu else [1, 64, 1024]
    if b.quick:
        rows_list = rows_list[-1:]
    for width in (1152, 4096):
        for rows in rows_list:
            x = torch.randn(rows, width, device=b.device, dtype=torch.bfloat16)
            w = torch.randn(width, device=b.device, dtype=torch.bfloat16)
            shape = f"{rows}x{width} bf16"
            moved = 2 * rows * width * 2 + 2 * width  # read x, write y, read weight
            b.run("rmsnorm", shape, "eager", lambda: rms_norm_reference(x, w, RMS_EPS), bytes_moved=moved)
            if b.gpu:
                b.run("rmsnorm", shape, "compile", lambda: b.compiled(rms_norm_reference)(x, w, RMS_EPS), bytes_moved=moved)
                b.run("rmsnorm", shape, "triton", lambda: kernels.rms_norm(x, w, RMS_EPS), bytes_moved=moved)


def bench_prefill(b: Bench):
    dt = torch.bfloat16
    seqs = [1024, 4096, 8192, 16384] if b.gpu else [256, 1024]
    if b.quick:
        seqs = seqs[1:2]
    for seq in seqs:
        q = torch.randn(1, 32, seq, 128, device=b.device, dtype=dt)
        k = torch.randn(1, 8, seq, 128, device=b.device, dtype=dt)
        v = torch.randn_like(k)
        window = 4096 if b.gpu else 128
        causal_flops = 4 * 32 * 128 * visible_pairs(seq, seq, True, None)
        window_flops = 4 * 32 * 128 * visible_pairs(seq, seq, True, window)
        shape = f"s{seq} 32/8h x128 causal"
        wshape = f"s{seq} 32/8h x128 causal w{window}"
        if b.gpu:
            b.run("prefill", shape, "triton", lambda: attention_triton(q, k, v, causal=True), flops=causal_flops)
            b.run("prefill", wshape, "triton", lambda: attention_triton(q, k, v, causal=True, window=window), flops=window_flops)
            for backend in ("flash", "mem"):
                b.run("prefill", shape, f"sdpa-{backend}",
                      sdpa_backend_fn(backend, q, k, v, is_causal=True, enable_gqa=True), flops=causal_flops)
            if seq <= 4096:
                b.run("prefill", wshape, "compile",
                      lambda: b.compiled(attention_reference)(q, k, v, causal=True, window=window), flops=window_flops)
        else:
            b.run("prefill", shape, "sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                  flops=causal_flops)
            b.run("prefill", wshape, "eager", lambda: attention_reference(q, k, v, causal=True, window=window), flops=window_flops)


def bench_vision(b: Bench):
    dt = torch.bfloat16
    images = [1, 5] if b.gpu else [1]
    tokens = 4900 if b.gpu else 1225  # 70x70 patches of a 980px image (CPU: 35x35)
    if b.quick:
        images = images[:1]
    for n in images:
        q = torch.randn(n * tokens, 16, 72, device=b.device, dtype=dt)
        k, v = torch.randn_like(q), torch.randn_like(q)
        cu = torch.arange(0, (n + 1) * tokens, tokens, device=b.device, dtype=torch.int32)
        flops = 4 * 16 * 72 * n * tokens * tokens
        shape = f"{n}x{tokens} 16h x72 packed"
        qb, kb, vb = (t.view(n, tokens, 16, 72).transpose(1, 2) for t in (q, k, v))
        if b.gpu:
            b.run("vision", shape, "triton", lambda: attention_varlen_triton(q, k, v, cu, cu, max_seqlen_q=tokens, max_seqlen_k=tokens), flops=flops)
            for backend in ("flash", "mem"):
                b.run("vision", shape, f"sdpa-{backend}", sdpa_backend_fn(backend, qb, kb, vb), flops=flops,
                      note="equal-length images as a batch")
        else:
            b.run("vision", shape, "eager", lambda: attention_varlen_reference(q, k, v, cu, cu), flops=flops)


def bench_perceiver(b: Bench):
    dt = torch.bfloat16
    context = 1000 if b.gpu else 500
    for images in ([1, 8] if b.gpu and not b.quick else [1]):
        keys = context + 64
        q = torch.randn(images * 64, 16, 96, device=b.device, dtype=dt)
        k = torch.randn(images * keys, 4, 96, device=b.device, dtype=dt)
        v = torch.randn_like(k)
        cq = torch.arange(0, (images + 1) * 64, 64, device=b.device, dtype=torch.int32)
        ck = torch.arange(0, (images + 1) * keys, keys, device=b.device, dtype=torch.int32)
        flops = 4 * 16 * 96 * images * 64 * keys
        shape = f"{images}x64 q over {keys} k 16/4h x96"
        qb = q.view(images, 64, 16, 96).transpose(1, 2)
        kb, vb = (t.view(images, keys, 4, 96).transpose(1, 2) for t in (k, v))
        if b.gpu:
            b.run("perceiver", shape, "triton", lambda: attention_varlen_triton(q, k, v, cq, ck, max_seqlen_q=64, max_seqlen_k=keys), flops=flops)
            for backend in ("flash", "mem"):
                b.run("perceiver", shape, f"sdpa-{backend}", sdpa_backend_fn(backend, qb, kb, vb, enable_gqa=True), flops=flops)
        else:
            b.run("perceiver", shape, "eager", lambda: attention_varlen_reference(q, k, v, cq, ck), flops=flops)


TRAIN_FLOPS_PER_FORWARD_FLOP = 3.5  # forward (1) + backward (2.5), FlashAttention's convention


def forward_backward(fn, inputs):
    """A closure running fn(*inputs) and its backward (dq, dk, dv) for a fixed random dO
    (drawn at the first call, inside Bench.run, so a backend that fails is recorded, not fatal)."""
    grad_out = []

    def step():
        out = fn(*inputs)
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        torch.autograd.grad(out, inputs, grad_out[0])

    return step


def bench_train(b: Bench):
    """Prefill attention forward + backward, on leaves that require grad (LoRA fine-tuning)."""
    dt = torch.bfloat16
    seqs = [1024, 4096] if b.gpu else [256]
    if b.quick:
        seqs = seqs[:1]

    def leaves(*shapes):
        return [torch.randn(shape, device=b.device, dtype=dt, requires_grad=True) for shape in shapes]

    # main() times everything under inference_mode; the backward needs autograd back.
    with torch.inference_mode(False), torch.enable_grad():
        for seq in seqs:
            inputs = leaves((1, 32, seq, 128), (1, 8, seq, 128), (1, 8, seq, 128))
            flops = TRAIN_FLOPS_PER_FORWARD_FLOP * 4 * 32 * 128 * visible_pairs(seq, seq, True, None)
            shape = f"s{seq} 32/8h x128 causal fwd+bwd"
            if b.gpu:
                b.run("train", shape, "triton", forward_backward(lambda q, k, v: attention(q, k, v, causal=True), inputs),
                      flops=flops)
                for backend in ("flash", "mem"):
                    b.run("train", shape, f"sdpa-{backend}",
                          forward_backward(lambda q, k, v, backend=backend: sdpa_backend_fn(
                              backend, q, k, v, is_causal=True, enable_gqa=True)(), inputs), flops=flops)
            else:
                b.run("train", shape, "eager",
                      forward_backward(lambda q, k, v: attention_reference(q, k, v, causal=True), inputs), flops=flops)
        if not b.gpu:
            return  # the CPU sweep stays short: the decoder shape above is the reference

        tokens = 4900  # one 980px image: 70x70 patches, 16 heads x 72, packed
        inputs = leaves((tokens, 16, 72), (tokens, 16, 72), (tokens, 16, 72))
        cu = torch.tensor([0, tokens], device=b.device, dtype=torch.int32)
        flops = TRAIN_FLOPS_PER_FORWARD_FLOP * 4 * 16 * 72 * tokens * tokens
        shape = f"1x{tokens} 16h x72 packed fwd+bwd"
        b.run("train", shape, "triton", forward_backward(
            lambda q, k, v: attention_varlen(q, k, v, cu, cu, max_seqlen_q=tokens, max_seqlen_k=tokens), inputs),
            flops=flops)
        for backend in ("flash", "mem"):
            b.run("train", shape, f"sdpa-{backend}", forward_backward(
                lambda q, k, v, backend=backend: sdpa_backend_fn(
                    backend, *(t.view(1, tokens, 16, 72).transpose(1, 2) for t in (q, k, v)))(), inputs), flops=flops)

        keys = 1000 + 64  # perceiver: 64 latents over (image features + latents), 16/4 heads x 96
        inputs = leaves((64, 16, 96), (keys, 4, 96), (keys, 4, 96))
        cq = torch.tensor([0, 64], device=b.device, dtype=torch.int32)
        ck = torch.tensor([0, keys], device=b.device, dtype=torch.int32)
        flops = TRAIN_FLOPS_PER_FORWARD_FLOP * 4 * 16 * 96 * 64 * keys
        shape = f"1x64 q over {keys} k 16/4h x96 fwd+bwd"
        b.run("train", shape, "triton", forward_backward(
            lambda q, k, v: attention_varlen(q, k, v, cq, ck, max_seqlen_q=64, max_seqlen_k=keys), inputs), flops=flops)
        for backend in ("flash", "mem"):
            b.run("train", shape, f"sdpa-{backend}", forward_backward(
                lambda q, k, v, backend=backend: sdpa_backend_fn(
                    backend, q.view(1, 64, 16, 96).transpose(1, 2), k.view(1, keys, 4, 96).transpose(1, 2),
                    v.view(1, keys, 4, 96).transpose(1, 2), enable_gqa=True)(), inputs), flops=flops)


def bench_decode(b: Bench):
    dt = torch.bfloat16
    if b.gpu:
        grid = [(1, 1024), (1, 4096), (1, 16384), (1, 32768), (8, 4096), (8, 16384), (64, 1024), (64, 4096)]
    else:
        grid = [(1, 1024), (1, 4096), (8, 1024)]
    if b.quick:
        grid = grid[1:2]
    for batch, slots in grid:
        q = torch.randn(batch, 32, 128, device=b.device, dtype=dt)
        kc = torch.randn(batch, 8, slots, 128, device=b.device, dtype=dt)
        vc = torch.randn_like(kc)
        seqlens = torch.full((batch,), slots, device=b.device, dtype=torch.int32)
        moved = 2 * batch * 8 * slots * 128 * 2  # K and V bytes of the valid cache
        shape = f"b{batch} cache {slots} 32/8h x128"
        b.run("decode", shape, "eager", lambda: attention_decode_reference(q, kc, vc, seqlens), bytes_moved=moved)
        q4 = q[:, :, None]
        if b.gpu:
            b.run("decode", shape, "triton", lambda: attention_decode_triton(q, kc, vc, seqlens), bytes_moved=moved)
            b.run("decode", shape, "compile", lambda: b.compiled(attention_decode_reference)(q, kc, vc, seqlens), bytes_moved=moved)
            for backend in ("flash", "mem"):
                b.run("decode", shape, f"sdpa-{backend}", sdpa_backend_fn(backend, q4, kc, vc, enable_gqa=True), bytes_moved=moved)
        else:
            b.run("decode", shape, "sdpa", lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True), bytes_moved=moved)


# ------------------------------------------------------------------------------ output


def write_results(b: Bench, device_name: str, out_dir: str, header_note: str):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernels.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kernel", "shape", "impl", "median_ms", "metric", "value", "fraction_of_peak", "note"])
        for r in b.rows:
            writer.writerow([r.kernel, r.shape, r.impl, "" if r.ms is None else f"{r.ms:.4f}", r.metric,
                             "" if r.value is None else f"{r.value:.3f}",
                             "" if r.peak_fraction is None else f"{r.peak_fraction:.3f}", r.note])
    peak = (f"{b.peak.name}: {b.peak.bandwidth_gbs:.0f} GB/s, {b.peak.bf16_tflops:.0f} dense bf16 TFLOP/s"
            if b.peak else "no peak table entry for this device: fraction of peak not reported")
    lines = [
        f"# Kernel benchmark — {device_name}",
        "",
        f"- command: `python -m benchmarks.triton_kernels{' --quick' if b.quick else ''}`",
        f"- torch {torch.__version__}, triton {getattr(_triton.triton, '__version__', 'not installed')}, "
        f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}",
        f"- peak: {peak}",
        f"- {header_note}",
        "",
        "| kernel | shape | impl | median ms | rate | % of peak | note |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in b.rows:
        ms = "failed" if r.ms is None else f"{r.ms:.3f}"
        rate = "" if r.value is None else f"{r.value:.2f} {r.metric}"
        frac = "" if r.peak_fraction is None else f"{100 * r.peak_fraction:.1f}%"
        lines.append(f"| {r.kernel} | {r.shape} | {r.impl} | {ms} | {rate} | {frac} | {r.note} |")
    with open(os.path.join(out_dir, "kernels.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = sorted({r.kernel for r in b.rows if r.value is not None})
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.6 * len(groups)), squeeze=False)
    for ax, kernel in zip(axes[:, 0], groups):
        rows = [r for r in b.rows if r.kernel == kernel and r.value is not None]
        shapes = list(dict.fromkeys(r.shape for r in rows))
        impls = list(dict.fromkeys(r.impl for r in rows))
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            xs = [shapes.index(r.shape) + i * width for r in rows if r.impl == impl]
            ax.bar(xs, [r.value for r in rows if r.impl == impl], width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels(shapes, fontsize=7)
        ax.set_ylabel(rows[0].metric)
        ax.set_title(kernel, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(device_name, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "kernels.png"), dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes per kernel")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    parser.add_argument("--only", default=None, help="comma-separated subset: copy,rmsnorm,prefill,vision,perceiver,decode,train")
    args = parser.parse_args(argv)

    gpu = torch.cuda.is_available() and _triton.available() and not _triton.interpreter_active()
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        device_name = torch.cuda.get_device_name(device)
        note = "Triton kernels compiled for this GPU; SDPA backends forced one at a time."
    else:
        device_name = cpu_name()
        note = ("CPU run: Triton timings need a GPU (on CPU the kernels only run in Triton's "
                "interpreter). Only the torch references are timed here (eager reference and "
                "SDPA), on smaller shapes; torch.compile is skipped; no fraction of peak for CPUs. "
                f"{torch.get_num_threads()} torch threads.")
        print("=" * 100)
        print("NOTE: no CUDA GPU. Triton timings need a GPU; timing the torch references only, on smaller shapes.")
        print("=" * 100)
    torch.manual_seed(0)
    bench = Bench(device, args.quick)
    print(f"device: {device_name}" + (f" (peak: {bench.peak})" if bench.peak else ""))
    steps = {"copy": bench_copy, "rmsnorm": bench_rmsnorm, "prefill": bench_prefill, "vision": bench_vision,
             "perceiver": bench_perceiver, "decode": bench_decode, "train": bench_train}
    wanted = args.only.split(",") if args.only else list(steps)
    with torch.inference_mode():
        for name in wanted:
            if name == "copy" and not gpu:
                continue
            print(f"[{name}]")
            steps[name](bench)
    out_dir = args.out or os.path.join(HERE, "results", slug(device_name))
    write_results(bench, device_name, out_dir, note)
    print(f"wrote {out_dir}/kernels.md and kernels.csv")


if __name__ == "__main__":
    main()
