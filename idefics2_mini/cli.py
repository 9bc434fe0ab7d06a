"""The command line: ask Idefics2 about images, one question or a chat; check a download.

    python -m idefics2_mini --image cat.png "What animal is in this picture?"
    python -m idefics2_mini --chat [--image cat.png] ["first question"]
    python -m idefics2_mini check weights/idefics2-8b

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
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

DEBUG_ENV = "IDEFICS2_MINI_DEBUG"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
END_OF_UTTERANCE_ID = 32002
EOS_ID = 2  # </s>
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
        epilog="Subcommand: `python -m idefics2_mini check DIR` verifies a downloaded checkpoint folder "
        "(`check` is a subcommand only as the first argument).",
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
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with torch.compile: faster tokens after a one-time "
                        "compile of ~10-30 s (on a CPU it needs a C++ compiler)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no timings")
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


@dataclass
class GenerationOptions:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None

    @classmethod
    def from_args(cls, args: argparse.Namespace, is_demo: bool = False) -> GenerationOptions:
        max_new_tokens = args.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = DEMO_MAX_NEW_TOKENS if is_demo else DEFAULT_MAX_NEW_TOKENS
        if max_new_tokens < 1:
            raise CLIError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if args.top_k is not None and args.top_k < 1:
            raise CLIError(f"--top-k must be at least 1, got {args.top_k}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
        if args.temperature is not None and args.temperature < 0:
            raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
        wants_filters = args.top_k is not None or args.top_p is not None
        if args.temperature == 0 and wants_filters:
            raise CLIError("--top-k/--top-p sample, but --temperature 0 means greedy: drop one of them")
        do_sample = (args.temperature is not None and args.temperature > 0) or wants_filters
        temperature = args.temperature if args.temperature else 1.0
        return cls(max_new_tokens, do_sample, temperature, args.top_k, args.top_p, args.seed)


# ---------------------------------------------------------------------------- conversation


@dataclass
class TurnStats:
    prompt_tokens: int  # tokens fed to the model this turn (after a first turn: only the new ones)
    new_tokens: int
    prefill_seconds: float  # from the start of generate to the first token (vision + prefill)
    decode_seconds: float  # from the first token to the last

    def describe(self) -> str:
        speed = f"{(self.new_tokens - 1) / self.decode_seconds:.1f} tokens/s" if self.new_tokens > 1 and \
            self.decode_seconds > 0 else "n/a"
        return (f"prefill {self.prompt_tokens} tokens {self.prefill_seconds:.3f} s (time to first token) · "
                f"decode {self.new_tokens} tokens {speed}")


class Conversation:
    """One chat with the model; the KV cache lives across turns.

    Turn 1 is the chat template's rendering of the user message (with BOS). A later turn feeds
    only what the cache has not seen: the previous answer's last token, the <end_of_utterance>
    that closes the answer (when the answer stopped without one), then

        "\\nUser: <text><end_of_utterance>\\nAssistant:"

    tokenized on its own. The tokenizer encodes every stretch of text between special tokens
    separately, so these ids equal the tail of the whole conversation rendered by the chat
    template and tokenized in one go (tests/test_cli.py checks it).
    """

    def __init__(self, model, processor, options: GenerationOptions, max_total_tokens: int | None = None):
        """max_total_tokens: what all turns together may hold (default: the model's maximum
        positions). The KV cache is bounded by the sliding window whatever this is."""
        from .generation import start_conversation  # noqa: PLC0415

        self.model = model
        self.processor = processor
        self.options = options
        self.max_total_tokens = max_total_tokens or model.config.text.max_position_embeddings
        self.state = start_conversation(model, self.max_total_tokens)
        self.turns = 0

    @staticmethod
    def user_message(text: str, num_images: int) -> dict:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
        return {"role": "user", "content": content}

    def turn_inputs(self, text: str, images: Sequence) -> dict[str, torch.Tensor]:
        """The model inputs for one user turn: input_ids [1, T] (+ attention_mask, and
        pixel_values / pixel_attention_mask when the turn has images)."""
        from .processor import render_chat  # noqa: PLC0415

        message = self.user_message(text, len(images))
        if self.turns == 0:
            prompt = render_chat([message], add_generation_prompt=True)
            return self.processor(text=prompt, images=list(images) or None)
        batch = self.processor(text="\n" + render_chat([message], add_generation_prompt=True),
                               images=list(images) or None)
        new_ids = batch["input_ids"][:, 1:]  # the processor always starts with BOS; mid-chat there is none
        ids = torch.cat([self._close_previous_answer(), new_ids], dim=1)
        batch["input_ids"], batch["attention_mask"] = ids, torch.ones_like(ids)
        return batch

    def _close_previous_answer(self) -> torch.Tensor:
        """[1, k]: the answer tokens the cache has not seen, ending in <end_of_utterance>.

        The chat template closes every turn with <end_of_utterance>. If the answer ended with it,
        it is already there (not yet in the cache); if it ended with </s>, that token is dropped
        (the template has no </s> there; it was never fed, so the cache is unaffected); if
        --max-new-tokens cut it short, one is added."""
        unseen = self.state.unseen[0].tolist()
        if unseen and unseen[-1] == EOS_ID:
            unseen = unseen[:-1]
            self.state.tokens = self.state.tokens[:, :-1]
        if not unseen or unseen[-1] != END_OF_UTTERANCE_ID:
            unseen.append(END_OF_UTTERANCE_ID)
        return torch.tensor([unseen], dtype=torch.long)

    def check_fits(self, batch: dict[str, torch.Tensor]) -> int:
        """Raise CLIError if this turn's prompt cannot fit; returns max_new_tokens for it
        (fewer than asked when the conversation is close to the model's limit)."""
        prompt_tokens = batch["input_ids"].shape[1]
        room = self.max_total_tokens - self.state.cache.num_tokens
        limit = self.model.config.text.max_position_embeddings
        if prompt_tokens + self.options.max_new_tokens > room and self.turns == 0:
            raise CLIError(
                f"the prompt is {prompt_tokens} tokens; with --max-new-tokens {self.options.max_new_tokens} that is "
                f"{prompt_tokens + self.options.max_new_tokens}, more than the model's maximum of {limit} positions "
                "(text_config.max_position_embeddings): shorten the prompt or use fewer/smaller images"
            )
        if prompt_tokens + 1 > room:
            raise CLIError(
                f"this message is {prompt_tokens} tokens but the conversation has room for only {room} more "
                f"(the model's maximum is {limit} positions): start a new chat"
            )
        return min(self.options.max_new_tokens, room - prompt_tokens)

    def answer(self, batch: dict[str, torch.Tensor], on_text: Callable[[str], None]) -> TurnStats:
        """Generate the answer to `batch` (from `turn_inputs`), calling `on_text` with each
        piece of text as soon as it is final. Returns the turn's timings."""
        from .tokenizer import TextStreamDecoder  # noqa: PLC0415

        max_new_tokens = self.check_fits(batch)
        device = self.model.device
        batch = {name: value.to(device) for name, value in batch.items()}
        decoder = TextStreamDecoder(self.processor.tokenizer, skip_special_tokens=True)
        token_times: list[float] = []

        def stream(token: torch.Tensor) -> None:
            token_times.append(time.perf_counter())
            if piece := decoder.push(int(token[0])):
                on_text(piece)

        start = time.perf_counter()
        self.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=self.options.do_sample,
            temperature=self.options.temperature, top_k=self.options.top_k, top_p=self.options.top_p,
            seed=self.options.seed, streamer=stream, state=self.state,
        )
        if tail := decoder.flush():
            on_text(tail)
        self.turns += 1
        first, last = (token_times[0], token_times[-1]) if token_times else (start, start)
        return TurnStats(batch["input_ids"].shape[1], len(token_times), first - start, last - first)


