"""The end-to-end benchmark's report: rows of (metric, ours, reference, ratio, target) from the
measured results, written as benchmarks/results/<machine>/e2e.md (+ .csv, .json, .png).

    python -m benchmarks.e2e_report --plot benchmarks/results/<machine>   # e2e.png again, from e2e.csv

Decode is also reported as achieved memory bandwidth: the bytes a decode step must read (every
decoder weight, the final norm and the full lm_head; the embedding table only for the B gathered
rows; plus the K and V cache up to the average context length of the measured steps) times
steps/s, against the machine's read bandwidth measured by the driver.

The targets of issue 7 are checked in the table ("met"): on CPU, fp32, both in one run: decode
tokens/s tiny >= 4x and wide >= 1.25x the reference (batch 1 and 8), wide decode at batch 1 >=
80% of the measured read bandwidth (batch 8 is compute-bound on a few cores, so it is shown
without a target), prefill wide <= 1.0x the reference's time, load <= 0.5x, peak memory <= the
reference's; on a GPU the full 8B in bf16 at batch 1 decodes >= 2x the reference. Issue 18's,
for the wide model's fp32 files loaded in bf16 against the reference doing the same
("wide-bf16"): decode >= 1.25x (batch 1 and 8), >= 85% of the measured read bandwidth at batch
1, prefill <= 1.0x the reference's time, peak memory <= the reference's.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from benchmarks.e2e import BenchModel

ROOT = Path(__file__).resolve().parents[1]


def decode_bytes_per_step(config, batch: int, context: float, element_bytes: int) -> float:
    """Bytes one decode step must read: every decoder weight (attention, MLP, both norms per layer),
    the final norm, the whole lm_head, the B gathered embedding rows, and the K and V cache of
    `context` tokens per row (capped at the sliding window)."""
    text = config.text
    width, q_width, kv_width = text.hidden_size, text.num_attention_heads * text.head_dim, \
        text.num_key_value_heads * text.head_dim
    per_layer = (width * q_width + 2 * width * kv_width + q_width * width  # q, k, v, o
                 + 3 * width * text.intermediate_size + 2 * width)  # gate, up, down; 2 RMSNorms
    weights = text.num_hidden_layers * per_layer + width + text.vocab_size * width + batch * width
    if text.sliding_window is not None:
        context = min(context, text.sliding_window)
    kv = text.num_hidden_layers * 2 * batch * kv_width * context
    return (weights + kv) * element_bytes


@dataclass
class Row:
    model: str
    metric: str
    unit: str
    ours: float | None
    reference: float | None
    better: str  # "lower" | "higher"
    target: str = ""  # e.g. "ours/ref >= 4"
    target_ratio: float | None = None
    target_on: str = "ratio"  # "ratio" (ours/reference) or "ours" (the value itself)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.reference is None or self.reference == 0:
            return None
        return self.ours / self.reference

    @property
    def met(self) -> str:
        if self.target_ratio is None:
            return ""
        value = self.ratio if self.target_on == "ratio" else self.ours
        if value is None:
            return "?"
        ok = value >= self.target_ratio if self.better == "higher" else value <= self.target_ratio
        return "yes" if ok else "NO"


def build_rows(model: BenchModel, config, results: dict[str, dict], read_gbs: float) -> list[Row]:
    ours, ref = results.get("ours"), results.get("reference")

    def get(result, key, sub=None):
        if result is None or key not in result:
            return None
        return result[key] if sub is None else result[key][sub]

    def median_load(result, key="load_runs_s"):
        return None if result is None or key not in result else statistics.median(result[key])

    cpu_targets = model.name in ("tiny", "wide")
    decode_target = {"tiny": 4.0, "wide": 1.25, "wide-bf16": 1.25, "full": 2.0}.get(model.name)
    rows = [
        Row(model.name, "load (from_pretrained)", "s", median_load(ours), median_load(ref), "lower",
            "ours/ref <= 0.5" if cpu_targets else "", 0.5 if cpu_targets else None),
        Row(model.name, "load + first token (text prompt, fresh process)", "s", median_load(ours, "first_token_runs_s"),
            median_load(ref, "first_token_runs_s"), "lower"),
        Row(model.name, "load, ours copying (mmap=False) vs reference", "s", median_load(ours, "load_copy_runs_s"),
            median_load(ref), "lower"),
        Row(model.name, "import of the package", "s", get(ours, "import_s"), get(ref, "import_s"), "lower"),
    ]
    image = results.get("ours") or results.get("reference")
    for key, label in (("prefill_s", "no split"), ("prefill_split_s", "split, 5 crops")):
        tokens = get(image, key.replace("_s", "_tokens"))
        wide = model.name in ("wide", "wide-bf16")
        rows.append(Row(model.name, f"prefill 980x653 image, {label} ({tokens} tokens)", "s", get(ours, key),
                        get(ref, key), "lower", "ours/ref <= 1.0" if wide else "", 1.0 if wide else None))
    for size in ("b1", "b8"):
        batch = get(image, f"decode_{size}", "batch")
        applies = decode_target is not None and (size == "b1" or model.name != "full")
        rows.append(Row(model.name, f"decode batch {batch}", "tokens/s", get(ours, f"decode_{size}", "tokens_per_s"),
                        get(ref, f"decode_{size}", "tokens_per_s"), "higher",
                        f"ours/ref >= {decode_target:g}" if applies else "", decode_target if applies else None))
    rows += compiled_decode_rows(model, results, decode_target)
    rows += quantized_rows(model, config, results, read_gbs)
    element = torch.finfo(getattr(torch, model.dtype)).bits // 8
    for size in ("b1", "b8"):
        if image is None:
            continue
        decode = image[f"decode_{size}"]
        context = decode["prompt_tokens"] + decode_target_steps(image) / 2
        step_bytes = decode_bytes_per_step(config, decode["batch"], context, element)

        def gbs(result):
            step = get(result, f"decode_{size}", "step_s")
            return None if step is None else step_bytes / step / 1e9

        applies = model.name in ("wide", "wide-bf16") and size == "b1"
        share = 0.85 if model.name == "wide-bf16" else 0.8  # issue 18's target for bf16, issue 7's for fp32
        rows.append(Row(model.name, f"decode batch {decode['batch']} as read bandwidth "
                                    f"({step_bytes / 1e9:.3g} GB/step)", "GB/s", gbs(ours), gbs(ref), "higher"))
        fraction = lambda result: None if gbs(result) is None else gbs(result) / read_gbs  # noqa: E731
        rows.append(Row(model.name, f"decode batch {decode['batch']}: share of measured read bandwidth",
                        "fraction", fraction(ours), fraction(ref), "higher",
                        f"ours >= {share:.2f}" if applies else "", share if applies else None, target_on="ours"))
    rows.append(Row(model.name, "peak RSS after load", "MiB", get(ours, "rss_after_load_mib"),
                    get(ref, "rss_after_load_mib"), "lower"))
    rows.append(Row(model.name, "peak RSS of the whole run", "MiB", get(ours, "peak_rss_mib"), get(ref, "peak_rss_mib"),
                    "lower", "ours/ref <= 1.0" if cpu_targets or model.name == "wide-bf16" else "",
                    1.0 if cpu_targets or model.name == "wide-bf16" else None))
    if get(ours, "cuda_peak_mib") or get(ref, "cuda_peak_mib"):
        rows.append(Row(model.name, "peak CUDA memory allocated", "MiB", get(ours, "cuda_peak_mib"),
                        get(ref, "cuda_peak_mib"), "lower"))
    return rows


def compiled_decode_rows(model: BenchModel, results: dict[str, dict], decode_target: float | None) -> list[Row]:
    """Rows for the compiled variants: both compiled side by side, each implementation at its best
    (eager or compiled, whichever decodes faster here; the issue's target applies to it too, as
    what a user of each can get), and the first run's time, which pays the compile."""
    ours_c, ref_c = results.get("ours_compiled"), results.get("reference_compiled")
    if ours_c is None and ref_c is None:
        return []

    def tokens_per_s(result, size):
        return None if result is None or f"decode_{size}" not in result else result[f"decode_{size}"]["tokens_per_s"]

    def best(pairs):
        measured = [(value, label) for value, label in pairs if value is not None]
        return max(measured) if measured else (None, "-")

    rows = []
    for size in ("b1", "b8"):
        any_result = ours_c or ref_c
        batch = any_result[f"decode_{size}"]["batch"]
        applies = decode_target is not None and (size == "b1" or model.name != "full")
        rows.append(Row(model.name, f"decode batch {batch}, compiled decode (both)", "tokens/s",
                        tokens_per_s(ours_c, size), tokens_per_s(ref_c, size), "higher"))
        ours_best, ours_how = best([(tokens_per_s(results.get("ours"), size), "eager"),
                                    (tokens_per_s(ours_c, size), "compiled")])
        ref_best, ref_how = best([(tokens_per_s(results.get("reference"), size), "eager"),
                                  (tokens_per_s(ref_c, size), "compiled")])
        rows.append(Row(model.name, f"decode batch {batch}, each at its best (ours {ours_how}, reference {ref_how})",
                        "tokens/s", ours_best, ref_best, "higher",
                        f"ours/ref >= {decode_target:g}" if applies else "", decode_target if applies else None))
        first = lambda result: None if result is None else result[f"decode_{size}"]["first_run_s"]  # noqa: E731
        rows.append(Row(model.name, f"first decode run, batch {batch}, compiling included "
                                    f"({decode_target_steps(any_result)} tokens)", "s", first(ours_c), first(ref_c),
                        "lower"))
    return rows


