"""`python -m idefics2_mini finetune`: LoRA (or full) fine-tuning on one's own chats and images.

    python -m idefics2_mini finetune --data chats.jsonl --weights weights/idefics2-8b --out runs/mine

One example per line of the data file:

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": "..."}],
     "images": ["photo.jpg"]}                       # relative to the data file, or absolute

Only the assistant turns are learned (`Idefics2Processor.tokenize_chat`). Defaults follow the
model's own fine-tuning recipe: LoRA r=8, alpha=8, dropout 0.1 on the decoder's, projector's
and perceiver's projections, vision tower frozen, lr 1e-4, 2 epochs, batch 2 x 8 accumulation,
image splitting off. Without --weights it trains the tiny random demo checkpoint on the
dataset shipped in idefics2_mini/assets/finetune/, so one command shows the whole path.

What --out receives (each file written next to its place, then renamed over it):

    adapter_model.safetensors, adapter_config.json   the LoRA adapter, PEFT's layout
    model.safetensors + config.json + ...            instead, for full fine-tuning (--lora-rank 0)
    metrics.jsonl     one {"step", "loss", "lr", "tokens_per_s"} line per optimizer step
    loss.png          the loss curve
    trainer_state.pt  what --resume needs: step, optimizer state, fp32 trainable values, RNG
    merged/           with --merge: the adapter folded in, a full official-layout checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from . import lora
from .files import write_atomically
from .plots import line_chart
from .training import (
    OptimizerStep,
    enable_checkpointing,
    learning_rate,
    parameter_counts,
    set_trainable,
    trainable_parameters,
)

DEMO_DATA = Path(__file__).resolve().parent / "assets" / "finetune" / "data.jsonl"
# The demo checkpoint is random and tiny: the recipe's lr would take thousands of steps to show
# anything, so the demo run uses its own (each still overridable).
DEMO_DEFAULTS = {"lr": 1e-2, "steps": 60, "batch_size": 2, "grad_accum": 1, "lora_dropout": 0.0, "warmup_steps": 0}
RECIPE_DEFAULTS = {"lr": 1e-4, "epochs": 2, "batch_size": 2, "grad_accum": 8, "lora_dropout": 0.1, "warmup_steps": 0}
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss.png"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Files of a checkpoint folder besides the weights that a merged checkpoint keeps.
CHECKPOINT_EXTRAS = ("tokenizer.model", "generation_config.json", "preprocessor_config.json", "processor_config.json")


class FinetuneError(Exception):
    """A bad input to fine-tuning: printed as one line naming the problem and the fix."""


# ----------------------------------------------------------------------------- data


@dataclass
class Example:
    messages: list
    images: list[Path]
    line: int  # 1-based line in the data file, for error messages


def load_examples(path: str | Path) -> list[Example]:
    """Read and check a JSONL data file; every problem names FILE:LINE. Images are checked
    to exist and to open as images, so a bad one stops the run before training starts."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"data file not found: {path}")
    examples = []
    with open(path, encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise FinetuneError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise FinetuneError(f'{where}: expected an object with a "messages" list (and an "images" list)')
            images = record.get("images", [])
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise FinetuneError(f'{where}: "images" must be a list of file paths')
            messages = record["messages"]
            roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
            if "assistant" not in roles:
                raise FinetuneError(f"{where}: the chat has no assistant turn, so there is nothing to learn from it")
            image_items = sum(
                1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                for item in m["content"] if isinstance(item, dict) and item.get("type") == "image"
            )
            if image_items != len(images):
                raise FinetuneError(
                    f"{where}: the chat has {image_items} image item(s) but {len(images)} image path(s); "
                    "give one path per {\"type\": \"image\"}, in order"
                )
            files = []
            for name in images:
                file = Path(name) if Path(name).is_absolute() else path.parent / name
                if not file.is_file():
                    raise FinetuneError(f"{where}: image not found: {file}")
                try:
                    with Image.open(file) as image:
                        image.verify()
                except (UnidentifiedImageError, OSError, SyntaxError) as err:
                    raise FinetuneError(f"{where}: {file} is not a readable image ({err})") from None
                files.append(file)
            examples.append(Example(messages, files, number))
    if not examples:
        raise FinetuneError(f"{path} holds no examples (one JSON object per line)")
    return examples


# ----------------------------------------------------------------------------- options


@dataclass
class FinetuneOptions:
    out: Path
    data: Path | None = None
    weights: Path | None = None
    lora_rank: int = 8
    lora_alpha: float | None = None  # default: the rank (the recipe's alpha = r)
    lora_dropout: float | None = None
    lora_targets: list[str] | None = None
    train: list[str] = field(default_factory=list)  # more parameters to train, by name pattern
    lr: float | None = None
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    warmup_steps: int | None = None
    lr_schedule: str = "linear"
    weight_decay: float = 0.0
    max_length: int = 2048
    seed: int = 0
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    image_splitting: bool = False
    save_every: int = 0
    resume: bool = False
    merge: bool = False
    quiet: bool = False

    def resolved(self) -> FinetuneOptions:
        """Fill the defaults (the recipe's, or the demo's without --weights) and check ranges."""
        defaults = DEMO_DEFAULTS if self.weights is None else RECIPE_DEFAULTS
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.steps is None and self.epochs is None:
            self.epochs = RECIPE_DEFAULTS["epochs"]
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        checks = [
            (self.lora_rank >= 0, "--lora-rank must be >= 0 (0 trains the full model)"),
            (self.lr > 0, "--lr must be > 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.steps is None or self.steps >= 1, "--steps must be >= 1"),
            (self.epochs is None or self.epochs >= 1, "--epochs must be >= 1"),
            (self.max_length >= 8, "--max-length must be >= 8"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (self.dtype in DTYPES, f"--dtype must be one of {sorted(DTYPES)}"),
            (self.lr_schedule in ("constant", "linear", "cosine"), "--lr-schedule must be constant, linear or cosine"),
        ]
        for ok, message in checks:
            if not ok:
                raise FinetuneError(message)
        return self


# ----------------------------------------------------------------------------- the run


@dataclass
class FinetuneResult:
    out: Path
    steps: int
    losses: list[float]
    merged: Path | None


def finetune(options: FinetuneOptions, log: TextIO = sys.stderr) -> FinetuneResult:
    """The whole run: check the data, load, train, save. Library form of the command."""
    from .demo import ensure_demo_checkpoint  # noqa: PLC0415
    from .model import Idefics2  # noqa: PLC0415
    from .processor import Idefics2Processor  # noqa: PLC0415

    opts = options.resolved()
    ranks = Ranks.join()
    quiet = opts.quiet or not ranks.main
    say = (lambda message: None) if quiet else (lambda message: print(message, file=log, flush=True))
    if opts.weights is None:
        weights, _ = ensure_demo_checkpoint()
        say(f"demo: the tiny random checkpoint {weights} (pass --weights for a real one)")
    else:
        weights = Path(opts.weights)
        if not (weights / "config.json").is_file():
            raise FinetuneError(f"{weights} is not a checkpoint folder (no config.json); see weights/README.md")
    data = Path(opts.data) if opts.data is not None else DEMO_DATA
    if opts.data is None and opts.weights is not None:
        raise FinetuneError("--data FILE.jsonl is needed with --weights (the shipped demo data is for the demo checkpoint)")
    examples = load_examples(data)
    processor = Idefics2Processor.from_pretrained(weights, do_image_splitting=opts.image_splitting)
    for example in examples:  # lengths are known without loading any image
        length = len(processor.tokenize_chat(example.messages)[0])
        if length > opts.max_length:
            raise FinetuneError(
                f"{data}:{example.line}: the example is {length} tokens long (images expanded), more than "
                f"--max-length {opts.max_length}: shorten it or raise --max-length"
            )
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / STATE_FILE
    if opts.resume and ranks.world > 1:
        raise FinetuneError("--resume runs on one process (the saved state holds whole tensors): resume without torchrun")
    if opts.resume and not state_file.is_file():
        raise FinetuneError(f"--resume: {state_file} not found (nothing to resume in {out})")
    if not opts.resume and state_file.is_file():
        raise FinetuneError(f"{out} already holds a run ({STATE_FILE}); pass --resume to continue it or choose another --out")

    torch.manual_seed(opts.seed)
    say(f"loading {weights} ({opts.dtype})")
    model = Idefics2.from_pretrained(weights, dtype=DTYPES[opts.dtype])
    if opts.lora_rank > 0:
        wrapped = lora.apply(model, opts.lora_targets, opts.lora_rank, opts.lora_alpha, opts.lora_dropout)
        say(f"LoRA rank {opts.lora_rank}, alpha {opts.lora_alpha:g}, dropout {opts.lora_dropout:g} on {len(wrapped)} linears")
    else:
        model.requires_grad_(True)
        set_trainable(model, [r"vision\..*"], trainable=False)  # the recipe keeps the vision tower frozen
    if opts.train:
        set_trainable(model, opts.train)
    if opts.gradient_checkpointing:
        enable_checkpointing(model)
    trainable, total = parameter_counts(model)
    say(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    model.train()
    if ranks.world > 1:
        from .distributed import shard_for_training  # noqa: PLC0415

        shard_for_training(model)
        say(f"FSDP2 over {ranks.world} processes: each micro-batch's examples dealt out to the ranks")

    step_fn = OptimizerStep(trainable_parameters(model), lr=opts.lr, weight_decay=opts.weight_decay)
    micro_per_epoch = math.ceil(len(examples) / opts.batch_size)
    total_steps = opts.steps or opts.epochs * math.ceil(micro_per_epoch / opts.grad_accum)
    start_step = 0
    if opts.resume:
        start_step = _load_state(state_file, step_fn, total_steps)
        say(f"resuming at step {start_step} of {total_steps}")
    metrics = _read_metrics(out / METRICS_FILE, up_to_step=start_step)
    if ranks.main:
        _write_lines(out / METRICS_FILE, metrics)

    progress = TrainingProgress(log, total_steps, enabled=not quiet)
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        step_fn.lr = learning_rate(step, total_steps, opts.lr, opts.warmup_steps, opts.lr_schedule)
        batches, weights_of_batches = [], []
        for chunk in _micro_batches(examples, opts, step):
            mine, weight = ranks.deal(chunk)
            batches.append(processor.training_batch(
                [e.messages for e in mine], [e.images for e in mine], max_length=opts.max_length))
            weights_of_batches.append(weight)
        # Every counted token of the whole step weighs the same: the divisor is the count over
        # all micro-batches (and all ranks).
        counted = int(ranks.sum(sum(w * int((b["labels"][:, 1:] != -100).sum())
                                    for b, w in zip(batches, weights_of_batches))))
        loss_sum = 0.0
        for batch, weight in zip(batches, weights_of_batches):
            labels = batch.pop("labels")
            out_step = model(**batch, labels=labels, num_counted=counted, keep_logits=False)
            (out_step.loss * weight).backward()
            loss_sum += weight * out_step.loss.item()
        step_fn.step()
        seconds = time.perf_counter() - started
        tokens = ranks.sum(sum(w * int(b["attention_mask"].sum()) for b, w in zip(batches, weights_of_batches)))
        record = {"step": step + 1, "loss": ranks.sum(loss_sum), "lr": step_fn.lr, "tokens_per_s": tokens / seconds}
        metrics.append(record)
        if ranks.main:
            with open(out / METRICS_FILE, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
        progress.update(record)
        last = step + 1 == total_steps
        if last or (opts.save_every and (step + 1) % opts.save_every == 0):
            _save(model, step_fn, opts, weights, out, step + 1, metrics, ranks)
    progress.close()
    if start_step >= total_steps:
        say(f"nothing to do: the run in {out} already reached step {total_steps}")
    merged = None
    if opts.merge:
        merged = _write_merged(model, weights, out / "merged", ranks)
        say(f"merged checkpoint: {merged}")
    ranks.barrier()  # every file is written before any rank returns
    say(f"saved to {out}")
    return FinetuneResult(out, total_steps, [m["loss"] for m in metrics], merged)


def _micro_batches(examples: list[Example], opts: FinetuneOptions, step: int) -> list[list[Example]]:
    """The grad_accum micro-batches of optimizer step `step`: a fixed-seed shuffle per epoch,
    cut into batch_size pieces, read in order across epochs, so a resumed run sees the same
    data as an uninterrupted one."""
    micro_per_epoch = math.ceil(len(examples) / opts.batch_size)
    chunks = []
    for micro in range(step * opts.grad_accum, (step + 1) * opts.grad_accum):
        epoch, index = divmod(micro, micro_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(opts.seed * 100003 + epoch))
        picked = order[index * opts.batch_size : (index + 1) * opts.batch_size].tolist()
        chunks.append([examples[i] for i in picked])
    return chunks


def _save(model, step_fn: OptimizerStep, opts: FinetuneOptions, weights: Path, out: Path, step: int,
          metrics: list[dict], ranks: Ranks) -> None:
    from .loading import save_checkpoint  # noqa: PLC0415

    with ranks.whole_parameters(model):
        if ranks.main:
            if opts.lora_rank > 0:
                lora.save_adapter(model, out)
            else:
                save_checkpoint(model, out)
                _copy_extras(weights, out)
    state = {"step": step, "rng": torch.get_rng_state(), **ranks.whole_tensors(step_fn.state_dict())}
    if not ranks.main:
        return
    write_atomically(out / STATE_FILE, lambda tmp: torch.save(state, tmp))
    if metrics:
        steps = [m["step"] for m in metrics]
        losses = [m["loss"] for m in metrics]
        line_chart(out / CURVE_FILE, {"loss": (steps, losses), "mean of last 10": (steps, _running_mean(losses, 10))},
                   title=f"Training loss ({out.name})", x_label="optimizer step", y_label="loss")


def _load_state(state_file: Path, step_fn: OptimizerStep, total_steps: int) -> int:
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        step_fn.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise FinetuneError(f"--resume: {state_file} does not fit this run ({err}); resume with the same options") from None
    torch.set_rng_state(state["rng"])
    return min(int(state["step"]), total_steps)


def _write_merged(model, weights: Path, folder: Path, ranks: Ranks) -> Path:
    """A full checkpoint in the official layout, the adapters folded into the weights; the
    model keeps its adapters (unmerged) afterwards."""
    from .loading import save_checkpoint  # noqa: PLC0415

    with ranks.whole_parameters(model):
        if ranks.main:
            folder.mkdir(parents=True, exist_ok=True)
            with lora.merged_into_base(model):
                save_checkpoint(model, folder)
            _copy_extras(weights, folder)
    return folder


@dataclass
class Ranks:
    """The processes of a run: one (rank 0 of 1), or torchrun's. Rank 0 writes every file."""

    rank: int = 0
    world: int = 1

    @classmethod
    def join(cls) -> Ranks:
        from .distributed import init_distributed, launched_by_torchrun  # noqa: PLC0415

        if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
            return cls()
        group = init_distributed()
        return cls(torch.distributed.get_rank(group), torch.distributed.get_world_size(group))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def deal(self, chunk: list[Example]) -> tuple[list[Example], float]:
        """This rank's examples of a micro-batch (every world-th one) and their weight. A rank
        left without one still runs (FSDP's collectives need every rank) on a copy weighted 0."""
        mine = chunk[self.rank :: self.world]
        return (mine, 1.0) if mine else (chunk[:1], 0.0)

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        total = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(total)
        return float(total.item())

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def whole_parameters(self, model):
        """Context: FSDP-sharded parameters gathered whole (on every rank) for saving."""
        if self.world == 1:
            return contextlib.nullcontext(model)
        from .distributed import gathered_for_saving  # noqa: PLC0415

        return gathered_for_saving(model)

    def whole_tensors(self, value):
        """`value` (nested dicts/lists) with every sharded tensor gathered whole."""
        if isinstance(value, dict):
            return {k: self.whole_tensors(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.whole_tensors(v) for v in value)
        return value.full_tensor() if hasattr(value, "full_tensor") else value


def _copy_extras(weights: Path, folder: Path) -> None:
    for name in CHECKPOINT_EXTRAS:
        if (weights / name).is_file() and (weights / name).resolve() != (folder / name).resolve():
            shutil.copyfile(weights / name, folder / name)


def _read_metrics(file: Path, up_to_step: int) -> list[dict]:
    """The metrics of steps 1..up_to_step already written (a run stopped after writing a
    metrics line but before saving its state repeats that step)."""
    if up_to_step == 0 or not file.is_file():
        return []
    records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]


def _write_lines(file: Path, records: list[dict]) -> None:
    write_atomically(file, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))


def _running_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


class TrainingProgress:
    """`step 12/40 [#####.....] loss 2.345  lr 1.0e-04  1,234 tok/s  eta 0:31` on stderr: redrawn
    in place on a terminal, a line every 10% of the run in a log file."""

    def __init__(self, stream: TextIO, total: int, enabled: bool = True, width: int = 24):
        self.stream, self.total, self.enabled, self.width = stream, total, enabled, width
        self.live = enabled and getattr(stream, "isatty", lambda: False)()
        self.started = time.perf_counter()
        self.done_here = 0
        self.last_line = ""

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        self.done_here += 1
        step = record["step"]
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done_here * (self.total - step)
        filled = self.width * step // max(self.total, 1)
        self.last_line = (
            f"step {step}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] loss {record['loss']:.4f}  "
            f"lr {record['lr']:.1e}  {record['tokens_per_s']:,.0f} tok/s  eta {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        if self.live:
            self.stream.write("\r" + self.last_line)
        elif step == self.total or step % max(1, self.total // 10) == 0 or self.done_here == 1:
            self.stream.write(self.last_line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self.last_line:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m idefics2_mini finetune",
        description="Fine-tune Idefics2 with LoRA (default) or fully on a JSONL file of chats with images. "
        "Without --weights: the tiny random demo checkpoint and the shipped demo data.",
    )
    parser.add_argument("--data", type=Path, help="JSONL, one {\"messages\": [...], \"images\": [...]} per line")
    parser.add_argument("--weights", type=Path, help="checkpoint folder (official layout); default: the demo checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="folder for the adapter, metrics, loss curve, state")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (0: train the full model; default 8)")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    parser.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.1; demo 0)")
    parser.add_argument("--lora-target", dest="lora_targets", action="append", metavar="REGEX",
                        help="module names to adapt (repeatable; default: decoder, projector, perceiver projections)")
    parser.add_argument("--train", action="append", default=[], metavar="REGEX",
                        help="also train the parameters whose name matches (repeatable), e.g. 'connector\\..*'")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-4; demo 1e-2)")
    parser.add_argument("--lr-schedule", default="linear", choices=["constant", "linear", "cosine"])
    parser.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 0)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the data (default 2)")
    length.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs; demo default 60)")
    parser.add_argument("--batch-size", type=int, help="examples per micro-batch (default 2)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 8; demo 1)")
    parser.add_argument("--max-length", type=int, default=2048, help="longest example in tokens, images expanded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="weights' dtype; trained values are kept in fp32 either way")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    parser.add_argument("--image-splitting", action="store_true", help="split images into 4 crops + the whole")
    parser.add_argument("--save-every", type=int, default=0, metavar="N", help="also save every N steps")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--merge", action="store_true", help="also write --out/merged: a full official checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = FinetuneOptions(**vars(args))
    try:
        finetune(options)
    except (FinetuneError, ValueError, FileNotFoundError, OSError) as err:
        if os.environ.get("IDEFICS2_MINI_DEBUG"):
            raise
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 1
    return 0
