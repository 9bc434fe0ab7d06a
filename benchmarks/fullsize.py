"""The real Idefics2-8B size on a CPU machine: an fp32 checkpoint in the official sharded layout,
loaded in bf16 (the dtype in which it fits 24 GB), against the reference doing the same.

    python -m benchmarks.fullsize                 # write (once) ~34 GB, measure, delete it at the end
    python -m benchmarks.fullsize --keep          # ... and keep the checkpoint for the next run
    python -m benchmarks.fullsize --delete        # only delete a kept checkpoint
    python -m benchmarks.fullsize --smoke --out DIR   # the same steps on a tiny model (the tests)

1. Writes a random checkpoint with the real 8B dimensions (32 decoder layers, 27 vision layers,
   the 3-layer perceiver, vocab 32003), fp32, sharded like the official download (shards of at
   most 5 GB, model.safetensors.index.json), under weights/bench/fullsize-8b/. Each tensor is
   drawn and written on its own, straight into its shard file: memory stays at one tensor
   (the largest, the embedding table: 0.5 GB), never a shard or the model.
2. Dry estimate for the reference, before it is ever given the full size: the reference loads a
   probe checkpoint with the same widths and a few layers in bf16, in a child process whose
   anonymous and file-backed resident memory are sampled; scaled to the full model, that says
   whether its load fits the memory available now (file-backed pages are the mapped fp32 files:
   reclaimable page cache, not memory it must own).
3. Each implementation in its own fresh process (ours, then the reference): `from_pretrained(
   dtype=bfloat16)` (load time; peak resident memory, VmHWM, and the sampled peaks of anonymous
   and file-backed memory, against the bf16 model's own bytes), then prefill of one 980x653 image
   without and with image splitting (1 / 5 crops; generate 1 token), then decode tokens/s at
   batch 1 and 4 ((t(n new) - t(1 new)) / (n - 1), greedy, stopping off). Before each process
   it waits (up to --max-wait) until the machine has --need-gib available and no other process
   holds more than 2 GiB; while it runs, a watchdog kills it if MemAvailable falls below
   --min-free-gib, so the machine never swaps or OOM-kills a neighbour (a killed run is recorded).
4. Writes benchmarks/results/<machine>/fullsize.md and .json; deletes the checkpoints (unless
   --keep).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "FULLSIZE-RESULT "
SHARD_BYTES = 5 * 10**9  # the official download's shards: at most "5GB"
GIB = 2**30


# ============================================================================ the checkpoint


def full_config():
    import idefics2_mini as im  # noqa: PLC0415

    return im.Idefics2Config()  # the real Idefics2-8B shape


def probe_config():
    """The real widths with few layers: what the dry estimate loads (~2.9 GB of fp32)."""
    import idefics2_mini as im  # noqa: PLC0415

    return im.Idefics2Config(vision=im.VisionConfig(num_hidden_layers=1), perceiver=im.PerceiverConfig(resampler_depth=1),
                             text=im.TextConfig(num_hidden_layers=2))


def smoke_config():
    from benchmarks.e2e import MODELS  # noqa: PLC0415

    return MODELS["tiny"].config()


def planned_tensors(config) -> list[tuple[str, list[int], float]]:
    """(official name, shape, std) of every tensor of the checkpoint, in the model's order; std 0
    for biases (zeros), -1 for norm weights (ones)."""
    import idefics2_mini as im  # noqa: PLC0415
    from idefics2_mini.loading import ours_to_official  # noqa: PLC0415

    with torch.device("meta"):
        model = im.Idefics2(config)
    planned = []
    for name, param in model.named_parameters():  # a tied parameter is listed once
        if param.dim() >= 2:
            table = any(key in name for key in ("embed_tokens", "position_embedding", "latents"))
            std = 1.0 if table else 1.0 / math.sqrt(param[0].numel())
        else:
            std = -1.0 if name.endswith("weight") else 0.0
        planned.append((ours_to_official(name), list(param.shape), std))
    return planned


def write_random_checkpoint(path: Path, config, shard_bytes: int = SHARD_BYTES, seed: int = 0, log=print) -> None:
    """Random fp32 weights in the official sharded layout, written tensor by tensor (see the
    module docstring); built in a staging folder and renamed, with a BUILT marker holding the
    config, so an interrupted build is never taken for a checkpoint."""
    from safetensors import safe_open  # noqa: PLC0415

    marker = json.dumps(config.to_dict(), sort_keys=True)
    if (path / "BUILT").is_file() and (path / "BUILT").read_text() == marker:
        log(f"  checkpoint {path} already built")
        return
    planned = planned_tensors(config)
    total_bytes = sum(4 * math.prod(shape) for _, shape, _ in planned)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < total_bytes + 2 * 10**9:
        raise SystemExit(f"not enough disk for the checkpoint: it needs {total_bytes / 1e9:.1f} GB (+2 GB to spare) "
                         f"and {path.parent} has {free / 1e9:.1f} GB free")
    shards: list[list[tuple[str, list[int], float]]] = [[]]
    size = 0
    for entry in planned:
        nbytes = 4 * math.prod(entry[1])
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    staging = path.with_name(path.name + f".building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config.save(staging)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total, start = {}, 0, time.perf_counter()
    for index, shard in enumerate(shards, start=1):
        shard_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape, _ in shard:
            nbytes = 4 * math.prod(shape)
            header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
        with open(staging / shard_name, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            for name, shape, std in shard:
                tensor = torch.empty(shape, dtype=torch.float32)
                if std > 0:
                    tensor.normal_(0.0, std, generator=generator)
                else:
                    tensor.fill_(1.0 if std < 0 else 0.0)
                handle.write(tensor.numpy().data)  # the tensor's own memory: no second copy
                weight_map[name] = shard_name
                del tensor
            handle.flush()
            os.fsync(handle.fileno())
            # Leave the page cache to the loads being measured, not to this writer.
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        total += offset
        log(f"  wrote {shard_name} ({offset / 1e9:.2f} GB; {total / 1e9:.1f} GB in "
            f"{time.perf_counter() - start:.0f} s)")
    index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2) + "\n")
    for shard_name in sorted(set(weight_map.values())):  # the format is right: safetensors itself reads it
        with safe_open(str(staging / shard_name), framework="pt") as opened:
            assert len(opened.keys()) == sum(file == shard_name for file in weight_map.values())
    (staging / "BUILT").write_text(marker)
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ============================================================================ memory


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values


def largest_other_processes(exclude: set[int], count: int = 3) -> list[tuple[int, int, str]]:
    """(rss bytes, pid, command) of the largest other processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            status = (entry / "status").read_text()
            rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:100]
        except (OSError, ValueError):
            continue
        found.append((rss, int(entry.name), command))
    return sorted(found, reverse=True)[:count]