def quantized_rows(model: BenchModel, config, results: dict[str, dict], read_gbs: float) -> list[Row]:
    """Rows for ours with weight-only int8 / int4 (quantized while loading the fp32 files) against
    the reference (fp32): decode tokens/s, decode as read bandwidth (the quantized bytes a step
    reads), load time and peak memory. Targets (issue 15) are judged in benchmarks/quantize.py."""
    ref = results.get("reference")
    rows = []
    for impl, bits in (("ours_int8", 8), ("ours_int4", 4)):
        mine = results.get(impl)
        if mine is None:
            continue
        label = f"int{bits}"
        for size in ("b1", "b8"):
            decode = mine[f"decode_{size}"]
            rows.append(Row(model.name, f"decode batch {decode['batch']}, ours {label} vs reference fp32", "tokens/s",
                            decode["tokens_per_s"], None if ref is None else ref[f"decode_{size}"]["tokens_per_s"],
                            "higher"))
            context = decode["prompt_tokens"] + decode_target_steps(mine) / 2
            step_bytes = quantized_decode_bytes(config, decode["batch"], context, bits)
            gbs = step_bytes / decode["step_s"] / 1e9
            rows.append(Row(model.name, f"decode batch {decode['batch']}, ours {label}: share of measured read "
                                        f"bandwidth ({step_bytes / 1e9:.3g} GB/step)", "fraction", gbs / read_gbs,
                            None, "higher"))
        rows.append(Row(model.name, f"load, ours {label} (quantizing the fp32 files) vs reference", "s",
                        statistics.median(mine["load_runs_s"]),
                        None if ref is None else statistics.median(ref["load_runs_s"]), "lower"))
        rows.append(Row(model.name, f"peak RSS of the whole run, ours {label} vs reference", "MiB",
                        mine.get("peak_rss_mib"), None if ref is None else ref.get("peak_rss_mib"), "lower"))
    return rows


