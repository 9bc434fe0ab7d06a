"""A small *trained* language model for the quantization benchmark (benchmarks/quantize.py,
part `trained`): the random checkpoint's greedy agreement measures how sensitive a random
network is to any perturbation, not the quantizer; a trained model's answers it.

    python -m benchmarks.trained_lm [--size full|code|quick]   # build (train) the checkpoint if missing

Model: an Idefics2Config whose decoder is small enough to train from random init on one CPU core
in ~20 minutes of CPU time (480 steps of 8 x 128 tokens at ~2.5 s; a 32003-row lm_head is most
of the cost): hidden 256, 4 layers, SwiGLU 768 (3x), 8 query heads x 32 and 2 kv heads (the
8B's 4:1 GQA ratio), vocab 32003 (the real tokenizer's), untied lm_head; a tiny vision tower and
perceiver (unused: text only). 256, 768 are divisible by int4 groups of 32, 64 and 128.

Data: English text that every machine with this Python has, read at run time, nothing
downloaded: the docstrings (longer than 80 characters) of the standard library's modules, classes
and functions (`ast.get_docstring` over sorted `<stdlib>/**/*.py`, skipping test packages,
idlelib, lib2to3, turtledemo, site-packages), and the Python reference's help topics
(`pydoc_data.topics.topics`, the text `help("if")` prints). ~1.9 MB; on Python 3.11.7: 3714
training documents (473 k tokens of the project's tokenizer, with BOS and EOS), 435 held out
(49 k). Documents are split into training and held-out by a hash of their module path (topics:
of their key), 1 in 10 held out, so held-out text comes from modules the model
never saw. The corpus depends on the Python version (3.11 here): its SHA-256 is in the BUILT
marker and the report.

A second model, size "code" (weights/bench/trained-lm-code): the same widths and recipe on the
library's Python source instead, each module-level function and class (with its decorators) a
document, split by module path the same way: ~2.0 M training tokens, 720 steps (740 k tokens,
about a third of an epoch). Prose this model cannot learn well in minutes (its fp32 top-1
probability is ~0.1 on held-out docstrings), so its argmax sits on near-ties; code is
predictable enough that the same small model gets sure of itself (indentation, keywords,
closing brackets, names it has just seen), closer to how a large LM stands on ordinary text. The
quantization benchmark measures both, so a greedy figure is never read without the confidence
of the model it came from.

Training: the project's training code (training.OptimizerStep: AdamW, global gradient norm
clipped at 1; training.learning_rate: warmup then cosine to 0) on the model's own loss
(model(input_ids, labels=...).loss, loss.py), full training of the decoder and lm_head from
a GPT-2-style init (N(0, 0.02), output projections / sqrt(2 x layers)), windows of 128 tokens
drawn at random from the concatenated training documents, fixed step count: 480 x 8 x 128 = 492 k
tokens, about one epoch. Held-out loss 10.41 -> 5.40 nats/token (5.47 at step 360, 5.40 from
step 440 on: flat at the end, where the cosine schedule also ends). A first build of 160 steps
ended at 6.14, still falling when its learning rate ran out, and its greedy text was a loop
(2 distinct tokens in 32): the step count was tripled on that loss curve, started before any
quantized model of it had been measured. Batch and window were set once for CPU time; no
hyperparameter was chosen on the quantized models' agreement. Held-out loss is evaluated every
10 steps on 16 fixed held-out windows; the curve goes into training.json beside the weights (and
quantize-trained-loss.png beside the report).
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VERSION = "trained-lm-v1"
SKIP_PARTS = ("test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages")
HELD_OUT_ONE_IN = 10

# name: (decoder widths, training hyperparameters)
SIZES = {
    "full": dict(hidden=256, intermediate=768, layers=4, heads=8, kv_heads=2, head_dim=32,
                 seq=128, batch=8, steps=480, lr=3e-3, warmup=10, eval_every=10, eval_windows=16),
    # the same model on Python source (module-level functions and classes): code is far more
    # predictable than prose, so a model this small becomes as confident as a large LM is on text
    "code": dict(hidden=256, intermediate=768, layers=4, heads=8, kv_heads=2, head_dim=32, corpus="source",
                 seq=128, batch=8, steps=720, lr=3e-3, warmup=10, eval_every=10, eval_windows=16),
    "quick": dict(hidden=64, intermediate=192, layers=2, heads=2, kv_heads=1, head_dim=32,
                  seq=64, batch=4, steps=24, lr=1e-2, warmup=4, eval_every=8, eval_windows=2),
}


# ============================================================================ data


def _held_out(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % HELD_OUT_ONE_IN == 0


def _library_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py")
                  if not any(part in SKIP_PARTS or part.startswith("test") for part in p.relative_to(root).parts))


def _docstrings(source: str) -> list[str]:
    tree = ast.parse(source)
    docs = [ast.get_docstring(node) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [d for d in docs if d and len(d) > 80]


def _definitions(source: str) -> list[str]:
    """The source of each module-level function and class (with its decorators)."""
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            text = "".join(lines[first - 1 : node.end_lineno]).rstrip()
            if len(text) > 80:
                out.append(text)
    return out


@functools.lru_cache(maxsize=3)
def corpus(size: str = "full") -> tuple[list[str], list[str], str]:
    """(training documents, held-out documents, SHA-256 of both): see the module docstring. The
    quick size (the tests) takes the help topics only (no parse of the whole library)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    source = SIZES[size].get("corpus") == "source"
    split = _definitions if source else _docstrings
    train, held = [], []
    for file in [] if size == "quick" else _library_files(root):
        try:
            docs = split(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        key = str(file.relative_to(root))
        (held if _held_out(key) else train).extend(docs)
    if not source:
        try:
            from pydoc_data.topics import topics  # noqa: PLC0415
        except ImportError:
            topics = {}
        for key in sorted(topics):
            (held if _held_out("topic:" + key) else train).append(topics[key].strip())
    digest = hashlib.sha256("\x00".join(train + ["\x01"] + held).encode()).hexdigest()
    return train, held, digest


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from idefics2_mini.tokenizer import Idefics2Tokenizer  # noqa: PLC0415

    return Idefics2Tokenizer.from_pretrained(None)


def token_stream(documents: list[str]) -> torch.Tensor:
    """The documents tokenized (each with BOS, then EOS), concatenated: int64 [N]."""
    tokenizer = _tokenizer()
    eos = tokenizer.convert_tokens_to_ids("</s>")
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer.encode(doc, add_bos=True) + [eos]
    return torch.tensor(ids, dtype=torch.long)


def held_windows(held: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """`count` evenly spaced windows of `length` held-out tokens [count, length] (fixed)."""
    starts = torch.linspace(0, len(held) - length - 1, count).long()
    return torch.stack([held[s : s + length] for s in starts.tolist()])


# ============================================================================ model


def config(size: str):
    import idefics2_mini as im  # noqa: PLC0415

    s = SIZES[size]
    return im.Idefics2Config(
        vision=im.VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
        perceiver=im.PerceiverConfig(hidden_size=s["hidden"], resampler_n_latents=8, resampler_depth=1,
                                     resampler_n_heads=2, resampler_head_dim=32, num_key_value_heads=1),
        text=im.TextConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                           num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                           max_position_embeddings=4096, sliding_window=None),
    )


def init_weights(model, generator: torch.Generator) -> None:
    """GPT-2-style: linears and embeddings N(0, 0.02), the residual branches' output projections
    (o_proj, down_proj) N(0, 0.02 / sqrt(2 layers)); norms 1, biases 0."""
    layers = model.config.text.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)


