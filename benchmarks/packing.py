"""NaViT packing vs padding vs the reference: time and activation memory of the image path.

    python -m benchmarks.packing [--repeats 3] [--vision-layers 2]

The image path (vision tower + projection + perceiver) at the real Idefics2-8B widths (vision
1152/4304/16 heads, perceiver 4096 wide, depth 3, projection through 14336) with a few vision
layers so it fits a CPU, on two batches:

- mixed: one 980×980 image and three 378×378 images (padded, each costs 980×980);
- split: one 980×653 photo with image splitting (4 crops + the whole image, 5 sizes).

Three runs, each in its own fresh process on the same random checkpoint: ours packed, ours
padded (the reference's layout), and the reference (transformers, its default attention).
Time is the median of `--repeats` runs after a warm-up; activation memory is the peak resident
memory during those runs above the resident memory just before them (the kernel's VmHWM,
reset first). Results go to benchmarks/results/<machine>/packing.md and .csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import cpu_name, slug, usable_cores

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, statistics, sys, time
import PIL.Image, torch
import idefics2_mini as im
from idefics2_mini.processor import Idefics2Processor

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # MiB

checkpoint, which, batch_name, repeats, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
square = PIL.Image.radial_gradient("L").resize((980, 980)).convert("RGB")
small = [PIL.Image.effect_mandelbrot((378, 378), (-2, -1.5, 1, 1.5), 50 + 20 * i).convert("RGB") for i in range(3)]
photo = PIL.Image.linear_gradient("L").resize((980, 653)).convert("RGB")
if batch_name == "mixed":
    images, split = [[square, *small]], False
else:
    images, split = [[photo]], True
processor = Idefics2Processor.from_pretrained(None, do_image_splitting=split)
pixels = processor.image_processor(images, packed=(which == "packed"))

if which == "reference":
    from transformers import Idefics2ForConditionalGeneration
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    run = lambda: model.model.get_image_features(pixels["pixel_values"], pixels["pixel_attention_mask"])
else:
    model = im.Idefics2.from_pretrained(checkpoint)
    model.image_layout = which
    run = lambda: model.get_image_features(pixels["pixel_values"], pixels.get("pixel_attention_mask"))

with torch.no_grad():
    run()  # warm-up
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM (the peak) to the current RSS
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = status("VmHWM")
print(json.dumps({"seconds": statistics.median(times), "activation_mib": peak - before}))
"""


def build_checkpoint(path: Path, vision_layers: int) -> None:
    import torch

    import idefics2_mini as im

    config = im.Idefics2Config(
        vision=im.VisionConfig(num_hidden_layers=vision_layers),
        text=im.TextConfig(num_hidden_layers=1),
    )
    torch.manual_seed(0)
    tmp = path.with_name(path.name + ".tmp")
    im.save_checkpoint(im.Idefics2(config), tmp)
    tmp.rename(path)


def measure(checkpoint: Path, which: str, batch: str, repeats: int, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(checkpoint), which, batch, str(repeats), str(threads)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vision-layers", type=int, default=2)
    args = parser.parse_args()
    threads = usable_cores()
    checkpoint = ROOT / "weights" / "bench" / f"packing-{args.vision_layers}l"
    if not (checkpoint / "config.json").exists():
        print(f"building {checkpoint} ...", flush=True)
        build_checkpoint(checkpoint, args.vision_layers)

    rows = []
    for batch in ("mixed", "split"):
        results = {}
        for which in ("packed", "padded", "reference"):
            print(f"{batch:>5} / {which:<9} ...", end=" ", flush=True)
            results[which] = measure(checkpoint, which, batch, args.repeats, threads)
            print(f"{results[which]['seconds']:.2f} s, {results[which]['activation_mib']:.0f} MiB", flush=True)
        ref = results["reference"]
        for which, result in results.items():
            rows.append({
                "batch": batch, "run": which, "seconds": round(result["seconds"], 4),
                "activation_mib": round(result["activation_mib"], 1),
                "speedup_vs_reference": round(ref["seconds"] / result["seconds"], 2),
                "memory_saving_vs_reference": round(ref["activation_mib"] / max(result["activation_mib"], 1.0), 2),
            })

    machine = cpu_name()
    out_dir = ROOT / "benchmarks" / "results" / slug(machine)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "packing.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import torch

    lines = [
        "# Image path: packed vs padded vs reference",
        "",
        f"Machine: {machine}, {threads} threads, torch {torch.__version__}, fp32, "
        f"{time.strftime('%Y-%m-%d')}. Checkpoint: real 8B vision/connector widths, "
        f"{args.vision_layers} vision layers, perceiver depth 3. Median of {args.repeats} runs after a warm-up; "
        "activation memory = peak RSS during the runs above RSS before them. Each run in its own process.",
        "",
        "- mixed: one 980×980 + three 378×378 images; split: one 980×653 photo split into 4 crops + whole.",
        "- reference: transformers `Idefics2Model.get_image_features` (default attention), same checkpoint.",
        "",
        "| batch | run | time (s) | activation memory (MiB) | speed-up vs reference | memory saving vs reference |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row['batch']} | {row['run']} | {row['seconds']:.3f} | {row['activation_mib']:.0f} | "
                     f"{row['speedup_vs_reference']:.2f}× | {row['memory_saving_vs_reference']:.2f}× |")
    (out_dir / "packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
