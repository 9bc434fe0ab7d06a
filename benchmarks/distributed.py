"""Tensor-parallel decode: tokens/s, weight bytes and peak memory per rank at TP 1 and 2.

    python -m benchmarks.distributed                  # the 8B-wide model, ~5 min on 2 CPU cores
    python -m benchmarks.distributed --model tiny     # seconds

Each TP degree runs under torchrun (gloo on the CPU, nccl on GPUs) on the same prompt; TP 1 is
one process. On a 2-core CPU two ranks share the cores one thread each, against one process
with both threads: TP cannot be faster there, and the point of the run is what it *does*
divide: the decoder's weight bytes per rank (and so the bytes each rank streams per token),
and the cost of the two all-reduces per decoder layer per token. On a multi-GPU machine
`--degrees 1,2,4,8` gives the scaling.

Model "wide": the real Idefics2-8B widths (decoder 4096 wide, 32/8 heads x 128, SwiGLU 14336,
vocab 32003; vision 1152, perceiver 4096) with 2 vision, 1 perceiver and 4 decoder layers,
fp32, random weights. A 40-token text prompt, greedy, 32 new tokens, batch 1.
Results: benchmarks/results/<machine>/distributed.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, peak_rss_mib, usable_cores, write_markdown

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ("User: Write a short story about a lighthouse keeper who finds a message in a bottle, "
          "and tell it slowly.<end_of_utterance>\nAssistant:")


def config_for(name: str):
    import idefics2_mini as im  # noqa: PLC0415

    if name == "wide":
        return im.Idefics2Config(vision=im.VisionConfig(num_hidden_layers=2),
                                 perceiver=im.PerceiverConfig(resampler_depth=1),
                                 text=im.TextConfig(num_hidden_layers=4))
    if name == "tiny":
        return im.Idefics2Config(
            vision=im.VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4),
            perceiver=im.PerceiverConfig(hidden_size=256, resampler_depth=1, resampler_n_heads=4,
                                         resampler_head_dim=32, num_key_value_heads=2),
            text=im.TextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=4, head_dim=32),
        )
    raise KeyError(name)


def build_checkpoint(name: str, path: Path) -> None:
    from benchmarks.train import build_checkpoint as build  # noqa: PLC0415  (same random layout)

    build(name, path, config_for(name))


# ============================================================================ one rank (under torchrun)


def worker(spec: dict) -> None:
    import torch.distributed as dist  # noqa: PLC0415

    from idefics2_mini import distributed  # noqa: PLC0415
    from idefics2_mini.model import Idefics2  # noqa: PLC0415
    from idefics2_mini.processor import Idefics2Processor  # noqa: PLC0415

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    if spec["degree"] == 1:
        model = Idefics2.from_pretrained(spec["checkpoint"], mmap=False)
        rank = 0
    else:
        group = distributed.init_distributed(spec["degree"])
        model = distributed.load_tensor_parallel(spec["checkpoint"], group)
        rank = dist.get_rank()
        calls = {"all_reduce": 0}
        all_reduce = dist.all_reduce

        def counted(*args, **kwargs):
            calls["all_reduce"] += 1
            return all_reduce(*args, **kwargs)

        dist.all_reduce = counted
    load_s = time.perf_counter() - start
    batch = Idefics2Processor.from_pretrained(None)(text=PROMPT)
    new = spec["new_tokens"]
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, eos_token_id=[])  # warm up
        times, tokens = [], None
        for _ in range(spec["repeats"]):
            if spec["degree"] > 1:
                dist.barrier()
                calls["all_reduce"] = 0
            begin = time.perf_counter()
            tokens = model.generate(**batch, max_new_tokens=new, eos_token_id=[])
            times.append(time.perf_counter() - begin)
    result = {
        "rank": rank, "load_s": load_s, "generate_s": statistics.median(times),
        "tokens_per_s": new / statistics.median(times), "weight_bytes": distributed.weight_bytes(model),
        "decoder_weight_bytes": sum(p.numel() * p.element_size() for p in model.text.layers.parameters()),
        "peak_rss_mib": peak_rss_mib(), "tokens": tokens[0, -new:].tolist(),
        "all_reduces_per_generate": calls["all_reduce"] if spec["degree"] > 1 else 0,
        "prompt_tokens": int(batch["input_ids"].shape[1]),
    }
    out = Path(spec["out"]) / f"rank{rank}.json"
    out.write_text(json.dumps(result))
    if spec["degree"] > 1:
        dist.destroy_process_group()


def run_degree(spec: dict) -> list[dict]:
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    payload = json.dumps(spec)
    if spec["degree"] == 1:
        command = [sys.executable, "-m", "benchmarks.distributed", "--worker", payload]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec['degree']}",
                   "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "benchmarks.distributed",
                   "--worker", payload]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"TP {spec['degree']} failed:\n{done.stderr[-3000:]}")
    return [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wide", choices=["wide", "tiny"])
    parser.add_argument("--degrees", default="1,2", help="comma-separated TP degrees")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights-dir", type=Path, default=ROOT / "weights" / "bench")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    checkpoint = args.weights_dir / f"distributed-{args.model}"
    build_checkpoint(args.model, checkpoint)
    cores = usable_cores()
    rows = {}
    for degree in (int(d) for d in args.degrees.split(",")):
        spec = {"degree": degree, "checkpoint": str(checkpoint), "new_tokens": args.new_tokens,
                "repeats": args.repeats, "threads": max(1, cores // degree),
                "out": str(args.weights_dir / f"distributed-run-{degree}")}
        print(f"TP {degree} ({spec['threads']} thread(s) per rank) ...", flush=True)
        rows[degree] = run_degree(spec)
    report(args, rows)


def report(args, rows: dict[int, list[dict]]) -> None:
    info = machine_info(torch.device("cpu"), torch.get_num_threads())
    base = rows[min(rows)][0]
    lines = [f"# Tensor-parallel decode, {args.model} model", "",
             "`python -m benchmarks.distributed " + " ".join(sys.argv[1:]) + "`; the script's docstring says "
             "what is measured and why a 2-core CPU cannot show a speed-up.", "",
             " · ".join(f"{k}: {v}" for k, v in info.items()), "",
             f"Greedy decode of {args.new_tokens} tokens after a {base['prompt_tokens']}-token prompt, batch 1, "
             f"median of {args.repeats}; peak = the rank's peak resident memory.", "",
             "| TP | threads/rank | tokens/s | weight MiB/rank | decoder weight MiB/rank | peak MiB/rank | "
             "all-reduces per token | load s | same tokens as TP 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for degree, ranks in rows.items():
        first = ranks[0]
        per_token = first["all_reduces_per_generate"] / args.new_tokens if degree > 1 else 0
        same = all(r["tokens"] == base["tokens"] for r in ranks)
        lines.append(
            f"| {degree} | {max(1, usable_cores() // degree)} | {first['tokens_per_s']:.2f} | "
            f"{first['weight_bytes'] / 2**20:,.0f} | {first['decoder_weight_bytes'] / 2**20:,.0f} | "
            f"{max(r['peak_rss_mib'] for r in ranks):,.0f} | {per_token:.1f} | {first['load_s']:.1f} | "
            f"{'yes' if same else 'NO'} |")
    lines += ["", "All-reduces per token: two per decoder layer (after attention, after the MLP); the "
              "count includes the prompt's prefill spread over the generated tokens."]
    out = write_markdown(args.out, info, "distributed.md" if args.model == "wide" else f"distributed-{args.model}.md",
                         lines)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines[-len(rows) - 4:]))


if __name__ == "__main__":
    main()
