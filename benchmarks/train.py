"""One training step (forward + backward + optimizer), ours vs the reference, side by side.

    python -m benchmarks.train                       # ~10 min on 2 CPU cores
    python -m benchmarks.train --model tiny          # seconds: the smoke test's size

Model "wide": the real Idefics2-8B widths (vision 1152 / 16 heads, projector 1152 -> 14336 ->
4096, perceiver 4096 wide 16/4 heads x 96, decoder 4096 wide 32/8 heads x 128, SwiGLU 14336,
vocab 32003) with 2 vision layers, 1 perceiver layer and 2 decoder layers, fp32, random
weights in the official layout. A batch of 4 chats, each with one image of its own size
(568x378, 378x568, 490x490, 640x400: 4,645 patches in all, unsplit, so the images run packed)
and an assistant turn that is learned (the processor's labels). Each (implementation, setup)
runs in its own process, one after the other, so the peak resident memory (VmHWM) is that
setup's alone; time is the median over the timed steps after one untimed step.

Setups:
  lora        LoRA r=8 alpha=8 on the recipe's targets (decoder, projector, perceiver), the
              rest frozen; the reference uses peft with the same targets
  lora-ckpt   the same with activation checkpointing per layer (ours: training.py; the
              reference: gradient_checkpointing_enable, non-reentrant)
  full        the decoder layers and the connector trained with AdamW (vision tower and the
              embedding tables frozen: a full AdamW of the whole wide model does not fit 24 GiB)
  full-ckpt   the same with activation checkpointing

Results: benchmarks/results/<machine>/train.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, peak_rss_mib, write_markdown

SETUPS = ("lora", "lora-ckpt", "full", "full-ckpt")
IMAGE_SIZES = ((568, 378), (378, 568), (490, 490), (640, 400))
IMPLS = ("ours", "reference")
RECIPE_TARGETS = r".*(text_model|modality_projection|perceiver_resampler).*(down|gate|up|k|q|v|o)_proj"
CHAT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this picture: the shapes, "
                                  "their colours and any text in it."}]},
    {"role": "assistant", "content": "A yellow disc on the left and a blue rectangle on the right, over smooth "
                                     "red and green gradients with fine stripes; the rectangle carries the words "
                                     "idefics2_mini benchmark in white."},
]


def config_for(name: str):
    import idefics2_mini as im  # noqa: PLC0415

    if name == "wide":
        return im.Idefics2Config(
            vision=im.VisionConfig(num_hidden_layers=2),
            perceiver=im.PerceiverConfig(resampler_depth=1),
            text=im.TextConfig(num_hidden_layers=2),
        )
    if name == "tiny":
        return im.Idefics2Config(
            vision=im.VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
            perceiver=im.PerceiverConfig(hidden_size=128, resampler_depth=1, resampler_n_heads=4,
                                         resampler_head_dim=32, num_key_value_heads=2),
            text=im.TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32),
        )
    raise KeyError(name)


def build_checkpoint(name: str, path: Path, config=None) -> None:
    """Random weights (normal, 1/sqrt(fan-in)) in the official layout, built once; a marker
    holding the config says the build finished."""
    import idefics2_mini as im  # noqa: PLC0415

    config = config or config_for(name)
    marker = json.dumps(config.to_dict(), sort_keys=True)
    if (path / "BUILT").is_file() and (path / "BUILT").read_text() == marker:
        return
    print(f"building the {name} checkpoint in {path} ...", flush=True)
    with torch.device("meta"):
        model = im.Idefics2(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() >= 2:
                table = any(k in param_name for k in ("embed_tokens", "position_embedding", "latents"))
                param.normal_(0.0, 1.0 if table else 1.0 / math.sqrt(param[0].numel()), generator=generator)
            else:
                param.fill_(1.0 if param_name.endswith("weight") else 0.0)
    staging = path.with_name(path.name + f".building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    im.save_checkpoint(model, staging, max_shard_bytes=2 * 2**30)
    (staging / "BUILT").write_text(marker)
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)


def make_batch(path: Path) -> dict[str, torch.Tensor]:
    from PIL import Image  # noqa: PLC0415

    from idefics2_mini.processor import Idefics2Processor  # noqa: PLC0415

    from benchmarks.e2e import make_image  # noqa: PLC0415

    image = make_image()
    images = [[image.resize(size, Image.BILINEAR)] for size in IMAGE_SIZES]
    processor = Idefics2Processor.from_pretrained(None, do_image_splitting=False)
    batch = processor.training_batch([CHAT] * len(IMAGE_SIZES), images)
    torch.save(batch, path)
    return batch


# ============================================================================ child process


def child(spec: dict) -> dict:
    """Load, set up, run 1 + steps training steps; report times, loss, peak memory."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    batch = torch.load(spec["batch"], weights_only=True)
    labels = batch.pop("labels")
    setup, checkpointed = spec["setup"].removesuffix("-ckpt"), spec["setup"].endswith("-ckpt")
    if spec["impl"] == "ours":
        import idefics2_mini as im  # noqa: PLC0415
        from idefics2_mini import lora  # noqa: PLC0415
        from idefics2_mini.training import (  # noqa: PLC0415
            OptimizerStep,
            enable_checkpointing,
            set_trainable,
            trainable_parameters,
        )

        model = im.Idefics2.from_pretrained(spec["checkpoint"])
        if setup == "lora":
            lora.apply(model, rank=8, alpha=8)
        else:
            set_trainable(model, [r"text\.layers\..*", r"connector\..*"])
        if checkpointed:
            enable_checkpointing(model)
        model.train()
        optimizer = OptimizerStep(trainable_parameters(model), lr=1e-5, clip_norm=None)

        def step() -> float:
            loss = model(**batch, labels=labels, keep_logits=False).loss
            loss.backward()
            optimizer.step()
            return loss.item()
    else:
        from transformers import Idefics2ForConditionalGeneration  # noqa: PLC0415

        model = Idefics2ForConditionalGeneration.from_pretrained(spec["checkpoint"], dtype=torch.float32)
        model.requires_grad_(False)
        if setup == "lora":
            import peft  # noqa: PLC0415

            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                                               target_modules=RECIPE_TARGETS))
        else:
            for name, param in model.named_parameters():
                if name.startswith(("model.text_model.layers.", "model.connector.")):
                    param.requires_grad_(True)
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)

        def step() -> float:
            loss = model(**batch, labels=labels, position_ids=position_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

    trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses, times = [], []
    for _ in range(1 + spec["steps"]):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[1:]), "first_step_s": times[0], "loss": losses[0],
            "peak_rss_mib": peak_rss_mib(), "trainable": trainable_count}


