"""End-to-end benchmark: this project against the reference (transformers), side by side.

    python -m benchmarks.e2e                      # tiny + wide, fp32 and bf16 (+ the full 8B on CUDA); ~50 min on 2 CPU cores
    python -m benchmarks.e2e --models wide --impls ours     # a subset (ratios need both impls)
    python -m benchmarks.e2e --quick              # smoke run: tiny only, 1 repeat (used by the tests)

Three files: this driver (models, inputs, checkpoints, the processes, the rounds), e2e_child.py
(what one measuring process does) and e2e_report.py (rows, targets, the markdown, CSV and plot).

What it does
------------
1. Builds, once, random checkpoints in the official safetensors layout under weights/bench/
   (git-ignored), loadable by both implementations:
     tiny  small widths and 4 decoder layers, but the real vocabulary (32003), the real vision
           grid (980 px, patch 14) and 64 latents, so real processor outputs fit: the per-token
           Python/dispatch overhead dominates here;
     wide  the real Idefics2-8B widths (vision 1152/4304/16 heads, the full perceiver: 4096 wide,
           16/4 heads x 96, depth 3; decoder 4096/14336, 32/8 heads, vocab 32003) with only 2
           vision and 2 decoder layers so that it fits a CPU: matrix products dominate;
     tiny-bf16, wide-bf16  the same fp32 files loaded in bf16 by both implementations (the
           dtype in which the real 8B fits a 24 GB machine; benchmarks/fullsize.py runs that one);
           eager and compiled, no quantized variants;
     full  the real 8B, in bf16 - only when CUDA is available.
2. Makes the inputs once with this project's processor (the reference processor produces the same
   tensors, see tests/test_processor.py), so both implementations get identical tensors:
     - one deterministic 980x653 PIL image + a ~30-token question, without and with image
       splitting (1 or 5 crops);
     - 8 text-only prompts of different lengths (batch 1 uses the first one).
3. Runs every (model, implementation) in its own fresh Python process with the same
   torch.set_num_threads, after reading the checkpoint files once so the page cache is warm for
   both; `--rounds` (default 2) such processes per implementation, round-robin, so that a slow
   spell of a shared machine hits every implementation, and each figure is the median over the
   rounds. The implementations: ours and the reference as they run by default (eager), and each
   with its decode compiled (decode only): ours with `compile_decode(model)`, the reference
   with its own recipe, a static cache + `compile_config` in generate. Each process measures:
     load     wall seconds of `from_pretrained` (fp32 on CPU); the median over `--repeats` fresh
              processes (the first is the measuring process, the others only load). Both
              implementations map the safetensors files and defer the reads to first use (ours:
              parameters are views of a private mapping; see idefics2_mini/loading.py), so the
              first-token time after loading is reported too, and the load-only processes also
              time ours copying the weights (mmap=False, as when converting dtype);
     prefill  wall seconds of generating 1 token for the image prompt (= time to first token
              given the processed tensors: vision tower + connector + decoder prefill + lm_head);
     decode   tokens/s at batch 1 and 8 on the text prompts: (t(33 new tokens) - t(1 new token))
              / 32 steps, from the medians of t(33) and t(1); greedy, stopping disabled so every
              run makes exactly the requested tokens; also the time of the first such run, which
              for the compiled variants includes compiling (an empty Inductor cache per process);
     memory   peak resident set size (ru_maxrss) of the process, after loading and at the end;
              on CUDA also torch.cuda.max_memory_allocated.
   Every timed call runs once untimed first (warm-up); timings are medians of `--repeats` runs.
4. Measures this machine's read bandwidth (median time of `torch.sum` over a 1 GiB fp32 tensor
   at the same thread count; see benchmarks/common.py), to report decode against it.
5. Writes benchmarks/results/<machine>/e2e.md, .csv, .json (and .png when matplotlib imports),
   replacing the machine's previous run; earlier runs are in git's history (e2e_report.py, which
   also checks the targets).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.e2e_child import RESULT_PREFIX
from benchmarks.e2e_report import build_rows, fmt, print_rows, write_results

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("ours", "reference", "ours_compiled", "reference_compiled", "ours_int8", "ours_int4")
# The compiled variants measure decode only (what compiling changes), each in its own process with
# an empty Inductor cache, so the compile time they report is what a first run pays:
#   ours_compiled       `compile_decode(model)` (torch.compile of the decode step; opt-in)
#   reference_compiled  transformers' own recipe: a static KV cache + `compile_config` in generate
# The quantized variants (decode, load and memory only) load the same fp32 files quantized on the way
# (idefics2_mini/quantize/; benchmarks/quantize.py measures them in depth, accuracy included):
#   ours_int8           from_pretrained(quantize="int8"): per-channel int8 decoder, connector, lm_head
#   ours_int4           from_pretrained(quantize="int4"): group-wise int4 (groups of 64, asymmetric; lm_head int8)
#                       (it compiles automatically on GPUs; on a CPU `_compile_all_devices` asks it to)


# ============================================================================ models and inputs


@dataclass(frozen=True)
class BenchModel:
    name: str
    description: str
    dtype: str  # "float32" | "bfloat16": the run's dtype, and the checkpoint's unless `base` is set
    repeats: int  # timed runs per decode measurement, and fresh processes for the load time
    prefill_repeats: int  # timed runs per prefill measurement
    # Prefill inputs run once untimed before timing. The wide model's prefill takes tens of seconds
    # on a CPU, where one-time costs are lost in the noise: it warms up on the unsplit image only.
    prefill_warmup: tuple[str, ...] = ("image", "image_split")
    needs_cuda: bool = False
    # The model whose config and (fp32) checkpoint this one runs in its own dtype: "wide-bf16" loads
    # the wide model's fp32 files as bf16, as a user does with the official (fp32) download.
    base: str = ""
    impls: tuple[str, ...] | None = None  # the implementations run for it (None: all asked for)

    def config(self):
        import idefics2_mini as im  # noqa: PLC0415

        name = self.base or self.name
        if name == "tiny":
            return im.Idefics2Config(
                vision=im.VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=980, patch_size=14),
                perceiver=im.PerceiverConfig(hidden_size=128, resampler_n_latents=64, resampler_depth=2,
                                             resampler_n_heads=4, resampler_head_dim=32, num_key_value_heads=2),
                text=im.TextConfig(vocab_size=32003, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32),
            )
        if name == "wide":
            return im.Idefics2Config(
                vision=im.VisionConfig(num_hidden_layers=2),
                perceiver=im.PerceiverConfig(),  # full: 4096 wide, 16/4 heads x 96, depth 3
                text=im.TextConfig(num_hidden_layers=2),
            )
        if name == "full":
            return im.Idefics2Config()
        raise KeyError(name)


MODELS = {
    "tiny": BenchModel("tiny", "text 128 wide x 4 layers, vision 64 wide x 2 layers, perceiver 2 layers, "
                       "vocab 32003, 64 latents", "float32", repeats=5, prefill_repeats=5),
    "wide": BenchModel("wide", "real 8B widths; 2 vision layers, full perceiver (3 layers), 2 text layers, "
                       "vocab 32003", "float32", repeats=3, prefill_repeats=2, prefill_warmup=("image",)),
    "tiny-bf16": BenchModel("tiny-bf16", "the tiny model's fp32 files loaded in bf16", "bfloat16", repeats=5,
                            prefill_repeats=5, base="tiny", impls=IMPLS[:4]),
    "wide-bf16": BenchModel("wide-bf16", "the wide model's fp32 files loaded in bf16 (real 8B widths; 2 vision, "
                            "3 perceiver, 2 text layers)", "bfloat16", repeats=3, prefill_repeats=2,
                            prefill_warmup=("image",), base="wide", impls=IMPLS[:4]),
    "full": BenchModel("full", "the real Idefics2-8B shape (27 vision, 3 perceiver, 32 text layers)", "bfloat16",
                       repeats=5, prefill_repeats=5, needs_cuda=True),
}

IMAGE_PROMPT = ("User:<image>Describe this picture in detail: the objects in it, their colours, the light, "
                "and any text you can read.<end_of_utterance>\nAssistant:")
TEXT_PROMPTS = [
    "User: Write a short story about a lighthouse keeper who finds a message in a bottle.<end_of_utterance>\nAssistant:",
    "User: What is the capital of France?<end_of_utterance>\nAssistant:",
    "User: Explain in simple words why the sky is blue during the day and red at sunset.<end_of_utterance>\nAssistant:",
    "User: List three fruits.<end_of_utterance>\nAssistant:",
    "User: Translate 'good morning, how are you today?' into German and Italian.<end_of_utterance>\nAssistant:",
    "User: How many legs does a spider have, and how many does an insect have?<end_of_utterance>\nAssistant:",
    "User: Give me a recipe idea with tomatoes, basil and some cheese.<end_of_utterance>\nAssistant:",
    "User: Hello!<end_of_utterance>\nAssistant:",
]
IMAGE_WIDTH, IMAGE_HEIGHT = 980, 653


def make_image():
    """A deterministic 980x653 RGB image with smooth gradients, stripes and a few shapes."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image, ImageDraw  # noqa: PLC0415

    y, x = np.mgrid[0:IMAGE_HEIGHT, 0:IMAGE_WIDTH].astype(np.float32)
    red = 255 * x / IMAGE_WIDTH
    green = 255 * y / IMAGE_HEIGHT
    blue = 127.5 + 127.5 * np.sin(x / 23.0) * np.cos(y / 17.0)
    image = Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((100, 80, 380, 360), fill=(240, 200, 30))
    draw.rectangle((520, 300, 900, 600), fill=(20, 60, 160))
    draw.text((540, 320), "idefics2_mini benchmark", fill=(255, 255, 255))
    return image