def quantized_decode_bytes(config, batch: int, context: float, bits: int) -> float:
    """`decode_bytes_per_step` with the decoder's linears and the lm_head stored as
    idefics2_mini/quantize/ stores them: int8 + an fp32 scale per row, or int4 + bf16 scale and
    zero per group of 64; norms, the gathered embedding rows and the KV cache in fp32."""
    text = config.text
    width, q_width = text.hidden_size, text.num_attention_heads * text.head_dim
    kv_width = text.num_key_value_heads * text.head_dim
    linears = text.num_hidden_layers * (width * q_width + 2 * width * kv_width + q_width * width
                                        + 3 * width * text.intermediate_size) + text.vocab_size * width
    rows = text.num_hidden_layers * (q_width + 2 * kv_width + 2 * width + 2 * text.intermediate_size) + text.vocab_size
    quantized = linears + 4 * rows if bits == 8 else linears / 2 + linears / 64 * 4
    floats = decode_bytes_per_step(config, batch, context, 4) - 4 * linears
    return quantized + floats


def decode_target_steps(result: dict) -> int:
    return result.get("new_tokens", 33)


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    if unit == "MiB":
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def write_results(out_dir: Path, info: dict, args, bandwidth_note: str, model_notes: dict[str, list[str]],
                  rows: list[Row], all_results: dict[str, dict[str, dict]]) -> None:
    """e2e.md (the report), e2e.csv (the rows), e2e.json (every measured figure) and e2e.png
    (when matplotlib imports) in `out_dir`, replacing the machine's previous run (earlier runs
    are in git's history)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.e2e" + "".join(f" {a}" for a in sys.argv[1:])
    lines = [
        f"# End-to-end benchmark: idefics2_mini vs transformers — {info['device']}",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM"
        + (f"; GPU {info['device']} (CUDA {info['cuda']})" if "cuda" in info else ""),
        f"- torch {info['torch']}, transformers {args.transformers_version}, python {info['python']}, "
        f"{info['threads']} torch threads (both implementations), {info['date']}",
        f"- run: `{command}`",
        f"- code measured: {code_version()}" + (f"; note: {args.note}" if args.note else ""),
        f"- measured read bandwidth: {bandwidth_note}",
        f"- decode = (t({args.new_tokens} new tokens) - t(1 new token)) / {args.new_tokens - 1}, greedy, stopping "
        "off; prefill = generate 1 token for the image prompt; medians after a warm-up (counts per model "
        "below); every (model, implementation) in its own fresh process, page cache warm",
        "- ratio = ours / reference: below 1 is better for times and memory, above 1 for tokens/s and GB/s",
        "",
    ]
    targets = [r for r in rows if r.target]
    if targets:
        lines += ["## Targets (issues 7 and 18)", "", "| model | metric | target | ours/ref | ours | met |",
                  "|---|---|---|---:|---:|:---:|"]
        for r in targets:
            lines.append(f"| {r.model} | {r.metric} | {r.target} | {fmt(r.ratio, 'ratio')} | {fmt(r.ours, r.unit)} "
                         f"| {r.met} |")
        lines.append("")
    for name in dict.fromkeys(r.model for r in rows):
        lines += [f"## {name}", ""] + [f"- {note}" for note in model_notes[name]] + [
            "", "| metric | unit | ours | reference | ours/ref | target | met |", "|---|---|---:|---:|---:|---|:---:|"]
        for r in rows:
            if r.model == name:
                lines.append(f"| {r.metric} | {r.unit} | {fmt(r.ours, r.unit)} | {fmt(r.reference, r.unit)} | "
                             f"{fmt(r.ratio, 'ratio')} | {r.target} | {r.met} |")
        lines.append("")
    lines += ["## Raw timings (s)", "", "Every timed run, to judge the spread (medians above).", ""]
    for name, results in all_results.items():
        for impl, result in results.items():
            runs = {"load": result["load_runs_s"], "load+first token": result.get("first_token_runs_s", []),
                    **({"load copying": result["load_copy_runs_s"]} if "load_copy_runs_s" in result else {}),
                    **result.get("raw", {})}
            lines.append(f"- {name} / {impl}: " + "; ".join(
                f"{key} " + ", ".join(f"{t:.3g}" for t in values) for key, values in runs.items()))
    lines.append("")
    markdown = "\n".join(lines)

    (out_dir / "e2e.md").write_text(markdown)
    (out_dir / "e2e.json").write_text(json.dumps(all_results, indent=1) + "\n")
    with open(out_dir / "e2e.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "metric", "unit", "ours", "reference", "ratio_ours_over_reference", "better",
                         "target", "met", "device", "threads", "torch", "date"])
        for r in rows:
            writer.writerow([r.model, r.metric, r.unit, "" if r.ours is None else f"{r.ours:.6g}",
                             "" if r.reference is None else f"{r.reference:.6g}",
                             "" if r.ratio is None else f"{r.ratio:.4g}", r.better, r.target, r.met,
                             info["device"], info["threads"], info["torch"], info["date"]])
    plot(out_dir, info, rows)


def code_version() -> str:
    """The commit of the measured code, and whether the model's files had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "idefics2_mini", "kernels"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {commit}" + (" + uncommitted changes in idefics2_mini/ or kernels/" if dirty else "")


