"""The command line: ask Idefics2 about images, one question or a chat; check a download.

    python -m idefics2_mini --image cat.png "What animal is in this picture?"
    python -m idefics2_mini --chat [--image cat.png] ["first question"]
    python -m idefics2_mini check weights/idefics2-8b
    python -m idefics2_mini finetune ...           (see finetune.py)
    python -m idefics2_mini explain --image cat.png "What is this?" --out DIR   (explain.py)

A terminal layer only: arguments, progress, printing and the chat's input loop. The work is
done by library functions that run without a terminal: chat.py (a conversation, one question
being a one-turn one), loading.check_checkpoint (`check`), and each subcommand's `main(argv)`.

What one question does, in order (everything that can be wrong with the inputs is found before
the long part, loading the weights):

    pick the checkpoint (--weights, else weights/idefics2-8b/, else the tiny demo: demo.py)
    check its files (cheap: headers only)  ->  tokenize the prompt, load the images
    check the prompt fits the model's positions  ->  load the weights (progress bar)
    generate, streaming text to stdout  ->  timings to stderr

Every bad input ends with one line `error: ...` on stderr and exit status 1 (2 for a bad
option); set IDEFICS2_MINI_DEBUG=1 to get the Python traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

DEBUG_ENV = "IDEFICS2_MINI_DEBUG"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_NEW_TOKENS = 256
DEMO_MAX_NEW_TOKENS = 32


class CLIError(Exception):
    """A problem with what the user asked for; printed as one line, no traceback."""


# ---------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m idefics2_mini",
        description="Ask Idefics2-8B about images. Without --weights it uses weights/idefics2-8b/ when that "
        "folder exists, else a tiny random-weight demo checkpoint (its answers are noise; see weights/README.md).",
        epilog="Subcommands (as the first argument only): `check DIR` verifies a downloaded checkpoint folder; "
        "`finetune ...` trains (its own --help); `quantize ...` writes an int8/int4 checkpoint (its own --help).",
    )
    parser.add_argument("prompt", nargs="?", help='the question ("-" reads it from stdin); optional with --chat')
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image file; repeat for several (they come before the text, in order)")
    parser.add_argument("--chat", action="store_true",
                        help="interactive chat on stdin; keeps the conversation and its KV cache between turns "
                        "(type /image PATH to attach an image to your next message, /quit to end)")
    parser.add_argument("--weights", metavar="DIR", help="checkpoint folder in the official layout")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    parser.add_argument("--split-images", action=argparse.BooleanOptionalAction, default=None,
                        help="split each image into 4 crops + the whole image (default: the checkpoint's "
                        "preprocessor_config.json, else off)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help=f"longest answer in tokens (default: {DEFAULT_MAX_NEW_TOKENS}; "
                        f"{DEMO_MAX_NEW_TOKENS} with the demo checkpoint, whose noise never stops by itself)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sample with this temperature (default: greedy; 0 also means greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling (turns sampling on)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k sampling (turns sampling on)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible answers)")
    parser.add_argument("--quantize", choices=("int8", "int4"),
                        help="quantize the weights while loading them (weight-only; see `quantize --help` to "
                        "write a quantized checkpoint once instead)")
    parser.add_argument("--group-size", type=int, default=None, metavar="G",
                        help="with --quantize int4: input columns per scale, 32, 64 (default) or 128")
    parser.add_argument("--lm-head-bits", type=int, default=None, metavar="8|4",
                        help="with --quantize: the lm_head's width (default 8)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with torch.compile: faster tokens after a one-time "
                        "compile of ~10-30 s (on a CPU it needs a C++ compiler)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no timings")
    parser.add_argument("--tp", type=int, default=None, metavar="N",
                        help="tensor parallel over N processes (decoder split by heads); launch with "
                        "torchrun --nproc-per-node N -m idefics2_mini --tp N ...")
    return parser


def build_check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m idefics2_mini check",
        description="Verify a checkpoint folder before a long load: config.json readable, every shard the index "
        "names present and complete, the index's tensor names equal to what the shards hold and to what the "
        "config needs, tokenizer.model present.",
    )
    parser.add_argument("folder", metavar="DIR")
    return parser


def generation_options(args: argparse.Namespace, is_demo: bool = False):
    """The flags as chat.GenerationOptions. Flag semantics: --temperature 0 (or none) means
    greedy, --top-k/--top-p turn sampling on; the values' rules are the library's, its messages
    spelled with the flags' names."""
    from .chat import GenerationOptions  # noqa: PLC0415

    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = DEMO_MAX_NEW_TOKENS if is_demo else DEFAULT_MAX_NEW_TOKENS
    wants_filters = args.top_k is not None or args.top_p is not None
    if args.temperature == 0 and wants_filters:
        raise CLIError("--top-k/--top-p sample, but --temperature 0 means greedy: drop one of them")
    do_sample = args.temperature not in (None, 0) or wants_filters
    temperature = args.temperature if args.temperature else 1.0
    try:
        return GenerationOptions(max_new_tokens, do_sample, temperature, args.top_k, args.top_p, args.seed)
    except ValueError as err:
        raise CLIError(re.sub(r"\b(max_new_tokens|temperature|top_k|top_p)\b",
                              lambda name: "--" + name[1].replace("_", "-"), str(err))) from err