# ============================================================================ training


def train(size: str, log=print) -> tuple:
    """Train the model of `size` on the corpus; returns (model, history dict)."""
    import idefics2_mini as im  # noqa: PLC0415
    from idefics2_mini.training import OptimizerStep, learning_rate, set_trainable, trainable_parameters  # noqa: PLC0415

    s = SIZES[size]
    torch.manual_seed(0)
    train_docs, held_docs, digest = corpus(size)
    train_ids, held_ids = token_stream(train_docs), token_stream(held_docs)
    log(f"corpus: {len(train_docs)} training documents ({len(train_ids):,} tokens), {len(held_docs)} held out "
        f"({len(held_ids):,} tokens), sha256 {digest[:12]}")
    model = im.Idefics2(config(size))
    generator = torch.Generator().manual_seed(0)
    init_weights(model, generator)
    model.requires_grad_(False)
    set_trainable(model, [r"text\..*", r"lm_head\..*"])
    step_fn = OptimizerStep(trainable_parameters(model), lr=s["lr"], betas=(0.9, 0.95), clip_norm=1.0)
    evaluation = held_windows(held_ids, s["eval_windows"], s["seq"])
    history = dict(step=[], loss=[], eval_step=[], eval_loss=[], seconds=0.0, tokens=0)

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(evaluation, labels=evaluation, keep_logits=False).loss.item()
        model.train()
        return loss

    start = time.perf_counter()
    model.train()
    for step in range(s["steps"]):
        if step % s["eval_every"] == 0:
            history["eval_step"].append(step)
            history["eval_loss"].append(held_loss())
        starts = torch.randint(0, len(train_ids) - s["seq"], (s["batch"],), generator=generator)
        batch = torch.stack([train_ids[i : i + s["seq"]] for i in starts.tolist()])
        step_fn.lr = learning_rate(step, s["steps"], s["lr"], s["warmup"], "cosine")
        loss = model(batch, labels=batch, keep_logits=False).loss
        loss.backward()
        step_fn()
        history["step"].append(step)
        history["loss"].append(loss.item())
        if step % 10 == 0 or step == s["steps"] - 1:
            rate = (step + 1) * batch.numel() / (time.perf_counter() - start)
            log(f"  step {step:4d}  loss {loss.item():.3f}  held-out {history['eval_loss'][-1]:.3f}  "
                f"lr {step_fn.lr:.2e}  {rate:.0f} tok/s")
    history["eval_step"].append(s["steps"])
    history["eval_loss"].append(held_loss())
    history["seconds"] = time.perf_counter() - start
    history["tokens"] = s["steps"] * s["batch"] * s["seq"]
    history.update(corpus_sha256=digest, train_tokens=len(train_ids), held_tokens=len(held_ids),
                   train_documents=len(train_docs), held_documents=len(held_docs), size=size, hyper=s,
                   python=sys.version.split()[0], threads=torch.get_num_threads())
    model.eval().requires_grad_(False)
    return model, history