def plot(out_dir: Path, info: dict, rows: list[Row]) -> None:
    """Bar chart: per model, how many times better ours is than the reference on each metric
    (reference time / ours, ours tokens/s / reference, ...), with the issue's targets marked."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("  (matplotlib not installed: no PNG; pip install -e '.[bench]')")
        return
    shown = [r for r in rows if r.ratio and r.unit != "fraction" and "import" not in r.metric
             and "bandwidth" not in r.metric and "after load" not in r.metric]
    models = list(dict.fromkeys(r.model for r in shown))
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.8), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in shown if r.model == name]
        advantage = [r.ratio if r.better == "higher" else 1 / r.ratio for r in mine]
        colors = ["tab:green" if a >= 1 else "tab:red" for a in advantage]
        positions = range(len(mine))
        ax.bar(positions, advantage, color=colors)
        for x, r in zip(positions, mine):
            if r.target_ratio is not None and r.target_on == "ratio":
                goal = r.target_ratio if r.better == "higher" else 1 / r.target_ratio
                ax.plot([x - 0.4, x + 0.4], [goal, goal], color="black", linestyle="--", linewidth=1)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(list(positions))
        ax.set_xticklabels([r.metric.split(" (")[0].replace("prefill 980x653 image, ", "prefill ") for r in mine],
                           rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("times better than the reference (dashed: target)", fontsize=8)
        ax.set_title(f"{name}", fontsize=10)
    fig.suptitle(f"idefics2_mini vs transformers — {info['device']}, {info['threads']} threads, {info['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "e2e.png", dpi=110)
    plt.close(fig)


def print_rows(rows: list[Row]) -> None:
    for r in rows:
        ratio = "" if r.ratio is None else f"  ours/ref {r.ratio:.2f}"
        target = f"  [{r.target}: {r.met}]" if r.target else ""
        print(f"    {r.metric:<58} ours {fmt(r.ours, r.unit):>9}  ref {fmt(r.reference, r.unit):>9} {r.unit:<8}"
              f"{ratio}{target}", flush=True)


def rows_from_csv(path: Path) -> tuple[dict, list[Row]]:
    """The rows (and the machine info the plot shows) back from an e2e.csv."""
    import re  # noqa: PLC0415

    rows, info = [], {}
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            number = lambda text: float(text) if text else None  # noqa: E731
            match = re.search(r"([<>]=)\s*([0-9.]+)", record["target"])
            rows.append(Row(record["model"], record["metric"], record["unit"], number(record["ours"]),
                            number(record["reference"]), record["better"], record["target"],
                            float(match.group(2)) if match else None,
                            "ratio" if record["target"].startswith("ours/ref") else "ours"))
            info = {"device": record["device"], "threads": record["threads"], "date": record["date"]}
    return info, rows


if __name__ == "__main__":
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="Redraw e2e.png from a results folder's e2e.csv.")
    parser.add_argument("--plot", type=Path, required=True, help="benchmarks/results/<machine>")
    folder = parser.parse_args().plot
    machine, table = rows_from_csv(folder / "e2e.csv")
    plot(folder, machine, table)
    print(f"wrote {folder / 'e2e.png'}")