# ---------------------------------------------------------------------------- running


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m idefics2_mini`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # a terminal that cannot show a character gets "?"
    try:
        if argv[:1] == ["check"]:
            return run_check(build_check_parser().parse_args(argv[1:]).folder)
        if argv[:1] == ["finetune"]:
            from .finetune import main as finetune_main  # noqa: PLC0415  (training code only when asked)

            return finetune_main(argv[1:])
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


def _one_line(err: BaseException) -> str:
    if isinstance(err, (CLIError, ValueError, OSError, RuntimeError)):
        message = str(err) or type(err).__name__
    else:  # not an input problem we anticipated: say what kind, so a bug report has something to go on
        message = f"{type(err).__name__}: {err} (set {DEBUG_ENV}=1 for the traceback)"
    return " ".join(message.split())


def run(args: argparse.Namespace) -> int:
    from .image_processing import load_image  # noqa: PLC0415
    from .processor import Idefics2Processor  # noqa: PLC0415

    GenerationOptions.from_args(args)  # bad option values fail before anything is built
    if args.chat and args.prompt == "-":
        raise CLIError('with --chat the messages come from stdin; give the first one as text, not "-"')
    prompt = sys.stdin.read().strip() if args.prompt == "-" else args.prompt
    if not args.chat and not prompt:
        raise CLIError('give a prompt, e.g. python -m idefics2_mini --image cat.png "What is this?", or use --chat')
    device, dtype = _device_and_dtype(args)
    err = sys.stderr

    # Inputs first: a missing image or a too-long prompt should not cost a 30 GB load.
    images = [load_image(path) for path in args.image]
    weights, is_demo = _choose_weights(args.weights, quiet=args.quiet)
    options = GenerationOptions.from_args(args, is_demo)
    problems, _ = check_checkpoint(weights, require_tokenizer=False)
    if problems:
        raise CLIError(f"{weights}: {problems[0]} (run `python -m idefics2_mini check {weights}` for details)")
    split = {} if args.split_images is None else {"do_image_splitting": args.split_images}
    processor = Idefics2Processor.from_pretrained(weights, **split)
    first_turn = None
    if prompt:
        first_turn = _PendingTurn(prompt, images)
        _check_prompt_length(processor, weights, first_turn, options)

    start = time.perf_counter()
    model = _load(weights, dtype, device, quiet=args.quiet)
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


def _ask(conversation: Conversation, text: str, images: list) -> TurnStats:
    batch = conversation.turn_inputs(text, images)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    stats = conversation.answer(batch, write)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return stats


def _chat(conversation: Conversation, first_turn: _PendingTurn | None, pending_images: list, quiet: bool) -> int:
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


def _device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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


def _check_prompt_length(processor, weights: Path, turn: _PendingTurn, options: GenerationOptions) -> None:
    """Tokenize the first turn as the model will see it and check it fits, before loading."""
    from .config import Idefics2Config  # noqa: PLC0415
    from .processor import render_chat  # noqa: PLC0415

    limit = Idefics2Config.from_pretrained(weights).text.max_position_embeddings
    prompt = render_chat([Conversation.user_message(turn.text, len(turn.images))], add_generation_prompt=True)
    # Text only: the image tokens are counted without decoding pixels twice.
    expanded = processor.expand_image_tokens(prompt)
    tokens = turn.tokens = len(processor.tokenizer.encode(expanded, add_bos=True))
    if tokens + options.max_new_tokens > limit:
        raise CLIError(
            f"the prompt is {tokens} tokens; with --max-new-tokens {options.max_new_tokens} that is "
            f"{tokens + options.max_new_tokens}, more than the model's maximum of {limit} positions "
            "(text_config.max_position_embeddings): shorten the prompt or use fewer/smaller images"
        )


def _load(weights: Path, dtype: torch.dtype, device: torch.device, quiet: bool):
    from .model import Idefics2  # noqa: PLC0415

    bar = ProgressBar(sys.stderr, f"loading {weights}", enabled=not quiet)
    model = Idefics2.from_pretrained(weights, dtype=dtype, device=device, progress=bar)
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


def check_checkpoint(folder: str | Path, require_tokenizer: bool = True) -> tuple[list[str], list[str]]:
    """Verify a checkpoint folder without loading any weights: (problems, findings).

    Reads config.json, the index and every shard's safetensors header (not the data), so it
    takes seconds even for the 33.6 GB official download. Problems found: config.json missing or
    invalid; a shard named by the index missing; a shard truncated or with a corrupt header (a
    tensor's bytes run past the end of the file); the index and a shard disagreeing on which
    tensors it holds; tensors the config needs missing, unexpected, or of the wrong shape;
    tokenizer.model missing or not the 32000-piece Mistral SentencePiece model.
    """
    from .config import Idefics2Config  # noqa: PLC0415
    from .loading import INDEX_FILE, SINGLE_FILE, CheckpointError, read_header  # noqa: PLC0415

    folder = Path(folder)
    problems: list[str] = []
    findings: list[str] = []
    if not folder.is_dir():
        return [f"{folder} is not a folder"], findings

    config = None
    try:
        config = Idefics2Config.from_pretrained(folder)
        findings.append(f"config.json: {config.text.num_hidden_layers} decoder layers, "
                        f"{config.vision.num_hidden_layers} vision layers, vocab {config.text.vocab_size}")
    except (OSError, ValueError) as err:
        problems.append(f"config.json: {err}")

    # name -> (shape, bytes) of every tensor the shards hold
    held: dict[str, tuple[list[int], int]] = {}
    index_path, single_path = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"'weight_map' is a {type(weight_map).__name__}")
        except (ValueError, KeyError, TypeError) as err:
            return problems + [f"{INDEX_FILE} is not a valid index (needs a 'weight_map' object): {err}"], findings
        shards = sorted(set(weight_map.values()))
        findings.append(f"{INDEX_FILE}: {len(weight_map)} tensors in {len(shards)} shard(s)")
        for shard in shards:
            listed = {name for name, file in weight_map.items() if file == shard}
            if not (folder / shard).is_file():
                problems.append(f"missing shard {shard} (the index puts {len(listed)} tensors in it)")
                continue
            try:
                header, _ = read_header(folder / shard)
            except CheckpointError as err:
                problems.append(str(err))
                continue
            _compare_shard(shard, listed, set(header), problems)
            held.update(_sizes(header))
    elif single_path.is_file():
        try:
            held.update(_sizes(read_header(single_path)[0]))
            findings.append(f"{SINGLE_FILE}: {len(held)} tensors")
        except CheckpointError as err:
            problems.append(str(err))
    else:
        problems.append(f"no weights: the folder holds neither {INDEX_FILE} (+ shards) nor {SINGLE_FILE}")

    if config is not None and held and not problems:
        _compare_with_config(config, held, problems)
        total = sum(size for _, size in held.values())
        findings.append(f"tensors: all {len(held)} present, {total / 1e9:.2f} GB")

    tokenizer_path = folder / "tokenizer.model"
    if tokenizer_path.is_file():
        try:
            from .tokenizer import Idefics2Tokenizer  # noqa: PLC0415

            Idefics2Tokenizer(tokenizer_path)
            findings.append("tokenizer.model: ok")
        except (OSError, RuntimeError, ValueError) as err:
            problems.append(f"tokenizer.model: {err}")
    elif require_tokenizer:
        problems.append(
            "tokenizer.model is missing: copy weights/tokenizer.model (the same Mistral-7B-v0.1 SentencePiece "
            f"model) into {folder}"
        )
    return problems, findings


def _sizes(header: dict[str, dict]) -> dict[str, tuple[list[int], int]]:
    return {name: (list(entry["shape"]), entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in header.items()}


def _shown(names: set[str] | list[str], limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _compare_shard(shard: str, listed: set[str], held: set[str], problems: list[str]) -> None:
    if listed - held:
        problems.append(f"{shard} lacks {len(listed - held)} tensor(s) the index puts in it: {_shown(listed - held)}")
    if held - listed:
        problems.append(f"{shard} holds {len(held - listed)} tensor(s) the index does not list: {_shown(held - listed)}")


def _compare_with_config(config, held: dict[str, tuple[list[int], int]], problems: list[str]) -> None:
    """Every tensor the model built from config.json needs, with its shape; nothing else."""
    from .loading import ours_to_official  # noqa: PLC0415
    from .model import Idefics2  # noqa: PLC0415

    with torch.device("meta"):  # shapes only, no memory
        model = Idefics2(config)
    expected = {ours_to_official(name): list(param.shape) for name, param in model.named_parameters()}
    if config.text.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = set(expected) - set(held)
    unexpected = set(held) - set(expected)
    if missing:
        problems.append(f"{len(missing)} tensor(s) that config.json needs are in no shard: {_shown(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model does not have: {_shown(unexpected)}")
    wrong = [f"{name} is {held[name][0]}, config needs {shape}" for name, shape in sorted(expected.items())
             if name in held and held[name][0] != shape]
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: " + "; ".join(wrong[:3]))


def run_check(folder: str) -> int:
    """`python -m idefics2_mini check DIR`: print what was verified, or every problem found."""
    problems, findings = check_checkpoint(folder)
    for line in findings:
        print(f"ok    {line}")
    for line in problems:
        print(f"FAIL  {' '.join(line.split())}", file=sys.stderr)
    if problems:
        print(f"{folder}: {len(problems)} problem(s); see weights/README.md", file=sys.stderr)
        return 1
    print(f"{folder}: complete")
    return 0
