"""One measuring process of the end-to-end benchmark (benchmarks/e2e.py starts it, fresh for
every (model, implementation, round)): load one implementation and measure it.

    python -m benchmarks.e2e_child SPEC_JSON     # prints RESULT_PREFIX + a JSON object, last

What it measures is described in e2e.py's docstring; `child_main` is the whole of it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from benchmarks import common

RESULT_PREFIX = "E2E-RESULT "  # the child's last stdout line: this prefix + a JSON object


def _log(spec: dict, message: str) -> None:
    print(f"    [{spec['model']} / {spec['impl']}] {message}", file=sys.stderr, flush=True)


def child_main(spec: dict) -> dict:
    """Runs in a fresh process: load one implementation and measure it (see the module doc)."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    path = spec["checkpoint"]
    result: dict = {"rss_start_mib": common.peak_rss_mib()}

    compiled = spec["impl"].endswith("_compiled")
    quantized = spec["impl"].removeprefix("ours_") if spec["impl"] in ("ours_int8", "ours_int4") else None
    start = time.perf_counter()
    if spec["impl"].startswith("ours"):
        import idefics2_mini as im  # noqa: PLC0415

        result["import_s"] = time.perf_counter() - start

        def load():
            return im.Idefics2.from_pretrained(path, dtype=dtype, device=device, quantize=quantized)

        def generate(model, batch, new_tokens):
            return model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
    else:
        import transformers  # noqa: PLC0415
        from transformers import Idefics2ForConditionalGeneration  # noqa: PLC0415

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        result["import_s"] = time.perf_counter() - start
        compile_kwargs = {}
        if compiled:
            from transformers.generation.configuration_utils import CompileConfig  # noqa: PLC0415

            compile_config = CompileConfig(fullgraph=True)
            compile_config._compile_all_devices = True  # noqa: SLF001  (its switch for CPUs)
            compile_kwargs = dict(cache_implementation="static", compile_config=compile_config)

        def load():
            kwargs = {"device_map": str(device)} if device.type == "cuda" else {}
            return Idefics2ForConditionalGeneration.from_pretrained(path, dtype=dtype, **kwargs).eval()

        def generate(model, batch, new_tokens):
            with torch.inference_mode():
                return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=0, **compile_kwargs)

    common.synchronize(device)
    start = time.perf_counter()
    model = load()
    common.synchronize(device)
    result["load_s"] = time.perf_counter() - start
    result["rss_after_load_mib"] = common.peak_rss_mib()
    _log(spec, f"loaded in {result['load_s']:.2f} s (peak RSS {result['rss_after_load_mib']:.0f} MiB)")
    if spec["impl"] == "ours_compiled":
        im.compile_decode(model)  # compiles on the first decode step (timed below as "first run")

    inputs = torch.load(spec["inputs"])
    for batch in inputs.values():
        for key, value in batch.items():
            batch[key] = value.to(device)
            if key == "pixel_values":
                batch[key] = batch[key].to(dtype)
    # A loader may return early and pay later (transformers maps the safetensors files and reads the
    # weights on first use): the first 1-token answer right after loading shows what a user waits.
    result["first_token_s"] = result["load_s"] + common.time_once(
        lambda: generate(model, inputs["text_b1"], 1), device)
    _log(spec, f"load + first token (batch-1 text prompt): {result['first_token_s']:.2f} s")
    if spec["load_only"]:
        if spec["impl"] == "ours" and device.type == "cpu":
            # Ours maps the checkpoint by default (like the reference); also time the copying
            # load (what converting dtype or moving to a GPU costs). Only in these load-only
            # processes, so the second model never inflates a measured run's peak memory.
            del model
            start = time.perf_counter()
            im.Idefics2.from_pretrained(path, dtype=dtype, device=device, mmap=False)
            result["load_copy_s"] = time.perf_counter() - start
        return result
    repeats, new_tokens = spec["repeats"], spec["new_tokens"]

    def wait_for_quiet() -> None:  # before each group of timed runs; a neighbour may have started meanwhile
        common.wait_for_quiet_machine(spec["max_wait_s"] / 4, log=lambda message: _log(spec, message.strip()))

    prefills = {} if compiled or quantized else {"image": "prefill_s", "image_split": "prefill_split_s"}
    result["raw"] = {}
    wait_for_quiet()
    for key in spec["prefill_warmup"] if prefills else ():
        generate(model, inputs[key], 1)
    raw = {key: [] for key in prefills}
    for _ in range(spec["prefill_repeats"]):  # interleaved, so a slow spell of the machine hits both
        for key in prefills:
            raw[key].append(common.time_once(lambda: generate(model, inputs[key], 1), device))
    for key, name in prefills.items():
        batch = inputs[key]
        result[name] = statistics.median(raw[key])
        result[name.replace("_s", "_tokens")] = int(batch["input_ids"].shape[1])
        result["raw"][key] = raw[key]
        _log(spec, f"prefill {key}: {result[name]:.3f} s ({batch['input_ids'].shape[1]} tokens, "
                   f"{batch['pixel_values'].shape[1]} crop(s)); runs {', '.join(f'{t:.3g}' for t in raw[key])}")

    for key in ("text_b1", "text_b8"):
        batch = inputs[key]
        size, prompt_len = batch["input_ids"].shape
        wait_for_quiet()
        generate(model, batch, 1)  # warm-up
        outputs = []  # the first run is timed (it compiles, if it will) and its tokens kept
        first_run_s = common.time_once(lambda: outputs.append(generate(model, batch, new_tokens)), device)
        out = outputs[0]
        short, long = [], []
        for _ in range(repeats):  # interleaved, so a slow spell of the machine hits both
            short.append(common.time_once(lambda: generate(model, batch, 1), device))
            long.append(common.time_once(lambda: generate(model, batch, new_tokens), device))
        step_s = (statistics.median(long) - statistics.median(short)) / (new_tokens - 1)
        result[f"decode_{key[-2:]}"] = dict(
            batch=size, prompt_tokens=prompt_len, step_s=step_s, tokens_per_s=size / step_s,
            t1_s=statistics.median(short), tn_s=statistics.median(long), first_run_s=first_run_s,
        )
        result["raw"][f"{key}_t1"], result["raw"][f"{key}_t{new_tokens}"] = short, long
        if key == "text_b1":
            result["tokens_b1"] = out[0, prompt_len:].tolist()
        _log(spec, f"decode batch {size}: {size / step_s:.1f} tokens/s ({1e3 * step_s:.1f} ms/step); runs "
                   f"t(1) {', '.join(f'{t:.3g}' for t in short)}; t({new_tokens}) {', '.join(f'{t:.3g}' for t in long)}")

    result["peak_rss_mib"] = common.peak_rss_mib()
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(child_main(json.loads(sys.argv[1]))), flush=True)