# ---------------------------------------------------------------------------- running


def _subcommand(module: str) -> Callable[[list[str]], int]:
    """idefics2_mini.<module>.main, imported only when that subcommand runs."""
    return lambda argv: importlib.import_module(f"{__package__}.{module}").main(argv)


# `python -m idefics2_mini NAME ARGS...` runs SUBCOMMANDS[NAME](ARGS) -> exit status; anything
# else is a question or a chat (`run`).
SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "check": lambda argv: run_check(build_check_parser().parse_args(argv).folder),
    "finetune": _subcommand("finetune"),
    "quantize": _subcommand("quantize"),
    "explain": _subcommand("explain"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m idefics2_mini`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # a terminal that cannot show a character gets "?"
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        return run(build_parser().parse_args(argv))
    except SystemExit as exit_:  # argparse: usage errors (status 2) and --help (0)
        return exit_.code if isinstance(exit_.code, int) else 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (one clear line instead of a traceback)
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # a --tp run (or a distributed finetune)


def _one_line(err: BaseException) -> str:
    if isinstance(err, (CLIError, ValueError, OSError, RuntimeError)):
        message = str(err) or type(err).__name__
    else:  # not an input problem we anticipated: say what kind, so a bug report has something to go on
        message = f"{type(err).__name__}: {err} (set {DEBUG_ENV}=1 for the traceback)"
    return " ".join(message.split())


def run(args: argparse.Namespace) -> int:
    """One question (the answer streamed to stdout) or, with --chat, a chat on stdin."""
    from .chat import Conversation, check_first_turn, first_turn_tokens  # noqa: PLC0415
    from .config import Idefics2Config  # noqa: PLC0415
    from .image_processing import load_image  # noqa: PLC0415
    from .loading import check_checkpoint  # noqa: PLC0415
    from .model import Idefics2  # noqa: PLC0415
    from .processor import Idefics2Processor  # noqa: PLC0415

    generation_options(args)  # bad option values fail before anything is built
    quantization = _quantization(args)
    if args.chat and args.prompt == "-":
        raise CLIError('with --chat the messages come from stdin; give the first one as text, not "-"')
    prompt = sys.stdin.read().strip() if args.prompt == "-" else args.prompt
    if not args.chat and not prompt:
        raise CLIError('give a prompt, e.g. python -m idefics2_mini --image cat.png "What is this?", or use --chat')
    tp_group = _start_tensor_parallel(args) if args.tp is not None else None
    device, dtype = _device_and_dtype(args)
    err = sys.stderr

    # Inputs first: a missing image or a too-long prompt should not cost a 30 GB load.
    images = [load_image(path) for path in args.image]
    weights, is_demo = _choose_weights(args.weights, quiet=args.quiet)
    options = generation_options(args, is_demo)
    problems, _ = check_checkpoint(weights, Idefics2, require_tokenizer=False)
    if problems:
        raise CLIError(f"{weights}: {problems[0]} (run `python -m idefics2_mini check {weights}` for details)")
    split = {} if args.split_images is None else {"do_image_splitting": args.split_images}
    processor = Idefics2Processor.from_pretrained(weights, **split)
    first_turn = None
    if prompt:
        first_turn = _PendingTurn(prompt, images, first_turn_tokens(processor, prompt, len(images)))
        max_positions = Idefics2Config.from_pretrained(weights).text.max_position_embeddings
        check_first_turn(first_turn.tokens, options.max_new_tokens, max_positions)

    start = time.perf_counter()
    model = _load(weights, dtype, device, quiet=args.quiet, tp_group=tp_group, quantize=quantization)
    load_seconds = time.perf_counter() - start
    if args.compile:
        from . import backends  # noqa: PLC0415

        backends.compile_decode(model)  # compiles on the first decode step
    if is_demo:
        print(_demo_notice(weights), file=err)

    if not args.chat:
        # One question: the cache needs room for this prompt and its answer only.
        conversation = Conversation(model, processor, options, first_turn.tokens + options.max_new_tokens)
        stats = _ask(conversation, first_turn.text, first_turn.images)
        if not args.quiet:
            print(f"load {load_seconds:.2f} s · {stats.describe()}", file=err)
        return 0
    if not args.quiet:
        print(f"load {load_seconds:.2f} s", file=err)
    conversation = Conversation(model, processor, options)
    return _chat(conversation, first_turn, pending_images=[] if first_turn else images, quiet=args.quiet)


@dataclass
class _PendingTurn:
    text: str
    images: list
    tokens: int = 0  # prompt length, once counted


def _ask(conversation, text: str, images: list):
    """conversation.ask, the answer streamed to stdout -> chat.TurnStats."""

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    stats = conversation.ask(text, images, write)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return stats


def _chat(conversation, first_turn: _PendingTurn | None, pending_images: list, quiet: bool) -> int:
    """Read user messages from stdin until EOF or /quit. A bad message (missing image, too
    long) is reported and the chat goes on; the cache is untouched by a rejected turn."""
    from .image_processing import load_image  # noqa: PLC0415

    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message; /image PATH attaches an image to the next one; /quit ends", file=sys.stderr)
    turn = first_turn
    while True:
        if turn is None:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return 0
            line = line.strip()
            if line in ("/quit", "/exit"):
                return 0
            if line.startswith("/image"):
                try:
                    path = line[len("/image"):].strip()
                    if not path:
                        raise CLIError("/image needs a path")
                    pending_images.append(load_image(path))
                except (CLIError, ValueError, OSError) as err:
                    print(f"error: {_one_line(err)}", file=sys.stderr)
                continue
            if not line:
                continue
            turn, pending_images = _PendingTurn(line, pending_images), []
        try:
            stats = _ask(conversation, turn.text, turn.images)
        except (CLIError, ValueError) as err:
            print(f"error: {_one_line(err)}", file=sys.stderr)
        else:
            if not quiet:
                print(stats.describe(), file=sys.stderr)
        turn = None


def _start_tensor_parallel(args: argparse.Namespace):
    """Join torchrun's process group for --tp; every rank runs the same question, rank 0 alone
    writes (the others' output goes nowhere: they compute the same tokens)."""
    from .distributed import init_distributed  # noqa: PLC0415

    if args.chat:
        raise CLIError("--tp answers one question per run; --chat is not supported with it")
    if args.compile:
        raise CLIError("--tp and --compile do not go together (the all-reduces are not compiled)")
    group = init_distributed(args.tp)
    if torch.distributed.get_rank(group) != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (for the process's lifetime)
    return group


def _device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    default_cuda = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.tp is not None else "cuda"
    name = args.device or (default_cuda if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device {name!r} is not a device torch knows ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: this torch has no usable CUDA GPU (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def _choose_weights(weights: str | None, quiet: bool) -> tuple[Path, bool]:
    from . import demo  # noqa: PLC0415

    if weights is not None:
        path = Path(weights)
        if not path.is_dir():
            raise CLIError(f"--weights {weights}: no such folder (see weights/README.md for the download)")
        return path, False
    # The official download wins as soon as its folder has anything in it: a partial download
    # then fails loudly, naming what is missing, instead of silently answering with noise.
    official = demo.weights_root() / demo.OFFICIAL_DIRNAME
    if official.is_dir() and any(official.iterdir()):
        return official, False
    path, built = demo.ensure_demo_checkpoint()
    if built and not quiet:
        print(f"built the tiny random-weight demo checkpoint in {path}", file=sys.stderr)
    return path, True


def _demo_notice(path: Path) -> str:
    from . import demo  # noqa: PLC0415

    return demo.NOISE_NOTICE.format(path=path, official=demo.weights_root() / demo.OFFICIAL_DIRNAME)


def _quantization(args: argparse.Namespace):
    """--quantize / --group-size as a quantize.QuantSpec (None: load as stored)."""
    if args.quantize is None:
        if args.group_size is not None or args.lm_head_bits is not None:
            raise CLIError(f"{'--group-size' if args.group_size is not None else '--lm-head-bits'} goes with "
                           "--quantize int8|int4")
        return None
    if args.tp is not None:
        raise CLIError("--tp and --quantize do not go together (tensor parallelism shards float weights)")
    from .quantize import QuantSpec  # noqa: PLC0415

    return QuantSpec.parse(args.quantize, args.group_size, lm_head_bits=args.lm_head_bits)


def _load(weights: Path, dtype: torch.dtype, device: torch.device, quiet: bool, tp_group=None, quantize=None):
    from .model import Idefics2  # noqa: PLC0415

    if tp_group is not None:
        from .distributed import load_tensor_parallel  # noqa: PLC0415

        return load_tensor_parallel(weights, tp_group, dtype, device)

    bar = ProgressBar(sys.stderr, f"loading {weights}", enabled=not quiet)
    model = Idefics2.from_pretrained(weights, dtype=dtype, device=device, progress=bar, quantize=quantize)
    bar.close()
    return model


class ProgressBar:
    """`bar(done, total)` draws `label [#####.....] done/total files` on one stderr line.
    On a terminal the line is redrawn in place; elsewhere (a log file) only the end is written."""

    def __init__(self, stream: TextIO, label: str, enabled: bool = True, width: int = 30):
        self.stream, self.label, self.enabled, self.width = stream, label, enabled, width
        self.live = enabled and getattr(stream, "isatty", lambda: False)()
        self.last: tuple[int, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        self.last = (done, total)
        if self.live:
            self.stream.write("\r" + self._line(done, total))
            self.stream.flush()

    def _line(self, done: int, total: int) -> str:
        filled = self.width * done // max(total, 1)
        return f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} files"

    def close(self) -> None:
        if not self.enabled or self.last is None:
            return
        self.stream.write(("\r" if self.live else "") + self._line(*self.last) + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------- check


def run_check(folder: str) -> int:
    """`python -m idefics2_mini check DIR`: print what was verified, or every problem found
    (loading.check_checkpoint: the loader's own checks, plus config and tokenizer)."""
    from .loading import check_checkpoint  # noqa: PLC0415
    from .model import Idefics2  # noqa: PLC0415

    problems, findings = check_checkpoint(folder, Idefics2)
    for line in findings:
        print(f"ok    {line}")
    for line in problems:
        print(f"FAIL  {' '.join(line.split())}", file=sys.stderr)
    if problems:
        print(f"{folder}: {len(problems)} problem(s); see weights/README.md", file=sys.stderr)
        return 1
    print(f"{folder}: complete")
    return 0