def make_inputs(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Process the prompts once and save the tensors both implementations will get."""
    from idefics2_mini.processor import Idefics2Processor  # noqa: PLC0415

    image = make_image()
    inputs = {
        "image": Idefics2Processor.from_pretrained(None, do_image_splitting=False)(text=IMAGE_PROMPT, images=[image]),
        "image_split": Idefics2Processor.from_pretrained(None, do_image_splitting=True)(
            text=IMAGE_PROMPT, images=[image]),
        "text_b1": Idefics2Processor.from_pretrained(None)(text=TEXT_PROMPTS[:1]),
        "text_b8": Idefics2Processor.from_pretrained(None)(text=TEXT_PROMPTS),
    }
    torch.save(inputs, path)
    return inputs


# ============================================================================ checkpoints


def checkpoint_path(weights_dir: Path, model: BenchModel) -> Path:
    return weights_dir / f"e2e-{model.base or model.name}"


def build_checkpoint(model: BenchModel, path: Path) -> None:
    """Random weights in the official layout, written once; a marker file holding the config
    says the build finished (a changed config is rebuilt). Built in a temporary folder and
    renamed, so an interrupted build never leaves a half-written checkpoint behind."""
    import idefics2_mini as im  # noqa: PLC0415

    config = model.config()
    marker = json.dumps(config.to_dict(), sort_keys=True)
    if (path / "BUILT").is_file() and (path / "BUILT").read_text() == marker:
        return
    dtype = getattr(torch, model.dtype)
    print(f"  building the {model.name} checkpoint in {path} ...", flush=True)
    start = time.perf_counter()
    with torch.device("meta"):
        network = im.Idefics2(config).to(dtype)
    network.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if param.dim() >= 2:
                table = any(key in name for key in ("embed_tokens", "position_embedding", "latents"))
                std = 1.0 if table else 1.0 / math.sqrt(param[0].numel())
                param.normal_(0.0, std, generator=generator)
            elif name.endswith("weight"):  # LayerNorm / RMSNorm scales
                param.fill_(1.0)
            else:  # biases
                param.zero_()
    staging = path.with_name(path.name + f".building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    im.save_checkpoint(network, staging, max_shard_bytes=2 * 2**30)
    del network
    (staging / "BUILT").write_text(marker)
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    print(f"  built in {time.perf_counter() - start:.0f} s", flush=True)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def warm_page_cache(path: Path) -> None:
    """Read every checkpoint file once so both implementations load from a warm page cache."""
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            while f.read(64 * 2**20):
                pass


def merge_rounds(rounds: list[dict]) -> dict:
    """One result per implementation from its measuring processes (rounds): every timing is the
    median over the processes' own medians, every process's runs are kept in "raw" (and its
    load time in "load_runs_s"), memory is the highest peak, noise the highest share."""
    merged = dict(rounds[0])
    median = lambda key, sub=None: statistics.median(  # noqa: E731
        r[key] if sub is None else r[key][sub] for r in rounds)
    for key in ("import_s", "prefill_s", "prefill_split_s"):
        if key in merged:
            merged[key] = median(key)
    for key in ("decode_b1", "decode_b8"):
        if key in merged:
            decode = dict(merged[key], **{sub: median(key, sub) for sub in ("step_s", "t1_s", "tn_s", "first_run_s")})
            decode["tokens_per_s"] = decode["batch"] / decode["step_s"]
            decode["rounds_tokens_per_s"] = [r[key]["tokens_per_s"] for r in rounds]
            merged[key] = decode
    for key in ("rss_after_load_mib", "peak_rss_mib", "cuda_peak_mib", "others_cpu"):
        if key in merged:
            merged[key] = max(r[key] for r in rounds)
    merged["load_runs_s"] = [r["load_s"] for r in rounds]
    merged["first_token_runs_s"] = [r["first_token_s"] for r in rounds]
    merged["raw"] = {}
    for index, r in enumerate(rounds):
        suffix = "" if len(rounds) == 1 else f" (round {index + 1})"
        merged["raw"].update({f"{key}{suffix}": values for key, values in r.get("raw", {}).items()})
    merged["rounds"] = len(rounds)
    return merged


def run_child(spec: dict) -> dict:
    """Start a fresh interpreter for `spec`; its progress goes to our stderr, its result to us.

    Also records how much CPU *other* processes used while it ran ("others_cpu": a fraction of
    all cores; the machine's busy time from /proc/stat minus the child's own CPU time), so a run
    disturbed by a neighbour is visible in the results rather than silently slower."""
    common.wait_for_quiet_machine(spec["max_wait_s"], log=lambda m: print(m, flush=True))
    busy_before, own_before = common.cpu_busy_seconds(), _children_cpu_seconds()
    # An empty Inductor cache per process: a compiled variant's first run then includes the
    # whole compile, as on a user's first run, not a previous process's cached kernels.
    inductor_cache = tempfile.mkdtemp(prefix="e2e-inductor-")
    start = time.perf_counter()
    try:
        process = subprocess.run(
            [sys.executable, "-m", "benchmarks.e2e_child", json.dumps(spec)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_cache},
        )
    finally:
        shutil.rmtree(inductor_cache, ignore_errors=True)
    wall = time.perf_counter() - start
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"the {spec['impl']} process for {spec['model']} failed (exit {process.returncode}); "
                           f"its error is printed above")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    busy_after = common.cpu_busy_seconds()
    if busy_before is not None and busy_after is not None:
        others = (busy_after - busy_before) - (_children_cpu_seconds() - own_before)
        result["others_cpu"] = max(0.0, others) / (wall * common.usable_cores())
    return result


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ============================================================================ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated subset of tiny,wide,full (default: tiny,wide, plus full on CUDA)")
    parser.add_argument("--impls", default=None,
                        help=f"comma-separated subset of {','.join(IMPLS)} (default: all; ours,reference with --quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement after a warm-up, and load processes "
                             "(default per model: tiny 5, wide 3)")
    parser.add_argument("--prefill-repeats", type=int, default=None,
                        help="timed prefill runs (default: --repeats if given, else per model: tiny 5, wide 2)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens per long decode run, >= 2 (default 33; 9 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: usable cores)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--note", default=None, help="free text recorded in the results (e.g. what changed)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<machine>)")
    parser.add_argument("--weights", default=str(ROOT / "weights" / "bench"), help="checkpoint cache folder")
    parser.add_argument("--max-wait", type=float, default=300,
                        help="before each measuring process, wait up to this many seconds for other processes to "
                             "leave the CPU idle (shared machines); 0 = never wait")
    parser.add_argument("--rounds", type=int, default=None,
                        help="measuring processes per (model, implementation), run round-robin; every figure is "
                             "the median over the rounds (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny only, 1 repeat, no waiting")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads or common.usable_cores()
    torch.set_num_threads(threads)
    if args.quick:
        args.models = args.models or "tiny"
        args.repeats = 1
        args.max_wait = 0
        args.new_tokens = args.new_tokens or 9
        args.impls = args.impls or "ours,reference"
        args.rounds = args.rounds or 1
    args.new_tokens = args.new_tokens or 33
    args.rounds = args.rounds or 2
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    args.prefill_repeats = args.prefill_repeats or args.repeats
    if args.repeats is not None and args.repeats < 1 or args.prefill_repeats is not None and args.prefill_repeats < 1:
        parser.error("--repeats and --prefill-repeats must be >= 1")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode is the difference of a long and a 1-token run)")
    names = args.models.split(",") if args.models else [n for n, m in MODELS.items()
                                                        if not m.needs_cuda or device.type == "cuda"]
    impls = args.impls.split(",") if args.impls else list(IMPLS)
    for name in names:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        if MODELS[name].needs_cuda and device.type != "cuda":
            parser.error(f"the {name} model needs a CUDA device (it does not fit a CPU run)")
    if any(impl not in IMPLS for impl in impls):
        parser.error(f"--impls takes a subset of {','.join(IMPLS)}")
    try:
        import transformers  # noqa: PLC0415

        args.transformers_version = transformers.__version__
    except ImportError:
        if "reference" in impls:
            parser.error("the reference needs transformers (pip install -e '.[test]'), or pass --impls ours")
        args.transformers_version = "not installed"

    info = common.machine_info(device, threads)
    out_dir = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / common.slug(info["device"])
    print(f"machine: {info['device']} — {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
          f"{threads} threads", flush=True)

    common.wait_for_quiet_machine(args.max_wait, log=lambda m: print(m, flush=True))
    bandwidth_gib = 0.25 if args.quick else 1.0
    read_gbs = common.measure_read_bandwidth(device, gib=bandwidth_gib)
    bandwidths = [read_gbs]
    datasheet = ""
    if device.type == "cuda":
        from benchmarks.gpu_peaks import lookup  # noqa: PLC0415

        peak = lookup(info["device"])
        if peak is not None:
            datasheet = f"; datasheet {peak.name}: {peak.bandwidth_gbs:.0f} GB/s"
    print(f"measured read bandwidth (torch.sum over {bandwidth_gib:g} GiB fp32): {read_gbs:.1f} GB/s{datasheet}", flush=True)

    weights_dir = Path(args.weights)
    weights_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="e2e-"))
    inputs_file = work / "inputs.pt"
    make_inputs(inputs_file)

    all_results: dict[str, dict[str, dict]] = {}
    notes: dict[str, list[str]] = {}
    started = time.perf_counter()
    try:
        for name in names:
            model = MODELS[name]
            config = model.config()
            path = checkpoint_path(weights_dir, model)
            print(f"[{name}] {model.description}", flush=True)
            build_checkpoint(MODELS.get(model.base, model), path)
            warm_page_cache(path)
            repeats = args.repeats or model.repeats
            spec = dict(model=name, checkpoint=str(path), device=str(device), dtype=model.dtype, threads=threads,
                        repeats=repeats, prefill_repeats=args.prefill_repeats or model.prefill_repeats,
                        prefill_warmup=[] if args.quick else list(model.prefill_warmup), new_tokens=args.new_tokens,
                        inputs=str(inputs_file), load_only=False, max_wait_s=args.max_wait)
            model_impls = [impl for impl in impls if model.impls is None or impl in model.impls]
            rounds: dict[str, list[dict]] = {impl: [] for impl in model_impls}
            for round_index in range(args.rounds):  # round-robin: a slow spell of the machine hits every impl
                for impl in model_impls:
                    print(f"  {impl}: measuring in a fresh process (round {round_index + 1}/{args.rounds}) ...",
                          flush=True)
                    rounds[impl].append(run_child({**spec, "impl": impl}))
            results = {impl: merge_rounds(measured) for impl, measured in rounds.items()}
            for impl in model_impls:
                results[impl]["new_tokens"] = args.new_tokens
            # More load timings, each in a fresh process, alternating; at least one, which also times
            # ours copying (mmap=False) without inflating a measuring process's peak memory.
            for _ in range(max(repeats - args.rounds, 1)):
                for impl in (impl for impl in model_impls if impl in ("ours", "reference")):
                    extra = run_child({**spec, "impl": impl, "load_only": True})
                    results[impl]["load_runs_s"].append(extra["load_s"])
                    results[impl]["first_token_runs_s"].append(extra["first_token_s"])
                    if "load_copy_s" in extra:
                        results[impl].setdefault("load_copy_runs_s", []).append(extra["load_copy_s"])
            all_results[name] = results
            if name != names[-1]:
                common.wait_for_quiet_machine(args.max_wait, log=lambda m: print(m, flush=True))
                bandwidths.append(common.measure_read_bandwidth(device, gib=bandwidth_gib))
            shown_path = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            notes[name] = [
                f"{model.description}; {model.dtype}; checkpoint {checkpoint_bytes(path) / 2**30:.2f} GiB (`{shown_path}`)",
                f"{args.rounds} measuring process(es) per implementation, run round-robin; each figure is the median "
                f"over them of each process's median of {spec['repeats']} timed runs for decode, "
                f"{spec['prefill_repeats']} for prefill (prefill warm-up: {', '.join(spec['prefill_warmup']) or 'none'}); "
                f"{args.rounds + max(repeats - args.rounds, 1)} fresh processes for load (compiled variants: "
                f"{args.rounds})",
                "decode tokens/s of each round (batch 1 | batch 8): " + "; ".join(
                    f"{impl} " + " | ".join(", ".join(fmt(v, "tokens/s") for v in results[impl][f"decode_{size}"]
                                                       ["rounds_tokens_per_s"]) for size in ("b1", "b8"))
                    for impl in results),
                "other processes' CPU use during the measuring processes (noise; 0% = quiet machine): "
                + ", ".join(f"{impl} {100 * results[impl].get('others_cpu', float('nan')):.0f}%" for impl in results),
            ]
            if "reference" in results:
                theirs = results["reference"]["tokens_b1"]
                for impl in (impl for impl in results if impl != "reference"):
                    mine = results[impl]["tokens_b1"]
                    same = sum(a == b for a, b in zip(mine, theirs))
                    first_diff = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
                    notes[name].append(f"greedy batch-1 outputs of {impl} and reference agree on {same}/{len(mine)} "
                                       "tokens" + ("" if first_diff is None else f" (first difference at token {first_diff})"))
            print_rows(build_rows(model, config, results, statistics.median(bandwidths)))
            print(f"  ({time.perf_counter() - started:.0f} s so far)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Measured again at the end: a neighbour that was busy at the start may have left; the higher
    # of the two is the machine's bandwidth (interference only ever lowers it).
    common.wait_for_quiet_machine(args.max_wait, log=lambda m: print(m, flush=True))
    bandwidths.append(common.measure_read_bandwidth(device, gib=bandwidth_gib))
    # One measurement can be far off on a shared VM (seen: 44 GB/s once among runs of 25-30):
    # the bandwidth used is the median of the measurements at the start, after each model and at the end.
    read_gbs = statistics.median(bandwidths)
    print(f"measured read bandwidth: {', '.join(f'{b:.1f}' for b in bandwidths)} GB/s; using the median "
          f"{read_gbs:.1f}", flush=True)
    bandwidth_note = (f"**{read_gbs:.1f} GB/s**, the median of {', '.join(f'{b:.1f}' for b in bandwidths)} measured "
                      f"at the start, after each model and at the end (each the median time of `torch.sum` over a "
                      f"{bandwidth_gib:g} GiB fp32 tensor, {threads} threads){datasheet}")
    rows = [row for name in all_results
            for row in build_rows(MODELS[name], MODELS[name].config(), all_results[name], read_gbs)]
    write_results(out_dir, info, args, bandwidth_note, notes, rows, all_results)
    print(f"wrote {out_dir}: e2e.md (+ .csv, .json{', .png' if (out_dir / 'e2e.png').exists() else ''}) "
          f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