def wait_for_memory(need: int, max_wait_s: float, others_max: int = 2 * GIB, poll_s: float = 30, log=print) -> str | None:
    """Wait until MemAvailable >= need and no other process holds more than `others_max`
    resident. None when that happened; else why not (after max_wait_s)."""
    deadline = time.monotonic() + max_wait_s
    own = {os.getpid()}
    while True:
        available = meminfo()["MemAvailable"]
        big = [p for p in largest_other_processes(own) if p[0] > others_max]
        if available >= need and not big:
            return None
        reason = (f"MemAvailable {available / GIB:.1f} GiB (need {need / GIB:.1f})"
                  + "".join(f"; pid {pid} holds {rss / GIB:.1f} GiB ({command.strip()})" for rss, pid, command in big))
        if time.monotonic() >= deadline:
            return reason
        log(f"  waiting for memory: {reason}")
        time.sleep(poll_s)


# ============================================================================ one measuring process


class MemorySampler:
    """Samples this process's VmRSS, RssAnon and RssFile every 10 ms; keeps the peaks."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self):
        self.peaks = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in MemorySampler.FIELDS or key == "VmHWM":
                    values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self):
        while not self._stop.is_set():
            for key, value in self.now().items():
                if key in self.peaks:
                    self.peaks[key] = max(self.peaks[key], value)
            self._stop.wait(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child_main(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    result: dict = {"base": MemorySampler.now()}
    if spec["impl"] == "ours":
        import idefics2_mini as im  # noqa: PLC0415

        def load():
            return im.Idefics2.from_pretrained(spec["checkpoint"], dtype=dtype)

        def generate(model, batch, new_tokens):
            return model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
    else:
        import transformers  # noqa: PLC0415
        from transformers import Idefics2ForConditionalGeneration  # noqa: PLC0415

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()

        def load():
            return Idefics2ForConditionalGeneration.from_pretrained(spec["checkpoint"], dtype=dtype).eval()

        def generate(model, batch, new_tokens):
            with torch.inference_mode():
                return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=0)
    result["base"] = MemorySampler.now()  # after the imports: what the process holds before loading
    with MemorySampler() as sampler:
        start = time.perf_counter()
        model = load()
        result["load_s"] = time.perf_counter() - start
    result["load_peaks"] = sampler.peaks
    result["after_load"] = MemorySampler.now()
    result["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    _log(spec, f"loaded in {result['load_s']:.1f} s; VmHWM {result['after_load']['VmHWM'] / GIB:.2f} GiB, model "
               f"{result['model_bytes'] / GIB:.2f} GiB, peaks {', '.join(f'{k} {v / GIB:.2f}' for k, v in sampler.peaks.items())} GiB")
    if spec["load_only"]:
        return result

    inputs = torch.load(spec["inputs"])
    for batch in inputs.values():
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
    with MemorySampler() as sampler:
        result["raw"] = {}
        generate(model, inputs["image"], 1)  # warm-up
        for key in ("image", "image_split"):
            runs = [common.time_once(lambda: generate(model, inputs[key], 1), torch.device("cpu"))
                    for _ in range(spec["prefill_repeats"])]
            result[f"prefill_{key}_s"] = statistics.median(runs)
            result[f"prefill_{key}_tokens"] = int(inputs[key]["input_ids"].shape[1])
            result["raw"][f"prefill_{key}"] = runs
            _log(spec, f"prefill {key}: {', '.join(f'{t:.2f}' for t in runs)} s")
        new_tokens = spec["new_tokens"]
        for key in ("text_b1", "text_b4"):
            batch = inputs[key]
            size, prompt = batch["input_ids"].shape
            generate(model, batch, 2)  # warm-up
            short, long, tokens = [], [], None
            for _ in range(spec["repeats"]):
                short.append(common.time_once(lambda: generate(model, batch, 1), torch.device("cpu")))
                start = time.perf_counter()
                tokens = generate(model, batch, new_tokens)
                long.append(time.perf_counter() - start)
            step = (statistics.median(long) - statistics.median(short)) / (new_tokens - 1)
            result[f"decode_{key[-2:]}"] = dict(batch=size, prompt_tokens=prompt, step_s=step, tokens_per_s=size / step)
            result["raw"][f"{key}_t1"], result["raw"][f"{key}_t{new_tokens}"] = short, long
            result[f"tokens_{key[-2:]}"] = tokens[:, prompt:].tolist()
            _log(spec, f"decode batch {size}: {size / step:.2f} tokens/s ({step:.2f} s/step)")
    result["run_peaks"] = sampler.peaks
    result["end"] = MemorySampler.now()
    return result


def _log(spec: dict, message: str) -> None:
    print(f"    [{spec['impl']}] {message}", file=sys.stderr, flush=True)


# ============================================================================ the driver


def run_child(spec: dict, min_free: int, log=print) -> dict:
    """Run child_main(spec) in a fresh process under the memory watchdog."""
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.fullsize", "--child", json.dumps(spec)],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    lowest, killed = [meminfo()["MemAvailable"]], []

    def watch():
        while process.poll() is None:
            available = meminfo()["MemAvailable"]
            lowest[0] = min(lowest[0], available)
            if available < min_free:
                killed.append(f"killed by the watchdog: MemAvailable fell to {available / GIB:.2f} GiB "
                              f"(limit {min_free / GIB:.2f})")
                os.killpg(process.pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, _ = process.communicate()
    watcher.join()
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if killed or process.returncode != 0 or not lines:
        reason = killed[0] if killed else f"the process failed (exit {process.returncode}; its error is above)"
        log(f"  {spec['impl']}: {reason}")
        return {"failed": reason, "lowest_available": lowest[0]}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["lowest_available"] = lowest[0]
    return result


def make_inputs(path: Path) -> None:
    from benchmarks.e2e import TEXT_PROMPTS, make_inputs as e2e_inputs  # noqa: PLC0415
    from idefics2_mini.processor import Idefics2Processor  # noqa: PLC0415

    inputs = e2e_inputs(path)
    inputs["text_b4"] = Idefics2Processor.from_pretrained(None)(text=TEXT_PROMPTS[:4])
    del inputs["text_b8"]
    torch.save(inputs, path)


def dry_estimate(probe: dict, model_bytes_full: int, checkpoint_full: int, probe_checkpoint: int) -> dict:
    """Scale the reference's probe load to the full model: anonymous memory above its baseline
    per byte of bf16 model, file-backed memory per byte of checkpoint."""
    base = probe["base"]
    anon = (probe["load_peaks"]["RssAnon"] - base["RssAnon"]) / probe["model_bytes"]
    file = (probe["load_peaks"]["RssFile"] - base["RssFile"]) / probe_checkpoint
    return {"anon_per_model_byte": anon, "file_per_checkpoint_byte": file,
            "anon_bytes": base["RssAnon"] + anon * model_bytes_full, "file_bytes": file * checkpoint_full}


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    parser.add_argument("--delete", action="store_true", help="only delete the checkpoints and exit")
    parser.add_argument("--impls", default="ours,reference")
    parser.add_argument("--weights", default=str(ROOT / "weights" / "bench"))
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<machine>)")
    parser.add_argument("--new-tokens", type=int, default=9, help="tokens per long decode run (default 9)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each decode and prefill")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--need-gib", type=float, default=20.0,
                        help="MemAvailable to wait for before each full-size process (default 20)")
    parser.add_argument("--min-free-gib", type=float, default=1.0,
                        help="the watchdog kills a measuring process when MemAvailable falls below this")
    parser.add_argument("--max-wait", type=float, default=1200, help="seconds to wait for memory (default 1200)")
    parser.add_argument("--note", default=None, help="free text recorded in the results")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, no waiting: the tests' run")
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_PREFIX + json.dumps(child_main(json.loads(args.child))), flush=True)
        return

    weights = Path(args.weights)
    name = "fullsize-smoke" if args.smoke else "fullsize-8b"
    path, probe_path = weights / name, weights / f"{name}-probe"
    if args.delete:
        for folder in (path, probe_path):
            shutil.rmtree(folder, ignore_errors=True)
        print(f"deleted {path} and {probe_path}")
        return
    impls = args.impls.split(",")
    threads = args.threads or common.usable_cores()
    info = common.machine_info(torch.device("cpu"), threads)
    out_dir = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / common.slug(info["cpu"])
    need, min_free = int(args.need_gib * GIB), int(args.min_free_gib * GIB)
    max_wait = 0 if args.smoke else args.max_wait
    if args.smoke:
        need, min_free = 0, 0
    config = smoke_config() if args.smoke else full_config()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; {threads} threads", flush=True)

    work = Path(tempfile.mkdtemp(prefix="fullsize-"))
    results: dict = {"impls": {}, "notes": []}
    started = time.perf_counter()
    try:
        inputs = work / "inputs.pt"
        make_inputs(inputs)
        from idefics2_mini.loading import parameter_count  # noqa: PLC0415
        import idefics2_mini as im  # noqa: PLC0415

        with torch.device("meta"):
            parameters = parameter_count(im.Idefics2(config))
        results["parameters"] = parameters
        results["bf16_model_bytes"] = 2 * parameters
        spec = dict(checkpoint=str(path), dtype="bfloat16", threads=threads, inputs=str(inputs), load_only=False,
                    new_tokens=args.new_tokens if not args.smoke else 3, repeats=args.repeats if not args.smoke else 1,
                    prefill_repeats=args.repeats if not args.smoke else 1)

        if "reference" in impls:
            # The dry estimate, on a probe with the same widths and a few layers (written, loaded and
            # deleted before the full checkpoint is written: the disk holds one of them at a time).
            probe_config_ = smoke_config() if args.smoke else probe_config()
            write_random_checkpoint(probe_path, probe_config_)
            probe = run_child({**spec, "impl": "reference", "checkpoint": str(probe_path), "load_only": True}, min_free)
            if "failed" not in probe:
                estimate = dry_estimate(probe, results["bf16_model_bytes"], 4 * parameters,
                                        checkpoint_bytes(probe_path))
                results["reference_estimate"] = estimate
                print(f"  reference, dry estimate at full size: anonymous {gib(estimate['anon_bytes'])} "
                      f"({estimate['anon_per_model_byte']:.2f} x the bf16 model above its baseline), file-backed "
                      f"{gib(estimate['file_bytes'])} ({estimate['file_per_checkpoint_byte']:.2f} x the fp32 files)",
                      flush=True)
            shutil.rmtree(probe_path, ignore_errors=True)

        start = time.perf_counter()
        write_random_checkpoint(path, config, shard_bytes=SHARD_BYTES if not args.smoke else 2 * 2**20)
        results["checkpoint_bytes"] = checkpoint_bytes(path)
        results["checkpoint_shards"] = len(list(path.glob("*.safetensors")))
        results["write_s"] = time.perf_counter() - start
        for impl in impls:
            reason = wait_for_memory(need, max_wait, others_max=2 * GIB if not args.smoke else 2**62,
                                     log=lambda m: print(m, flush=True))
            if reason is None and impl == "reference" and "reference_estimate" in results and not args.smoke:
                available = meminfo()["MemAvailable"]
                wanted = results["reference_estimate"]["anon_bytes"] + 1.5 * GIB
                if wanted > available:
                    reason = (f"not started: the dry estimate of its anonymous memory ({gib(wanted)} with a 1.5 GiB "
                              f"margin) exceeds MemAvailable ({gib(available)})")
            if reason is not None:
                results["impls"][impl] = {"failed": f"not run: {reason}"}
                print(f"  {impl}: not run: {reason}", flush=True)
                continue
            print(f"  {impl}: measuring in a fresh process ...", flush=True)
            results["impls"][impl] = run_child({**spec, "impl": impl}, min_free)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(probe_path, ignore_errors=True)
            print(f"deleted {path} (pass --keep to keep it)", flush=True)
    results["seconds"] = time.perf_counter() - started
    write_results(out_dir, info, args, results, config)


def write_results(out_dir: Path, info: dict, args, results: dict, config) -> None:
    from benchmarks.e2e_report import code_version  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    model_bytes = results["bf16_model_bytes"]
    impls = results["impls"]
    command = "python -m benchmarks.fullsize" + "".join(f" {a}" for a in sys.argv[1:])
    lines = [
        f"# Full-size Idefics2-8B in bf16 on the CPU — {info['cpu']}", "",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; torch {info['torch']}, "
        f"{info['threads']} threads, {info['date']}",
        f"- run: `{command}`; code: {code_version()}" + (f"; note: {args.note}" if args.note else ""),
        f"- checkpoint: random weights, {'the smoke test' + chr(39) + 's tiny model' if args.smoke else 'real 8B dimensions'} "
        f"({config.text.num_hidden_layers} decoder layers, "
        f"{config.vision.num_hidden_layers} vision layers, perceiver depth {config.perceiver.resampler_depth}; "
        f"{results['parameters'] / 1e9:.2f} B parameters), fp32 in the official sharded layout: "
        f"{results['checkpoint_bytes'] / 1e9:.1f} GB in {results['checkpoint_shards']} shards, written tensor by tensor "
        f"in {results['write_s']:.0f} s; loaded as bf16 ({model_bytes / 1e9:.1f} GB = {gib(model_bytes)} of parameters)",
        "- each implementation in its own fresh process, one after the other (the machine is shared: other "
        "engineers' tests may have run meanwhile); the page cache holds what the machine's memory leaves of "
        "the 34 GB (the files do not fit it)",
        "- peak RSS = VmHWM of the process (includes its imports: `base`); anonymous / file-backed = the "
        "sampled peaks of RssAnon / RssFile (file-backed = pages of the mapped checkpoint files, reclaimable)",
        f"- prefill = generate 1 token for the image prompt (median of {args.repeats} after a warm-up); decode = "
        f"(t({args.new_tokens}) - t(1)) / {args.new_tokens - 1}, greedy, stopping off, median of {args.repeats}",
        "",
    ]
    estimate = results.get("reference_estimate")
    if estimate:
        lines += [f"- dry estimate for the reference (a probe with the real widths, 2 decoder layers, loaded the same "
                  f"way, scaled): anonymous memory {gib(estimate['anon_bytes'])} "
                  f"({estimate['anon_per_model_byte']:.2f} bytes per byte of bf16 model above its baseline), file-backed "
                  f"{gib(estimate['file_bytes'])} ({estimate['file_per_checkpoint_byte']:.2f} x the fp32 files: it maps "
                  "and reads them whole)", ""]

    def value(impl, getter):
        result = impls.get(impl)
        if not result or "failed" in result:
            return None
        try:
            return getter(result)
        except (KeyError, TypeError):
            return None

    rows = [
        ("load (from_pretrained, fp32 files -> bf16)", "s", lambda r: r["load_s"], "{:.1f}"),
        ("peak RSS during load (VmHWM)", "GiB", lambda r: r["after_load"]["VmHWM"] / GIB, "{:.2f}"),
        ("  ... as a multiple of the bf16 model", "x", lambda r: r["after_load"]["VmHWM"] / model_bytes, "{:.3f}"),
        ("  ... above the process's baseline, as a multiple", "x",
         lambda r: (r["after_load"]["VmHWM"] - r["base"]["VmRSS"]) / model_bytes, "{:.3f}"),
        ("peak anonymous memory during load", "GiB", lambda r: r["load_peaks"]["RssAnon"] / GIB, "{:.2f}"),
        ("peak file-backed memory during load", "GiB", lambda r: r["load_peaks"]["RssFile"] / GIB, "{:.2f}"),
        (f"prefill, 980x653 image, no split ({_tokens(impls, 'image')} tokens)", "s",
         lambda r: r["prefill_image_s"], "{:.1f}"),
        (f"prefill, same image split into 5 crops ({_tokens(impls, 'image_split')} tokens)", "s",
         lambda r: r["prefill_image_split_s"], "{:.1f}"),
        ("decode batch 1", "tokens/s", lambda r: r["decode_b1"]["tokens_per_s"], "{:.3f}"),
        ("decode batch 4", "tokens/s", lambda r: r["decode_b4"]["tokens_per_s"], "{:.3f}"),
        ("decode batch 1 as read bandwidth (bf16 weights per token)", "GB/s",
         lambda r: _decode_bytes(config, 1) / r["decode_b1"]["step_s"] / 1e9, "{:.1f}"),
        ("peak RSS of the whole run (VmHWM)", "GiB", lambda r: r["end"]["VmHWM"] / GIB, "{:.2f}"),
        ("peak anonymous memory of the whole run", "GiB",
         lambda r: max(r["run_peaks"]["RssAnon"], r["load_peaks"]["RssAnon"]) / GIB, "{:.2f}"),
        ("lowest MemAvailable of the machine while it ran", "GiB", lambda r: r["lowest_available"] / GIB, "{:.2f}"),
    ]
    lines += ["| metric | unit | ours | reference | ours/ref |", "|---|---|---:|---:|---:|"]
    for label, unit, getter, form in rows:
        mine, theirs = value("ours", getter), value("reference", getter)
        ratio = "-" if mine is None or theirs in (None, 0) or unit == "x" else f"{mine / theirs:.3g}"
        shown = lambda v: "-" if v is None else form.format(v)  # noqa: E731
        lines.append(f"| {label} | {unit} | {shown(mine)} | {shown(theirs)} | {ratio} |")
    lines.append("")
    for impl, result in impls.items():
        if "failed" in result:
            lines.append(f"- {impl}: {result['failed']}")
    ours_tokens, ref_tokens = value("ours", lambda r: r["tokens_b1"][0]), value("reference", lambda r: r["tokens_b1"][0])
    if ours_tokens and ref_tokens:
        same = sum(a == b for a, b in zip(ours_tokens, ref_tokens))
        lines.append(f"- greedy batch-1 tokens, ours and the reference (random weights): {same}/{len(ours_tokens)} equal "
                     f"(ours {ours_tokens}, reference {ref_tokens})")
    lines += ["", "Raw timings (s): " + "; ".join(
        f"{impl} {key} " + ", ".join(f"{t:.3g}" for t in runs)
        for impl, result in impls.items() for key, runs in result.get("raw", {}).items()), ""]
    (out_dir / "fullsize.md").write_text("\n".join(lines))
    (out_dir / "fullsize.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {out_dir / 'fullsize.md'} (+ .json) in {results['seconds']:.0f} s")


def _tokens(impls: dict, key: str) -> str:
    for result in impls.values():
        if f"prefill_{key}_tokens" in result:
            return str(result[f"prefill_{key}_tokens"])
    return "?"


def _decode_bytes(config, batch: int) -> float:
    from benchmarks.e2e_report import decode_bytes_per_step  # noqa: PLC0415

    return decode_bytes_per_step(config, batch, 0, 2)


if __name__ == "__main__":
    main()