def run_child(spec: dict) -> dict:
    command = [sys.executable, "-m", "benchmarks.train", "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit status %d" % done.returncode])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ============================================================================ driver and report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wide", choices=["wide", "tiny"])
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one untimed step")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--weights-dir", type=Path, default=Path(__file__).resolve().parents[1] / "weights")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    checkpoint = args.weights_dir / f"train-{args.model}"
    build_checkpoint(args.model, checkpoint)
    batch_file = checkpoint / "batch.pt"
    batch = make_batch(batch_file)
    results: dict[str, dict[str, dict]] = {}
    for setup in args.setups.split(","):
        for impl in args.impls.split(","):
            spec = {"impl": impl, "setup": setup, "checkpoint": str(checkpoint), "batch": str(batch_file),
                    "steps": args.steps, "threads": args.threads}
            print(f"{setup:10s} {impl:9s} ...", end=" ", flush=True)
            results.setdefault(setup, {})[impl] = result = run_child(spec)
            print(result.get("error") or f"{result['step_s']:.2f} s/step, peak {result['peak_rss_mib']:,.0f} MiB, "
                  f"loss {result['loss']:.4f}", flush=True)
    report(args, results, batch)


def report(args, results: dict, batch: dict) -> None:
    info = machine_info(torch.device("cpu"), args.threads)
    tokens = int(batch["attention_mask"].sum())
    counted = int((batch["labels"] != -100).sum())
    lines = [f"# One training step, {args.model} model: ours vs the reference", "",
             "`python -m benchmarks.train " + " ".join(sys.argv[1:]) + "`; see the script's docstring for the "
             "model and the setups.", "",
             " · ".join(f"{k}: {v}" for k, v in info.items()), "",
             f"A batch of {len(IMAGE_SIZES)}: {tokens} tokens ({counted} learned), one image each "
             f"({', '.join(f'{w}x{h}' for w, h in IMAGE_SIZES)}), unsplit; fp32; "
             f"median of {args.steps} timed steps after 1 untimed. Peak = the process's peak resident memory "
             "(weights included).", "",
             "| setup | trainable | ours s/step | ref s/step | time ours/ref | ours peak MiB | ref peak MiB | "
             "peak ours/ref | loss ours | loss ref |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for setup, pair in results.items():
        ours, ref = pair.get("ours", {}), pair.get("reference", {})

        def cell(result, key, fmt):
            return fmt.format(result[key]) if key in result else result.get("error", "-")[:40]

        def ratio(key):
            return f"{ours[key] / ref[key]:.2f}x" if key in ours and key in ref else "-"

        lines.append(f"| {setup} | {cell(ours or ref, 'trainable', '{:,}')} | {cell(ours, 'step_s', '{:.2f}')} | "
                     f"{cell(ref, 'step_s', '{:.2f}')} | {ratio('step_s')} | {cell(ours, 'peak_rss_mib', '{:,.0f}')} | "
                     f"{cell(ref, 'peak_rss_mib', '{:,.0f}')} | {ratio('peak_rss_mib')} | "
                     f"{cell(ours, 'loss', '{:.4f}')} | {cell(ref, 'loss', '{:.4f}')} |")
    if "lora-ckpt" in results and "ours" in results["lora-ckpt"] and "lora" in results:
        ours_ckpt = results["lora-ckpt"]["ours"].get("peak_rss_mib")
        ref_plain = results["lora"].get("reference", {}).get("peak_rss_mib")
        if ours_ckpt and ref_plain:
            lines += ["", f"LoRA, ours with checkpointing vs the reference without: peak {ours_ckpt / ref_plain:.2f}x."]
    name = "train.md" if args.model == "wide" else f"train-{args.model}.md"
    out = write_markdown(args.out, info, name, lines)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    print("\n".join(lines[-len(results) - 2:]))


if __name__ == "__main__":
    main()