def marker(size: str) -> str:
    return json.dumps(config(size).to_dict(), sort_keys=True) + json.dumps(SIZES[size], sort_keys=True) + \
        f" {VERSION} {corpus(size)[2]}"


def checkpoint_name(size: str) -> str:
    """The folder under weights/bench/ of the model of `size`."""
    return "trained-lm" if size == "full" else f"trained-lm-{size}"


def build(path: Path, size: str, log=print) -> dict:
    """Train and save the checkpoint at `path` unless its BUILT marker matches; returns the
    training history (training.json)."""
    from idefics2_mini.loading import save_checkpoint  # noqa: PLC0415

    expected = marker(size)
    if (path / "BUILT").is_file() and (path / "BUILT").read_text() == expected:
        return json.loads((path / "training.json").read_text())
    log(f"training {path} ({size}) ...")
    model, history = train(size, log)
    staging = path.with_name(path.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(model, staging)
    (staging / "training.json").write_text(json.dumps(history) + "\n")
    (staging / "BUILT").write_text(expected)
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    log(f"trained in {history['seconds']:.0f} s; held-out loss {history['eval_loss'][0]:.3f} -> "
        f"{history['eval_loss'][-1]:.3f}")
    return history


def plot(history: dict, file: Path) -> Path:
    """The loss curve (training loss, running mean over 10 steps; held-out loss) as a PNG."""
    from idefics2_mini.plots import line_chart  # noqa: PLC0415

    losses = history["loss"]
    smooth = [sum(losses[max(0, i - 9) : i + 1]) / len(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
    return line_chart(file, {"training (mean of 10 steps)": (history["step"], smooth),
                             "held-out": (history["eval_step"], history["eval_loss"])},
                      title=f"trained LM for the quantization benchmark: {history['hyper']['hidden']} wide, "
                            f"{history['hyper']['layers']} layers, {history['seconds'] / 60:.1f} min wall-clock",
                      x_label="step", y_label="loss (nats/token)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: docstrings; code: Python source; quick: the tests' tiny one")
    parser.add_argument("--quick", action="store_true", help="the same as --size quick")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", default=str(ROOT / "weights" / "bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else args.size
    build(Path(args.weights) / checkpoint_name(size), size,
          log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
