"""Weight-only int8 / int4 against fp32 and bf16 (and the reference, transformers, fp32): decode
speed, load, memory, and accuracy, on an 8B-wide checkpoint with realistic weight statistics,
and accuracy on a small trained language model.

    python -m benchmarks.quantize                    # ops + decode + accuracy + trained, ~20 min on 2 CPU cores
    python -m benchmarks.quantize --parts ops        # one part: ops, decode, accuracy, trained
    python -m benchmarks.quantize --quick            # smoke run on a tiny checkpoint (the tests)

The checkpoint (built once under weights/bench/, git-ignored): the real Idefics2-8B widths
(decoder 4096 / 14336, 32 / 8 heads, vocab 32003; perceiver full, 3 layers; vision 1152, 2
layers) with 2 decoder layers, e2e.py's "wide" shape, but with weights drawn to look like a
trained LLM's where it matters for quantization, instead of plain Gaussians (version
"realistic-v2"):

    W[n, k] = 0.02 * r[n] * c[k] * z * exp(0.4 u)        z, u ~ N(0, 1)
    r ~ LogNormal(0, 0.25) per output row, c ~ LogNormal(0, 0.25) per input column:

heavy tails (a Gaussian scale mixture: kurtosis ~5.7 instead of 3; trained LLM matrices are
~3-10) and rows and columns of different sizes, which is what makes a per-channel or per-group
absmax scale coarse. Measured on 512 x 4096 draws (per row: kurtosis, max|w| / rms; then the
relative error of x W^T for isotropic x after quantizing): this checkpoint 7.2, 7.2, int8 1.7%,
int4 g64 11.3%; a Gaussian 3.0, 3.8, 0.9%, 9.0%; a Laplace 6.0, 6.2, 1.5%, 11.1%. So it sits
with the Laplace, a little heavier-tailed than QLoRA's "normally distributed" weights: per-layer
int8 errors of ~1.5-2% here would be ~1% on a Gaussian model. The outliers are in the activations, as in trained LLMs (LLM.int8,
SmoothQuant, AWQ: activations have a few large channels, weights are comparatively easy): the
decoder's input / post-attention norm weights are 5x on the same 0.5% of the residual channels,
so those channels' weight errors count 5x. Other norm weights ~ LogNormal(0, 0.2).

Confident predictions: a random network's next-token distribution is nearly flat (top-1
probability ~1e-4 of 32003 tokens), so any perturbation flips its argmax and greedy agreement
says nothing; a trained LM is usually confident (top-1 probability often 0.3-0.9, with some
close calls). Scaling the logits would not change that (argmax is scale-invariant: the margin
and the quantization error scale together); what a trained model has is a final hidden state
aligned with the row of the token it predicts. Built here as a direct (bigram) path, the one
circuit a 2-layer model can have without training: embeddings ~ N(0, 1) (so the token survives
the residual stream next to the random layers' outputs: the final hidden state keeps cos ~0.09
with it), and each lm_head row is a random row plus BIGRAM_GAIN (1.4) x a weighted sum of 3 unit
embedding directions (strengths ~ LogNormal(0, 0.5)): after token t the model favours the 3
tokens whose rows hold t's direction, by varying margins (some near-ties), while attention and
the MLPs add context-dependent noise. The gain is the one free constant: set once (0.45 gave a
median top-1 probability of 0.07; 1.4 gives ~0.7, quartiles ~0.47-0.92, on 6 of the prompts
with a tiny vision tower) to put the fp32 model's confidence where a trained LM's usually is,
not tuned on the quantized models' agreement. The run reports the fp32 top-1 probability at its
greedy steps and on the text (quantiles) beside the agreement.
Parts (each variant in its own fresh process, page cache warm):
  ops       one decode-sized linear (14336 x 4096 the MLP's gate/up, 4096 x 14336 its down, 32003 x 4096
            the lm_head) at 1 and 8 rows: fp32 and bf16 (ours: CpuLinear), ours int8 / int4 (qmatmul.c,
            each of its paths: quantize/cpu.py), and torch's packed CPU ops (`_weight_int8pack_mm`,
            `_weight_int4pack_mm_for_cpu`): ms and GB/s of the bytes each reads. Each call reads
            another copy of the weight, from copies adding up to 256 MiB, so no weight is timed from
            the last-level cache (an int4 14336 x 4096 is about the size of an EPYC's L3).
  decode    per variant: load time and peak memory of the load (VmHWM above the process's RSS before
            loading, against the loaded model's bytes), decode tokens/s at batch 1 and 8 (greedy, 33
            new tokens: the time from the first new token to the last / 32, each token's time taken
            by a streamer, so the prefill is not in it; the median of the repeats. The quantized
            models prefill through dequantize-and-matmul, slow and variable: as t(33) - t(1) its
            noise moved the decode figures by 2x and more), and decode as bandwidth: the bytes a step
            reads (decoder + final norm + lm_head as stored, the B embedding rows, the KV cache)
            times steps/s, against this machine's measured read bandwidth (torch.sum, common.py).
            Every variant runs --rounds times (default 2), interleaved, and its fastest round is
            reported (this VM's read bandwidth moves by +-30% from minute to minute).
            Variants: ours fp32 (mapped), ours bf16, ours int8 and int4 g64 (its lm_head int8, the
            default, and int4) quantized while loading the fp32 files, int8 / int4 g64 / int4 g32
            loaded from quantized checkpoints, the reference fp32.
  accuracy  the quantized models against ours fp32, same inputs: each quantized linear's output error
            on its own input (relative Frobenius), teacher-forced top-1 agreement and mean NLL on a
            ~200-token text, and greedy continuations (24 tokens) of 16 held prompts; a control (fp32
            with Gaussian noise giving each layer int8's output error, and int4's). This random network is far more
            sensitive than a trained LM (int8 KL ~0.1 nats/token here, ~0.001 for trained 7B LMs), so its
            greedy figures say more about the network than about the quantizer: hence
  trained   the same measurements (accuracy_against_fp32) on two small LMs trained from random init on
            text this machine has (benchmarks/trained_lm.py: 256 wide, 4 layers; one on the standard
            library's docstrings, weak on held-out prose (top-1 probability ~0.1), one on its source
            code, where a model this small gets as sure of itself as big LMs are on text; each trained
            once, ~20-30 min, saved under weights/bench/trained-lm[-code], rebuilt when its BUILT
            marker differs): held-out text teacher-forced (top-1 agreement, also by fp32's confidence
            at the position, KL, NLL difference), greedy continuations (32 tokens) of 24 held-out
            document openings, the fp32 model's confidence, per-layer errors against the
            uniform-rounding prediction, the noise controls; the loss curves as
            quantize-trained[-code]-loss.png beside the report.

Results: benchmarks/results/<machine>/quantize.md (+ .json). Other engineers' tests may share the
CPU while it runs: each decode process records the other processes' CPU use (0% = quiet).
"""

from __future__ import annotations

import argparse
import importlib.util
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

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "QUANTIZE-RESULT "
REFERENCE = "reference fp32 (transformers)"
NEW_TOKENS = 33
HELD_PROMPTS = [
    "User: Write a short story about a lighthouse keeper who finds a message in a bottle.<end_of_utterance>\nAssistant:",
    "User: What is the capital of France?<end_of_utterance>\nAssistant:",
    "User: Explain in simple words why the sky is blue during the day and red at sunset.<end_of_utterance>\nAssistant:",
    "User: List three fruits.<end_of_utterance>\nAssistant:",
    "User: Translate 'good morning, how are you today?' into German and Italian.<end_of_utterance>\nAssistant:",
    "User: How many legs does a spider have, and how many does an insect have?<end_of_utterance>\nAssistant:",
    "User: Give me a recipe idea with tomatoes, basil and some cheese.<end_of_utterance>\nAssistant:",
    "User: Hello!<end_of_utterance>\nAssistant:",
    "User: Summarise the plot of a detective novel in two sentences.<end_of_utterance>\nAssistant:",
    "User: Which is heavier, a kilogram of feathers or a kilogram of iron?<end_of_utterance>\nAssistant:",
    "User: Describe the smell of rain to someone who has never experienced it.<end_of_utterance>\nAssistant:",
    "User: Suggest a name for a small bakery by the sea.<end_of_utterance>\nAssistant:",
    "User: What should I pack for a weekend of hiking in the mountains?<end_of_utterance>\nAssistant:",
    "User: Why do cats purr?<end_of_utterance>\nAssistant:",
    "User: Write a haiku about autumn leaves.<end_of_utterance>\nAssistant:",
    "User: What is two plus two?<end_of_utterance>\nAssistant:",
]
TEXT = (
    "The lighthouse stood at the edge of the cliff, its white paint peeling in long strips after decades of salt "
    "and wind. Every evening the keeper climbed the one hundred and twelve steps to the lamp room, wiped the great "
    "lens with a soft cloth, and lit the wick. Ships passing in the night saw the beam sweep across the water once "
    "every ten seconds, a signal that had not changed in a hundred years. One morning, walking along the shore "
    "below, the keeper found a green glass bottle wedged between two rocks. Inside was a rolled sheet of paper, "
    "dry despite the sea, and on it, in careful handwriting, a single question: who keeps the light when the "
    "keeper sleeps? He read it three times, then put it in his pocket and went back up the hill to make tea."
)


# ============================================================================ the checkpoint


def bench_config(quick: bool):
    import idefics2_mini as im  # noqa: PLC0415

    if quick:
        return im.Idefics2Config(
            vision=im.VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4),
            perceiver=im.PerceiverConfig(hidden_size=128, resampler_n_latents=64, resampler_depth=1,
                                         resampler_n_heads=4, resampler_head_dim=32, num_key_value_heads=2),
            text=im.TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32),
        )
    return im.Idefics2Config(vision=im.VisionConfig(num_hidden_layers=2), perceiver=im.PerceiverConfig(),
                             text=im.TextConfig(num_hidden_layers=2))


def realistic_tensor(name: str, shape: list[int], generator: torch.Generator, outlier_columns: torch.Tensor,
                     width: int) -> torch.Tensor:
    """One tensor of the checkpoint, drawn as the module docstring says (lm_head: `bigram_head`)."""
    if len(shape) == 1:
        if name.endswith("bias"):
            return torch.randn(shape, generator=generator) * 0.01
        norm = torch.exp(torch.randn(shape, generator=generator) * 0.2)  # norm weights
        if name.startswith("text.layers.") and shape[0] == width:  # activation outlier channels
            norm[outlier_columns] *= 5.0
        return norm
    if name == "text.embed_tokens.weight":
        return torch.randn(shape, generator=generator)
    if "embed" in name or "position_embedding" in name or "latents" in name:
        return torch.randn(shape, generator=generator) * 0.02
    rows, cols = shape[0], math.prod(shape[1:])
    weight = torch.randn(rows, cols, generator=generator)
    weight *= torch.exp(0.4 * torch.randn(rows, cols, generator=generator))
    row_scale = torch.exp(0.25 * torch.randn(rows, 1, generator=generator))
    col_scale = torch.exp(0.25 * torch.randn(1, cols, generator=generator))
    weight *= row_scale * col_scale * 0.02
    return weight.view(shape)


BIGRAM_SOURCES, BIGRAM_GAIN = 3, 1.4


def bigram_head(random_rows: torch.Tensor, embeddings: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """lm_head [V, D]: `random_rows` plus BIGRAM_GAIN x, for each row, a LogNormal(0, 0.5)-weighted sum
    of BIGRAM_SOURCES unit embedding rows (a random permutation each): the direct path of the
    module docstring."""
    vocab = embeddings.shape[0]
    unit = embeddings / embeddings.norm(dim=1, keepdim=True)
    head = random_rows.clone()
    for _ in range(BIGRAM_SOURCES):
        sources = torch.randperm(vocab, generator=generator)
        strength = torch.exp(0.5 * torch.randn(vocab, 1, generator=generator))
        head += BIGRAM_GAIN * strength * unit[sources]
    return head


def build_checkpoint(path: Path, quick: bool) -> None:
    """Write the checkpoint tensor by tensor into shards of <= 2 GiB (never the whole model in
    memory); a BUILT marker with the config says it is complete."""
    from safetensors.torch import save_file  # noqa: PLC0415

    import idefics2_mini as im  # noqa: PLC0415
    from idefics2_mini import loading  # noqa: PLC0415

    config = bench_config(quick)
    marker = json.dumps(config.to_dict(), sort_keys=True) + " realistic-v2"
    if (path / "BUILT").is_file() and (path / "BUILT").read_text() == marker:
        return
    print(f"building {path} ...", flush=True)
    staging = path.with_name(path.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with torch.device("meta"):
        model = im.Idefics2(config)
    generator = torch.Generator().manual_seed(0)
    width = config.text.hidden_size
    outliers = torch.randperm(width, generator=generator)[: max(1, width // 200)]
    shard, shard_bytes, shards, weight_map = {}, 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            save_file(shard, str(staging / f"shard-{len(shards) + 1}"), metadata={"format": "pt"})
            shards.append(list(shard))
            shard, shard_bytes = {}, 0

    embeddings = None
    for name, param in model.named_parameters():
        official = loading.ours_to_official(name)
        tensor = realistic_tensor(name, list(param.shape), generator, outliers, width).contiguous()
        if name == "text.embed_tokens.weight":
            embeddings = tensor
        elif name == "lm_head.weight":
            tensor = bigram_head(tensor, embeddings, generator).contiguous()
        if shard_bytes + tensor.numel() * 4 > 2 * 2**30:
            flush()
        shard[official] = tensor
        shard_bytes += tensor.numel() * 4
    flush()
    total = len(shards)
    for index, names in enumerate(shards, start=1):
        final = f"model-{index:05d}-of-{total:05d}.safetensors"
        (staging / f"shard-{index}").rename(staging / final)
        weight_map.update({n: final for n in names})
    (staging / loading.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.save(staging)
    (staging / "BUILT").write_text(marker)
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)


def quantized_checkpoint(source: Path, method: str, group: int | None) -> Path:
    """`python -m idefics2_mini quantize` of the benchmark checkpoint, written once."""
    out = source.with_name(f"{source.name}-{method}" + (f"-g{group}" if group else ""))
    from idefics2_mini.quantize.formats import FORMAT_VERSION  # noqa: PLC0415

    marker = (source / "BUILT").read_text() + f" quantization format {FORMAT_VERSION}"
    if (out / "BUILT").is_file() and (out / "BUILT").read_text() == marker:
        return out
    command = [sys.executable, "-m", "idefics2_mini", "quantize", "--weights", str(source), "--bits", method[-1],
               "--out", str(out)] + (["--group-size", str(group)] if group else [])
    subprocess.run(command, cwd=ROOT, check=True)
    (out / "BUILT").write_text(marker)
    return out


def parse_variant(code: str, **options) -> tuple:
    """"8" / "int8", "4:32" (groups of 32), "4:64:sym", "4:64:head4" (the lm_head int4 too),
    "4:64:gptq" (integers chosen by GPTQ) -> (QuantSpec, "rtn" | "gptq"); "" -> (None, "rtn").
    `options`: more QuantSpec fields (components)."""
    from idefics2_mini.quantize import QuantSpec  # noqa: PLC0415

    if not code:
        return None, "rtn"
    method, _, rest = code.partition(":")
    group, _, option = rest.partition(":")
    spec = QuantSpec.parse(method, int(group) if group else None, symmetric=True if option == "sym" else None,
                           lm_head_bits=int(option.removeprefix("head")) if option.startswith("head") else None,
                           **options)
    return spec, "gptq" if option == "gptq" else "rtn"


def warm(path: Path) -> None:
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            while f.read(64 * 2**20):
                pass


# ============================================================================ one measuring process


def step_bytes(model, batch: int, context: float) -> int:
    """Bytes a decode step of ours reads: decoder layers, final norm and lm_head as stored, the B
    embedding rows, the K and V cache of `context` tokens (capped at the window)."""
    text = model.config.text
    tensors = [*model.text.layers.parameters(), *model.text.layers.buffers(), *model.text.norm.parameters(),
               *model.lm_head.parameters(), *model.lm_head.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    element = model.text.embed_tokens.weight.element_size()
    context = min(context, text.sliding_window or context)
    kv = text.num_hidden_layers * 2 * batch * text.num_key_value_heads * text.head_dim * context * element
    return int(weights + batch * text.hidden_size * element + kv)


def reference_step_bytes(config, batch: int, context: float) -> int:
    text = config.text
    width, q, kv_width = text.hidden_size, text.num_attention_heads * text.head_dim, \
        text.num_key_value_heads * text.head_dim
    per_layer = width * q + 2 * width * kv_width + q * width + 3 * width * text.intermediate_size + 2 * width
    weights = text.num_hidden_layers * per_layer + width + text.vocab_size * width + batch * width
    kv = text.num_hidden_layers * 2 * batch * kv_width * min(context, text.sliding_window or context)
    return 4 * (weights + kv)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    if spec["impl"] == "reference":
        import transformers  # noqa: PLC0415

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    import idefics2_mini as im  # noqa: PLC0415

    result = {"import_s": time.perf_counter() - start}
    base = rss_mib()
    busy_before = common.cpu_busy_seconds()
    own_before = time.process_time()
    wall_before = time.perf_counter()
    start = time.perf_counter()
    if spec["impl"] == "reference":
        from transformers import Idefics2ForConditionalGeneration  # noqa: PLC0415

        model = Idefics2ForConditionalGeneration.from_pretrained(spec["checkpoint"], dtype=torch.float32).eval()

        class Stamps:  # transformers' streamer protocol: put(prompt), put(token) per step, end()
            def __init__(self, stamps):
                self.stamps, self.calls = stamps, 0

            def put(self, value):
                self.calls += 1
                if self.calls > 1:  # the first put is the prompt, before the prefill
                    self.stamps.append(time.perf_counter())

            def end(self):
                pass

        def generate(batch, new, stamps=None):
            with torch.inference_mode():
                return model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                      streamer=None if stamps is None else Stamps(stamps))
    else:
        from idefics2_mini.quantize import QuantSpec  # noqa: PLC0415

        quantize, _ = parse_variant(spec.get("quantize") or "")
        model = im.Idefics2.from_pretrained(spec["checkpoint"], dtype=getattr(torch, spec["dtype"]), quantize=quantize)

        def generate(batch, new, stamps=None):
            streamer = None if stamps is None else (lambda token: stamps.append(time.perf_counter()))
            return model.generate(**batch, max_new_tokens=new, do_sample=False, eos_token_id=[], streamer=streamer)
    result["load_s"] = time.perf_counter() - start
    hwm = common.peak_rss_mib()
    result["load_peak_above_base_mib"] = hwm - base
    tensors = [*model.parameters(), *model.buffers()]
    seen = {id(t): t for t in tensors}
    result["model_mib"] = sum(t.numel() * t.element_size() for t in seen.values()) / 2**20
    inputs = torch.load(spec["inputs"])
    for key in ("text_b1", "text_b8"):
        batch = inputs[key]
        size, prompt_len = batch["input_ids"].shape
        generate(batch, 2)
        steps, prefills = [], []
        for _ in range(spec["repeats"]):
            stamps: list[float] = []  # when each new token came out (the first: after the prefill)
            start = time.perf_counter()
            generate(batch, NEW_TOKENS, stamps)
            assert len(stamps) == NEW_TOKENS, len(stamps)
            prefills.append(stamps[0] - start)
            steps.append((stamps[-1] - stamps[0]) / (NEW_TOKENS - 1))
        step = statistics.median(steps)
        context = prompt_len + NEW_TOKENS / 2
        nbytes = (reference_step_bytes(im.Idefics2Config.from_pretrained(spec["checkpoint"]), size, context)
                  if spec["impl"] == "reference"
                  else step_bytes(model, size, context))
        result[f"decode_{key[-2:]}"] = dict(batch=size, step_s=step, tokens_per_s=size / step, step_bytes=nbytes,
                                            gbs=nbytes / step / 1e9, steps_s=steps, prefill_s=prefills)
        print(f"    [{spec['name']}] decode batch {size}: {size / step:.2f} tok/s ({nbytes / step / 1e9:.1f} GB/s)",
              file=sys.stderr, flush=True)
    busy_after = common.cpu_busy_seconds()
    if busy_before is not None and busy_after is not None:
        wall = time.perf_counter() - wall_before
        others = (busy_after - busy_before) - (time.process_time() - own_before)
        result["others_cpu"] = max(0.0, others) / (wall * common.usable_cores())
    result["peak_rss_mib"] = common.peak_rss_mib()
    return result


# ============================================================================ parts


OPS_ROTATION_BYTES = 256 * 2**20  # each timed weight rotates through copies adding up to this (no cache reuse)


def copies_of(tensors, nbytes: int, quick: bool) -> list:
    """`tensors` (a tensor, module or tuple of them) and clones of it, enough that a rotation
    through them reads OPS_ROTATION_BYTES: a weight that fits the last-level cache (an int4
    14336 x 4096 is ~33 MB, the L3 of an EPYC 32 MB) would otherwise be timed from the cache."""
    import copy  # noqa: PLC0415

    count = 1 if quick else max(2, math.ceil(OPS_ROTATION_BYTES / max(1, nbytes)))
    return [tensors] + [copy.deepcopy(tensors) for _ in range(count - 1)]


def run_ops(threads: int, quick: bool) -> list[dict]:
    """One linear at decode sizes, every implementation (see the module docstring)."""
    from idefics2_mini.backends import cpu as cpu_backend  # noqa: PLC0415
    from idefics2_mini.quantize import QuantizedLinear, QuantSpec, cpu  # noqa: PLC0415
    from kernels.dequant_matmul import unpack_int4  # noqa: PLC0415

    torch.set_num_threads(threads)
    shapes = [(256, 128)] if quick else [(14336, 4096), (4096, 14336), (32003, 4096)]  # gate/up, down, lm_head
    out = []
    for n, k in shapes:
        weight = torch.randn(n, k) * 0.02
        linear = torch.nn.Linear(k, n, bias=False).requires_grad_(False)
        linear.weight.copy_(weight)
        weights = copies_of(weight, weight.numel() * 4, quick)
        w_bf16 = copies_of(weight.bfloat16(), weight.numel() * 2, quick)
        q8 = QuantizedLinear.from_linear(linear, QuantSpec(8))
        q8_bytes = q8.qweight.numel() + q8.scales.numel() * 4
        q8s = copies_of(q8, q8_bytes, quick)
        q8_bf16_scales = q8.scales.view(-1).bfloat16()
        q4, q4_bytes, int4_packed = {}, {}, {}
        for g in (32, 64, 128):
            layer = QuantizedLinear.from_linear(linear, QuantSpec(4, g))
            q4_bytes[g] = layer.qweight.numel() + 2 * layer.scales.numel() * 2
            q4[g] = copies_of(layer, q4_bytes[g], quick)
            if n % 16 == 0:  # torch's int4 packing needs 16 | rows
                nibbles = (unpack_int4(layer.qweight, g).to(torch.int32) + 8).contiguous()
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
                scales_zeros = torch.stack([layer.scales.float(), layer.zeros.float()], -1).transpose(0, 1)
                int4_packed[g] = copies_of((packed, scales_zeros.contiguous().bfloat16()), q4_bytes[g], quick)
        del linear
        for rows in (1, 8):
            x = torch.randn(rows, k)
            xb = x.bfloat16()
            seconds = 0.5 if quick else 3.0

            def entry(label, fn, copies, nbytes):
                turn = iter(range(10**9))
                us = common.median_call_us(lambda: fn(copies[next(turn) % len(copies)]), seconds)
                out.append(dict(shape=f"{n}x{k}", rows=rows, impl=label, ms=us / 1e3, gbs=nbytes / us / 1e3))
                print(f"  {n}x{k} rows {rows}: {label:<52} {us / 1e3:8.3f} ms {nbytes / us / 1e3:6.1f} GB/s", flush=True)

            entry("fp32 (ours: CpuLinear)", lambda w: cpu_backend.linear(x, w), weights, weight.numel() * 4)
            entry("bf16 (ours: CpuLinear)", lambda w: cpu_backend.linear(xb, w), w_bf16, weight.numel() * 2)
            for path in cpu.paths():
                if path != "bf16" and cpu.library().qmm_takes(8, cpu.PATHS[path], k, k):
                    entry(f"int8, ours (qmatmul.c: {path}), fp32 x",
                          lambda q, path=path: cpu.kernel_matmul(x, q.qweight, q.scales, None, 8, k, path), q8s, q8_bytes)
            entry(f"int8, ours (qmatmul.c: {cpu.kernel_path(8, rows, k, k, torch.bfloat16)}), bf16 x",
                  lambda q: q(xb), q8s, q8_bytes)
            entry("int8, torch _weight_int8pack_mm, bf16 x",
                  lambda q: torch.ops.aten._weight_int8pack_mm(xb, q.qweight, q8_bf16_scales), q8s, q8_bytes)
            if rows == 1:  # ~120 ms at 8 rows: fp32 x is not what this op is for
                entry("int8, torch _weight_int8pack_mm, fp32 x",
                      lambda q: torch.ops.aten._weight_int8pack_mm(x, q.qweight, q.scales.view(-1)), q8s, q8_bytes)
            for g, layers in q4.items():
                nbytes = q4_bytes[g]
                if k % g:
                    continue
                for path in cpu.paths() if g == 64 else [cpu.kernel_path(4, rows, k, g, torch.float32)]:  # ([]: no build)
                    if path == "bf16" and rows > 1 or not cpu.library().qmm_takes(4, cpu.PATHS[path], k, g):
                        continue
                    entry(f"int4 g{g} asym, ours (qmatmul.c: {path}), fp32 x",
                          lambda q, path=path, g=g: cpu.kernel_matmul(x, q.qweight, q.scales, q.zeros, 4, g, path),
                          layers, nbytes)
                if g == 64:
                    entry(f"int4 g{g} asym, ours (qmatmul.c: {cpu.kernel_path(4, rows, k, g, torch.bfloat16)}), bf16 x",
                          lambda q: q(xb), layers, nbytes)
                if g in int4_packed:
                    entry(f"int4 g{g} asym, torch _weight_int4pack_mm_for_cpu, bf16 x",
                          lambda pz, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, pz[0], g, pz[1]),
                          int4_packed[g], nbytes)
        if not cpu.available():
            print(f"  (qmatmul.c not built: {cpu.build_error()}; 'ours' rows are the fallback)", flush=True)
        del weights, w_bf16, q8s, q4, int4_packed
    return out


def run_decode(args, path: Path, inputs: Path, bandwidths: list[float]) -> dict:
    """Each variant in a fresh process (module docstring); the read bandwidth is measured again
    before each (appended to `bandwidths`: on a shared VM it moves by +-20% within minutes)."""
    variants = [
        dict(name="ours fp32", dtype="float32", checkpoint=str(path)),
        dict(name="ours bf16", dtype="bfloat16", checkpoint=str(path)),
        dict(name=INT8_ON_LOAD, dtype="float32", checkpoint=str(path), quantize="int8"),
        dict(name=INT4_ON_LOAD, dtype="float32", checkpoint=str(path),
             quantize="int4" if not args.quick else "int4:32"),
        dict(name="ours int4 g64, lm_head int4 too (quantized while loading fp32 files)", dtype="float32",
             checkpoint=str(path), quantize="int4:64:head4"),
        dict(name="ours int8 (from the int8 checkpoint)", dtype="float32",
             checkpoint=str(quantized_checkpoint(path, "int8", None))),
        dict(name="ours int4 g64 (from the int4 checkpoint)", dtype="float32",
             checkpoint=str(quantized_checkpoint(path, "int4", 64 if not args.quick else 32))),
        dict(name="ours int4 g32 (from the int4 checkpoint)", dtype="float32",
             checkpoint=str(quantized_checkpoint(path, "int4", 32))),
    ]
    if args.quick:  # smoke run: one of each kind
        variants = [variants[0], variants[2], variants[6]]
    if not args.no_reference and importlib.util.find_spec("transformers") is not None:
        variants.append(dict(name=REFERENCE, impl="reference", checkpoint=str(path)))
    rounds: dict[str, list[dict]] = {}
    for number in range(1, args.rounds + 1):  # interleaved: a slow minute of the VM hits one round of each
        for variant in variants:
            spec = {"impl": "ours", "threads": args.threads, "repeats": 1 if args.quick else args.repeats,
                    "inputs": str(inputs), **variant}
            common.wait_for_quiet_machine(args.max_wait, log=lambda m: print(m, flush=True))
            bandwidths.append(common.measure_read_bandwidth(torch.device("cpu"), gib=0.25 if args.quick else 1.0))
            warm(Path(spec["checkpoint"]))
            print(f"  round {number}/{args.rounds}: {variant['name']} ... (read bandwidth now {bandwidths[-1]:.1f} "
                  "GB/s)", flush=True)
            process = subprocess.run([sys.executable, "-m", "benchmarks.quantize", "--child", json.dumps(spec)],
                                     cwd=ROOT, capture_output=True, text=True)
            sys.stderr.write(process.stderr[-3000:])
            if process.returncode != 0:
                raise RuntimeError(f"{variant['name']} failed:\n{process.stderr[-3000:]}")
            line = next(l for l in reversed(process.stdout.splitlines()) if l.startswith(RESULT_PREFIX))
            result = json.loads(line[len(RESULT_PREFIX):])
            result["bandwidth_before_gbs"] = bandwidths[-1]
            rounds.setdefault(variant["name"], []).append(result)
    return {name: best_round(results) for name, results in rounds.items()}


def best_round(results: list[dict]) -> dict:
    """Of one variant's rounds, the one with the fastest batch-1 decode (the least disturbed by
    the VM's neighbours, as timeit keeps the minimum; every variant gets the same rule), with
    every round's batch-1 and batch-8 tokens/s beside it."""
    best = dict(max(results, key=lambda r: r["decode_b1"]["tokens_per_s"]))
    best["rounds_tokens_per_s"] = {key: [r[key]["tokens_per_s"] for r in results] for key in ("decode_b1", "decode_b8")}
    return best


CONFIDENCE_BINS = (0.0, 0.1, 0.3, 0.5, 1.0)  # fp32 top-1 probability: top-1 agreement per bin (the last closed)
GREEDY_CHUNK = 8  # prompts per generate call: <= 8 rows, so quantized decode steps run through qmatmul.c


def accuracy_against_fp32(path: Path, text_ids: torch.Tensor, held: dict, new: int, specs: list, control: bool,
                          log=print, calibration: torch.Tensor | None = None) -> dict:
    """The quantized models of `specs` ([(name, QuantSpec, method)], each loaded from the fp32
    checkpoint at `path`: "rtn" quantized while loading, "gptq" loaded float and quantized by
    quantize_gptq on `calibration` [B, T]) against that fp32 model, same inputs; shared by the
    `accuracy` (wide random checkpoint) and `trained` (trained small LM) parts.

    text_ids [B, T]: teacher-forced text (every position of every row counts); held: prompts
    (input_ids, attention_mask; left-padded), continued greedily by `new` tokens, GREEDY_CHUNK
    prompts per call. Per variant: top-1 agreement, NLL and its difference, KL(fp32 || quantized)
    per token; greedy: prompts whose tokens all equal fp32's, whose first token does, share of
    equal tokens; per layer kind: the output error on the layer's own input (relative Frobenius
    of y - x W_fp32^T), the weight error ||W_deq - W|| / ||W||, what uniform rounding predicts
    for it (sqrt(sum_groups s^2 G / 12) / ||W||: every weight off by U(-s/2, s/2)), and the
    kernel's decode-sized output (the first <= 8 rows through QuantizedLinear.forward) against
    x W_deq^T. `control`: the fp32 model with Gaussian noise giving each layer the output error
    a CONTROLS variant has on layers of its kind, once per such variant."""
    import idefics2_mini as im  # noqa: PLC0415
    from idefics2_mini.backends import fusion  # noqa: PLC0415
    from idefics2_mini.quantize import QuantizedLinear, quantize_gptq, quantized_linear_names  # noqa: PLC0415

    reference = im.Idefics2.from_pretrained(path)
    prompt_len = held["input_ids"].shape[1]

    def greedy_of(model) -> torch.Tensor:
        chunks = []
        with torch.no_grad():
            for start in range(0, held["input_ids"].shape[0], GREEDY_CHUNK):
                part = {k: v[start : start + GREEDY_CHUNK] for k, v in held.items()}
                chunks.append(model.generate(**part, max_new_tokens=new, do_sample=False, eos_token_id=[]))
        return torch.cat(chunks)

    with torch.no_grad():
        ref_logits = reference(text_ids).float()
        ref_greedy = greedy_of(reference)
        # the fp32 model's confidence where it chose its greedy tokens (the positions greedy compares)
        mask = torch.cat([held["attention_mask"], torch.ones(ref_greedy.shape[0], new, dtype=held["attention_mask"].dtype)], 1)
        greedy_logits = reference(input_ids=ref_greedy, attention_mask=mask)[:, prompt_len - 1 : -1].float()
    targets = text_ids[:, 1:].flatten()
    ref_logits = ref_logits.flatten(0, 1)  # [B T, V]
    last = torch.arange(ref_logits.shape[0]) % text_ids.shape[1] != text_ids.shape[1] - 1  # rows with a target
    ref_nll = torch.nn.functional.cross_entropy(ref_logits[last], targets).item()
    ref_top = ref_logits.topk(2, dim=-1).values
    greedy_top = greedy_logits.softmax(-1).max(-1).values.flatten()
    ref_confidence = ref_logits.softmax(-1).max(-1).values  # [B*T]
    quartiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    results = {"text_tokens": int(text_ids.numel()), "text_rows": int(text_ids.shape[0]),
               "held_prompts": int(held["input_ids"].shape[0]), "prompt_tokens": int(prompt_len),
               "new_tokens": new, "nll_fp32": ref_nll,
               "fp32_top1_margin_median": (ref_top[:, 0] - ref_top[:, 1]).median().item(),
               "fp32_logit_std": ref_logits.std().item(),
               "fp32_top1_prob_text_quantiles": ref_confidence.quantile(quartiles).tolist(),
               "fp32_top1_prob_greedy_quantiles": greedy_top.quantile(quartiles).tolist(),
               "fp32_text_top1_accuracy": (ref_logits[last].argmax(-1) == targets).float().mean().item(),
               # how repetitive fp32's own greedy text is (a weak model loops: then greedy agreement is easy)
               "fp32_greedy_distinct_tokens_mean": statistics.mean(
                   len(set(row.tolist())) for row in ref_greedy[:, prompt_len:]),
               "variants": {}}
    log(f"  fp32: NLL {ref_nll:.4f}; top-1 probability at the greedy steps (10/25/50/75/90%): "
        f"{', '.join(f'{q:.2f}' for q in results['fp32_top1_prob_greedy_quantiles'])}")

    def compare(model, logits) -> dict:
        """Teacher-forced logits and greedy continuations of `model` against fp32's."""
        greedy = greedy_of(model)
        mine, theirs = greedy[:, prompt_len:], ref_greedy[:, prompt_len:]
        same_prefix = [int((a != b).nonzero()[0, 0]) if (a != b).any() else new for a, b in zip(mine, theirs)]
        logits = logits.flatten(0, 1)
        nll = torch.nn.functional.cross_entropy(logits[last], targets).item()
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True,
                                        reduction="batchmean").item()
        agree = logits.argmax(-1) == ref_logits.argmax(-1)
        by_confidence = []  # where the flips are: by fp32's own top-1 probability at the position
        for low, high in zip(CONFIDENCE_BINS[:-1], CONFIDENCE_BINS[1:]):
            chosen = (ref_confidence >= low) & ((ref_confidence < high) | (high == CONFIDENCE_BINS[-1]))
            by_confidence.append(dict(low=low, high=high, positions=int(chosen.sum()),
                                      agreement=agree[chosen].float().mean().item() if chosen.any() else None))
        v = dict(top1_agreement=agree.float().mean().item(), top1_agreement_by_confidence=by_confidence,
                 nll=nll, nll_diff=nll - ref_nll, kl=kl,
                 greedy_identical=sum(p == new for p in same_prefix), greedy_first_token=sum(p > 0 for p in same_prefix),
                 greedy_tokens_agreeing=(mine == theirs).float().mean().item(), greedy_prefix=same_prefix,
                 logits_rel_err=((logits - ref_logits).abs().max() / ref_logits.abs().max()).item())
        log(f"  top-1 {100 * v['top1_agreement']:.1f}%, KL {kl:.4f}, NLL {nll:.4f} ({v['nll_diff']:+.4f}), greedy "
            f"identical {v['greedy_identical']}/{len(same_prefix)}, first token {v['greedy_first_token']}/"
            f"{len(same_prefix)}, tokens {100 * v['greedy_tokens_agreeing']:.0f}%")
        return v

    def kind_of(layer_name: str) -> str:
        last_part = layer_name.split(".")[-1]
        return last_part if layer_name.startswith("text.") or layer_name == "lm_head" else "connector." + last_part

    for name, spec, method in specs:
        log(f"  {name}:")
        if method == "gptq":
            model = im.Idefics2.from_pretrained(path, mmap=False)
            started = time.perf_counter()
            quantize_gptq(model, spec, calibration)
            gptq_s = time.perf_counter() - started
            log(f"    GPTQ on {calibration.shape[0]} x {calibration.shape[1]} tokens: {gptq_s:.1f} s")
        else:
            model = im.Idefics2.from_pretrained(path, quantize=spec)
        # q/k/v and gate/up one by one, so each layer's hook sees its call (the fused call gives
        # bit-equal outputs: tests/test_quantize.py)
        fusion.unfuse_projections(model)
        errors: dict[str, list[float]] = {}
        weight_errors: dict[str, list[tuple[float, float]]] = {}
        kernel_errors: list[float] = []
        hooks = []
        for layer_name, layer in model.named_modules():
            if not isinstance(layer, QuantizedLinear):
                continue
            float_weight = reference.get_submodule(layer_name).weight.float()
            dequantized = layer.dequantized_weight(torch.float32)
            scales = layer.scales.float()
            predicted = (scales.square().sum() * layer.group_size / 12).sqrt() / float_weight.norm()
            weight_errors.setdefault(kind_of(layer_name), []).append(
                (((dequantized - float_weight).norm() / float_weight.norm()).item(), predicted.item()))

            def hook(module, inputs, output, layer_name=layer_name, float_weight=float_weight, dequantized=dequantized):
                x = inputs[0].float()
                exact = torch.nn.functional.linear(x, float_weight)
                errors.setdefault(kind_of(layer_name), []).append(((output.float() - exact).norm() / exact.norm()).item())
                rows = x.reshape(-1, x.shape[-1])[:8].to(inputs[0].dtype)
                kernel = QuantizedLinear.forward(module, rows).float()  # decode-sized: qmatmul.c where built
                wanted = torch.nn.functional.linear(rows.float(), dequantized)
                kernel_errors.append(((kernel - wanted).norm() / wanted.norm()).item())

            hooks.append(layer.register_forward_hook(hook))
        with torch.no_grad():
            logits = model(text_ids).float()
        for hook in hooks:
            hook.remove()
        results["variants"][name] = dict(
            spec=spec.to_config(), method=method, **({"gptq_s": gptq_s} if method == "gptq" else {}),
            **compare(model, logits),
            layer_error={kind: statistics.mean(v) for kind, v in sorted(errors.items())},
            weight_error={kind: statistics.mean(w for w, _ in v) for kind, v in sorted(weight_errors.items())},
            weight_error_predicted={kind: statistics.mean(p for _, p in v) for kind, v in sorted(weight_errors.items())},
            kernel_vs_dequantized_max=max(kernel_errors))
        log(f"    weight error {100 * statistics.mean(results['variants'][name]['weight_error'].values()):.3f}% "
            f"(uniform rounding predicts {100 * statistics.mean(results['variants'][name]['weight_error_predicted'].values()):.3f}%), "
            f"kernel vs x W_deq^T: {max(kernel_errors):.1e}")
        del model
    for matched in CONTROLS if control else ():
        if matched not in results["variants"]:
            continue
        # Control: the fp32 model with Gaussian noise in the same linears, its size set per layer
        # so that the layer's output error on this text, ||x E^T|| / ||x W^T|| (x: the layer's
        # inputs in the fp32 model), equals the variant's mean output error on layers of that
        # kind (an int4 model's int8 lm_head gets int8-sized noise). Sized by the output, not by
        # ||E|| / ||W||: trained weights line up with their inputs, so noise of a given weight
        # norm moves the output less than the same norm of structured error would. If the
        # control moves top-1 and greedy as much as the variant does, that is the network's
        # sensitivity to any perturbation of that size; if less, the quantizer's error is worse
        # placed than random noise.
        by_kind = results["variants"][matched]["layer_error"]
        label = f"fp32 + noise ({matched}'s layer errors, mean {100 * statistics.mean(by_kind.values()):.2f}%)"
        log(f"  {label}:")
        model = im.Idefics2.from_pretrained(path, mmap=False)
        fusion.unfuse_projections(model)  # each linear its own call, so its hook sees it
        generator = torch.Generator().manual_seed(1)
        noises, sums, hooks = {}, {}, []
        for layer_name in quantized_linear_names(model, next(spec for n, spec, _ in specs if n == matched)):
            if kind_of(layer_name) not in by_kind:  # a layer the text never ran (the connector)
                continue
            layer = model.get_submodule(layer_name)
            noises[layer_name] = torch.randn(layer.weight.shape, generator=generator)
            sums[layer_name] = [0.0, 0.0]  # ||x E^T||^2, ||x W^T||^2

            def measure(module, inputs, output, layer_name=layer_name):
                x = inputs[0].float()
                sums[layer_name][0] += x.matmul(noises[layer_name].T).square().sum().item()
                sums[layer_name][1] += torch.nn.functional.linear(x, module.weight.float()).square().sum().item()

            hooks.append(layer.register_forward_hook(measure))
        with torch.no_grad():
            model(text_ids)
            for hook in hooks:
                hook.remove()
            for layer_name, noise in noises.items():
                moved, exact = sums[layer_name]
                target = by_kind[kind_of(layer_name)]
                model.get_submodule(layer_name).weight.add_(noise * (target * math.sqrt(exact / moved)))
            logits = model(text_ids).float()
        results["variants"][label] = dict(spec=None, **compare(model, logits), layer_error=dict(by_kind))
        del model
    return results


# The variants whose layer errors size a noise control (accuracy_against_fp32's `control`).
CONTROLS = ("int8", "int4 g64", "int4 g64, lm_head int4", "int4 g64 GPTQ")
# name: bits[:group[:sym | :headN | :gptq]] (an int4 model's lm_head is int8 unless headN says
# otherwise; gptq: the integers chosen by GPTQ on calibration text, the rest rounded to nearest)
ACCURACY_SPECS = [("int8", "8"), ("int4 g128", "4:128"), ("int4 g64", "4:64"), ("int4 g32", "4:32"),
                  ("int4 g64 symmetric", "4:64:sym"), ("int4 g64, lm_head int4", "4:64:head4"),
                  ("int4 g128 GPTQ", "4:128:gptq"), ("int4 g64 GPTQ", "4:64:gptq"), ("int4 g32 GPTQ", "4:32:gptq")]


def specs_of(names, components: tuple[str, ...] | None = None) -> list:
    """[(name, QuantSpec, method)] of the ACCURACY_SPECS called `names`."""
    options = {} if components is None else {"components": components}
    return [(name, *parse_variant(code, **options)) for name, code in ACCURACY_SPECS if name in names]


def run_accuracy(path: Path, quick: bool) -> dict:
    """Quantized models against ours fp32 on the wide random checkpoint (module docstring)."""
    from idefics2_mini.processor import Idefics2Processor  # noqa: PLC0415

    processor = Idefics2Processor.from_pretrained(None)
    text_ids = processor(text=TEXT)["input_ids"]
    held = processor(text=HELD_PROMPTS[:4] if quick else HELD_PROMPTS)
    # the tiny widths fit groups of 32 only; GPTQ g64 here for its time and layer errors at the 8B's
    # widths, calibrated on stdlib docstrings (the trained LMs' corpus: not the texts judged on)
    names = ["int8", "int4 g32"] if quick else [n for n, code in ACCURACY_SPECS if not code.endswith("gptq")
                                                 or n == "int4 g64 GPTQ"]
    calibration = None
    if not quick:
        from benchmarks import trained_lm  # noqa: PLC0415

        calibration = trained_lm.held_windows(trained_lm.token_stream(trained_lm.corpus("full")[0]), 16, 128)
    results = accuracy_against_fp32(path, text_ids, held, 4 if quick else 24, specs_of(names), control=not quick,
                                    log=lambda m: print(m, flush=True), calibration=calibration)
    if calibration is not None:
        results["calibration"] = dict(windows=int(calibration.shape[0]), tokens=int(calibration.numel()),
                                      source="stdlib docstrings (the trained LM's training text)")
    return results


TRAINED_MODELS = ("full", "code")  # trained_lm.SIZES: the same model trained on docstrings, on source code


def run_trained(weights: Path, size: str, plot_dir: Path | None) -> dict:
    """Quantized models against the fp32 *trained* small LM of `size` (benchmarks/trained_lm.py,
    built if missing): held-out text of its corpus teacher-forced (TRAINED_SHAPE[0] windows of the
    training length), greedy continuations of TRAINED_SHAPE[1] held-out document openings."""
    from benchmarks import trained_lm  # noqa: PLC0415

    quick = size == "quick"
    path = weights / trained_lm.checkpoint_name(size)
    log = lambda m: print(m, flush=True)  # noqa: E731
    history = trained_lm.build(path, size, log=log)
    _, held_docs, _ = trained_lm.corpus(size)
    seq = trained_lm.SIZES[size]["seq"]
    held_ids = trained_lm.token_stream(held_docs)
    rows, prompts, prompt_len, new = (4, 4, 16, 8) if quick else TRAINED_SHAPE
    text_ids = trained_lm.held_windows(held_ids, rows, seq)
    # prompts: the openings (BOS + prompt_len - 1 tokens) of evenly spaced held-out documents long enough
    openings = [ids for ids in (trained_lm.token_stream([d])[: prompt_len] for d in held_docs) if len(ids) == prompt_len]
    picked = torch.stack([openings[i] for i in torch.linspace(0, len(openings) - 1, prompts).long().tolist()])
    held = {"input_ids": picked, "attention_mask": torch.ones_like(picked)}
    names = ["int8", "int4 g32", "int4 g32 GPTQ"] if quick else [n for n, _ in ACCURACY_SPECS]
    # GPTQ's calibration: windows of the training text (never the held-out text it is judged on)
    train_docs, _, _ = trained_lm.corpus(size)
    calibration = trained_lm.held_windows(trained_lm.token_stream(train_docs), *TRAINED_CALIBRATION[quick])
    # text only: the decoder's linears and the lm_head (its tiny connector, unused, is 64 wide)
    results = accuracy_against_fp32(path, text_ids, held, new, specs_of(names, ("text", "lm_head")), control=True,
                                    log=log, calibration=calibration)
    results["calibration"] = dict(windows=int(calibration.shape[0]), tokens=int(calibration.numel()),
                                  source="training text")
    results["training"] = {k: v for k, v in history.items() if k not in ("step", "loss", "eval_step")}
    results["training"]["final_train_loss_mean_last_20"] = statistics.mean(history["loss"][-20:])
    results["checkpoint"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        curve = "quantize-trained-loss.png" if size in ("full", "quick") else f"quantize-trained-{size}-loss.png"
        results["loss_curve"] = trained_lm.plot(history, plot_dir / curve).name
    return results


TRAINED_SHAPE = (32, 24, 32, 32)  # teacher-forced windows, prompts, prompt tokens (with BOS), new tokens
TRAINED_CALIBRATION = {False: (64, 128), True: (4, 64)}  # GPTQ: windows x tokens of training text (full, quick)



# ============================================================================ report


INT8_ON_LOAD = "ours int8 (quantized while loading fp32 files)"
INT4_ON_LOAD = "ours int4 g64 (quantized while loading fp32 files)"


def targets(decode, accuracy, bandwidth: float, trained=None) -> list[tuple[str, str, str, bool]]:
    """Issue 15's CPU targets, as (what, target, measured, met) rows, for what was measured."""
    rows = []
    if decode and INT8_ON_LOAD in decode:
        best = max(decode[n]["decode_b1"]["tokens_per_s"] for n in ("ours fp32", "ours bf16") if n in decode)
        for name, label, need in ((INT8_ON_LOAD, "int8", 1.7), (INT4_ON_LOAD, "int4 g64", 2.5)):
            if name not in decode:
                continue
            b1 = decode[name]["decode_b1"]
            speedup = b1["tokens_per_s"] / best
            rows.append((f"{label} decode b1 / the faster of fp32, bf16", f">= {need}x", f"{speedup:.2f}x "
                         f"({b1['tokens_per_s']:.1f} vs {best:.1f} tok/s)", speedup >= need))
            share = b1["gbs"] / bandwidth
            rows.append((f"{label} decode b1: bytes of a step / time, share of the read bandwidth", ">= 70%",
                         f"{100 * share:.0f}% ({b1['gbs']:.1f} of {bandwidth:.1f} GB/s)", share >= 0.7))
            peak = decode[name]["load_peak_above_base_mib"] / decode[name]["model_mib"]
            rows.append((f"{label} load from fp32 files: peak memory / the quantized model", "<= 1.2",
                         f"{peak:.2f} ({decode[name]['load_peak_above_base_mib']:,.0f} / "
                         f"{decode[name]['model_mib']:,.0f} MiB)", peak <= 1.2))
    checked = [(data, f"trained {data['training']['hyper']['hidden']}-wide LM, held-out "
                      + TRAINED_CORPORA[data["training"]["hyper"].get("corpus", "docstrings")][0])
               for data in (trained or {}).values()]
    for data, which in (*checked, (accuracy, "random 8B-wide checkpoint, realistic-statistics weights")):
        if not data:
            continue
        n = data["held_prompts"]
        for name in ("int8", "int4 g64", "int4 g64, lm_head int4", "int4 g64 GPTQ"):
            if name in data["variants"]:
                v = data["variants"][name]
                rows.append((f"{name} ({which}): held prompts whose {data['new_tokens']} greedy tokens all equal "
                             "fp32's", "a clear majority (>= 2/3)", f"{v['greedy_identical']}/{n} (first token: "
                             f"{v['greedy_first_token']}/{n}; tokens: {100 * v['greedy_tokens_agreeing']:.0f}% equal; "
                             f"top-1 {100 * v['top1_agreement']:.1f}%, KL {v['kl']:.3f})",
                             v["greedy_identical"] >= 2 * n / 3))
    return rows


def accuracy_lines(accuracy: dict, network: str) -> list[str]:
    """The tables of one accuracy_against_fp32 result."""
    lines = [f"fp32: NLL {accuracy['nll_fp32']:.4f}, logits std {accuracy['fp32_logit_std']:.2f}, median top-1 margin "
             f"{accuracy['fp32_top1_margin_median']:.3f}; top-1 probability (quantiles 10/25/50/75/90%): at its greedy "
             "steps " + " / ".join(f"{q:.2f}" for q in accuracy.get("fp32_top1_prob_greedy_quantiles", []))
             + "; on the text " + " / ".join(f"{q:.2f}" for q in accuracy.get("fp32_top1_prob_text_quantiles", []))
             + " (a trained LM: often 0.3-0.9)."
             + (f" fp32's greedy continuations hold on average {accuracy['fp32_greedy_distinct_tokens_mean']:.1f} "
                f"distinct tokens of {accuracy['new_tokens']} (a weak model's greedy text loops; the fewer, the "
                "easier greedy agreement is)." if "fp32_greedy_distinct_tokens_mean" in accuracy else ""), "",
             "| variant | top-1 agreement | NLL diff | KL (nats/token) | max logit err / max logit | "
             "greedy identical | greedy first token same | greedy tokens same |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    n = accuracy["held_prompts"]
    for name, v in accuracy["variants"].items():
        lines.append(f"| {name} | {100 * v['top1_agreement']:.1f}% | {v['nll_diff']:+.4f} | {v['kl']:.4f} | "
                     f"{v['logits_rel_err']:.3f} | {v['greedy_identical']}/{n} | {v['greedy_first_token']}/{n} | "
                     f"{100 * v['greedy_tokens_agreeing']:.0f}% |")
    if any(not v.get("spec") for v in accuracy["variants"].values()):
        lines += ["", "The `fp32 + noise` rows are controls: the fp32 model with Gaussian noise added to the same "
                  "linears' weights, sized per layer so that its output error on this text equals the named variant's mean "
                  "output error on layers of that kind (the mean over kinds in the name). "
                  "Where one moves top-1 and greedy as much as its variant, the changes are "
                  f"{network}'s sensitivity to any perturbation of that size, not the quantizer's doing."]
    bins = next((v["top1_agreement_by_confidence"] for v in accuracy["variants"].values()
                 if "top1_agreement_by_confidence" in v), None)
    if bins:
        lines += ["", "Where the top-1 flips are: top-1 agreement on the teacher-forced text by how sure fp32 was "
                  "(its top-1 probability at the position; positions per bin in the header):", "",
                  "| variant | " + " | ".join(f"p {b['low']:.1f}-{b['high']:.1f} ({b['positions']})" for b in bins) + " |",
                  "|---|" + "---:|" * len(bins)]
        for name, v in accuracy["variants"].items():
            cells = [("-" if b["agreement"] is None else f"{100 * b['agreement']:.1f}%")
                     for b in v.get("top1_agreement_by_confidence", [])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    quantized = {name: v for name, v in accuracy["variants"].items() if v.get("spec")}
    kinds = sorted({k for v in quantized.values() for k in v["layer_error"]})
    lines += ["", "Per-layer output error (relative Frobenius norm of y_quantized - x W_fp32^T on the layer's own "
              "input, mean over layers of a kind):", "", "| variant | " + " | ".join(kinds) + " |",
              "|---|" + "---:|" * len(kinds)]
    for name, v in quantized.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * v['layer_error'].get(k, float('nan')):.2f}%"
                                                  for k in kinds) + " |")
    if all("weight_error" in v for v in quantized.values()):
        lines += ["", "Weight error ||W_deq - W|| / ||W|| (mean over the quantized linears) beside what uniform "
                  "rounding predicts from the stored scales (each weight off by U(-s/2, s/2): sqrt(sum s^2 G / 12) / "
                  "||W||), and the kernel's decode-sized output (<= 8 rows through QuantizedLinear) against "
                  "x W_deq^T: a wrong dequantization would show in either (GPTQ's weight error is above the prediction "
                  "by design: it gives up weight error for output error on its calibration inputs).", "",
                  "| variant | weight error | uniform-rounding prediction | kernel vs x W_deq^T (max) |",
                  "|---|---:|---:|---:|"]
        for name, v in quantized.items():
            lines.append(f"| {name} | {100 * statistics.mean(v['weight_error'].values()):.3f}% | "
                         f"{100 * statistics.mean(v['weight_error_predicted'].values()):.3f}% | "
                         f"{v['kernel_vs_dequantized_max']:.1e} |")
    lines.append("")
    return lines


# trained_lm.SIZES' "corpus": (what the targets call it, what the report says it is)
TRAINED_CORPORA = {
    "docstrings": ("stdlib docstrings", "the docstrings of Python {python}'s standard library and its help topics"),
    "source": ("stdlib source", "the module-level functions and classes of Python {python}'s standard library (source)"),
}


def trained_lines(trained: dict) -> list[str]:
    t = trained["training"]
    h = t["hyper"]
    short, text = TRAINED_CORPORA[h.get("corpus", "docstrings")]
    lines = [f"## Accuracy against ours fp32 (a trained small LM: {short})", "",
             f"`{trained['checkpoint']}`, built by `benchmarks/trained_lm.py` (its docstring): decoder "
             f"{h['hidden']} wide, {h['layers']} layers, SwiGLU {h['intermediate']}, {h['heads']} / {h['kv_heads']} heads "
             f"x {h['head_dim']}, vocab 32003, trained from random init on {text.format(python=t['python'])} "
             f"({t['train_tokens']:,} tokens of "
             f"{t['train_documents']} documents; corpus sha256 {t['corpus_sha256'][:12]}), {h['steps']} steps of "
             f"{h['batch']} x {h['seq']} tokens ({t['tokens']:,} tokens), AdamW, cosine lr from {h['lr']:g}, "
             f"{t['seconds'] / 60:.1f} min wall-clock on {t['threads']} thread(s). Held-out loss (documents of "
             f"modules never trained on) {t['eval_loss'][0]:.2f} -> {t['eval_loss'][-1]:.3f} nats/token "
             f"(training loss, mean of the last 20 steps, {t['final_train_loss_mean_last_20']:.3f})"
             + (f"; curve: `{trained['loss_curve']}`" if trained.get("loss_curve") else "") + ".", "",
             f"Teacher-forced on {trained['text_rows']} held-out windows ({trained['text_tokens']:,} tokens; fp32 "
             f"predicts the next token {100 * trained['fp32_text_top1_accuracy']:.1f}% of the time); greedy: "
             f"{trained['held_prompts']} held-out document openings of {trained['prompt_tokens']} tokens x "
             f"{trained['new_tokens']} new tokens ({GREEDY_CHUNK} a batch: the decode steps run through qmatmul.c)."
             + (f" GPTQ variants: calibrated on {trained['calibration']['windows']} windows "
                f"({trained['calibration']['tokens']:,} tokens) of the training text (idefics2_mini/quantize/gptq.py: "
                "the same format and kernels, other integers)." if trained.get("calibration") else ""),
             ""]
    return lines + accuracy_lines(trained, "this trained model")


def write_report(out_dir: Path, info: dict, args, bandwidth: float, bandwidths: list[float], ops, decode, accuracy,
                 path: Path, trained=None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# Weight-only quantization — {info['device']}", "",
             f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; torch {info['torch']}, "
             f"{args.threads} threads; {info['date']}",
             f"- run: `python -m benchmarks.quantize {' '.join(sys.argv[1:])}`",
             f"- measured read bandwidth (torch.sum over 1 GiB fp32): **{bandwidth:.1f} GB/s**, the median of "
             + ", ".join(f"{b:.1f}" for b in bandwidths) + " (at the start, before each decode variant, at the end)",
             f"- checkpoint: `{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}` "
             "(8B widths, 2 decoder layers, realistic weight statistics: see the benchmark's docstring)",
             "- the CPU is shared with other engineers' tests and benchmarks: figures may be lower than on a quiet "
             "machine (each decode row gives the other processes' CPU use)", ""]
    goal = targets(decode, accuracy, bandwidth, trained)
    if goal:
        lines += ["## Targets (issue 15, CPU)", "", "| target | wanted | measured | met |", "|---|---|---|:---:|"]
        lines += [f"| {what} | {want} | {got} | {'yes' if met else 'NO'} |" for what, want, got, met in goal]
        lines.append("")
    if ops:
        lines += ["## One linear at decode sizes", "", "| weight | rows | implementation | ms | GB/s read | share of bandwidth |",
                  "|---|---:|---|---:|---:|---:|"]
        for r in ops:
            lines.append(f"| {r['shape']} | {r['rows']} | {r['impl']} | {r['ms']:.3f} | {r['gbs']:.1f} | "
                         f"{100 * r['gbs'] / bandwidth:.0f}% |")
        lines.append("")
    if decode:
        best_float = max(decode[n]["decode_b1"]["tokens_per_s"] for n in decode if n.startswith("ours fp32")
                         or n.startswith("ours bf16"))
        lines += ["## Decode, load and memory", "",
                  f"Speed-up = batch-1 tokens/s over the faster of ours fp32 / bf16 ({best_float:.2f} tok/s). "
                  "Load peak = VmHWM above the process's RSS before loading; its ratio is to the loaded model's bytes. "
                  f"Each variant ran {args.rounds} time(s), interleaved; the round with the fastest batch-1 decode is "
                  "shown (every round's tokens/s: the last column).",
                  "", "| variant | load s | load peak MiB | model MiB | peak / model | b1 tok/s | b8 tok/s | "
                  "speed-up b1 | GB/step b1 | GB/s b1 | share of bandwidth b1 | GB/s b8 | others' CPU | rounds b1 / b8 tok/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, r in decode.items():
            b1, b8 = r["decode_b1"], r["decode_b8"]
            lines.append(
                f"| {name} | {r['load_s']:.2f} | {r['load_peak_above_base_mib']:,.0f} | {r['model_mib']:,.0f} | "
                f"{r['load_peak_above_base_mib'] / r['model_mib']:.2f} | {b1['tokens_per_s']:.2f} | "
                f"{b8['tokens_per_s']:.2f} | {b1['tokens_per_s'] / best_float:.2f}x | {b1['step_bytes'] / 1e9:.3f} | "
                f"{b1['gbs']:.1f} | {100 * b1['gbs'] / bandwidth:.0f}% | {b8['gbs']:.1f} | "
                f"{100 * r.get('others_cpu', float('nan')):.0f}% | "
                + " / ".join(", ".join(f"{t:.1f}" for t in r.get("rounds_tokens_per_s", {}).get(key, []))
                             for key in ("decode_b1", "decode_b8")) + " |")
        lines.append("")
    if accuracy:
        lines += ["## Accuracy against ours fp32 (random 8B-wide checkpoint)", "",
                  f"Teacher-forced on a {accuracy['text_tokens']}-token text; greedy: {accuracy['held_prompts']} "
                  f"held prompts x {accuracy['new_tokens']} new tokens (left-padded, {GREEDY_CHUNK} a batch)."
                  + "".join(f" {name}: calibrated on {accuracy['calibration']['windows']} x "
                            f"{accuracy['calibration']['tokens'] // accuracy['calibration']['windows']} tokens of "
                            f"{accuracy['calibration']['source']}, in {v['gptq_s']:.0f} s on this machine."
                            for name, v in accuracy["variants"].items() if "gptq_s" in v), ""]
        lines += accuracy_lines(accuracy, "this random 2-layer network")
    for one in (trained or {}).values():
        lines += trained_lines(one)
    (out_dir / "quantize.md").write_text("\n".join(lines))
    (out_dir / "quantize.json").write_text(json.dumps(dict(
        info=info, bandwidth_gbs=bandwidth, bandwidth_samples_gbs=bandwidths, ops=ops, decode=decode,
        accuracy=accuracy, trained=trained, targets=[dict(what=w, wanted=t, measured=m, met=ok) for w, t, m, ok in goal]),
        indent=1) + "\n")
    print(f"wrote {out_dir / 'quantize.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="ops,decode,accuracy,trained")
    parser.add_argument("--threads", type=int, default=common.usable_cores())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2,
                        help="decode: every variant this many times, interleaved; the fastest round is kept")
    parser.add_argument("--max-wait", type=float, default=60.0)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny checkpoint, one repeat (smoke test)")
    parser.add_argument("--weights", default=str(ROOT / "weights" / "bench"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.max_wait, args.rounds = 0.0, 1
    if args.child:
        print(RESULT_PREFIX + json.dumps(child(json.loads(args.child))), flush=True)
        return
    torch.set_num_threads(args.threads)
    info = common.machine_info(torch.device("cpu"), args.threads)
    out_dir = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / common.slug(info["device"])
    parts = set(args.parts.split(","))
    path = Path(args.weights) / ("quantize-tiny" if args.quick else "quantize-wide")
    common.wait_for_quiet_machine(args.max_wait, log=lambda m: print(m, flush=True))
    bandwidths = [common.measure_read_bandwidth(torch.device("cpu"), gib=0.25 if args.quick else 1.0)]
    print(f"measured read bandwidth: {bandwidths[0]:.1f} GB/s", flush=True)
    previous = {}
    if (out_dir / "quantize.json").is_file() and not args.quick:  # a part run alone keeps the others' results
        previous = json.loads((out_dir / "quantize.json").read_text())
    ops = run_ops(args.threads, args.quick) if "ops" in parts else previous.get("ops")
    decode = accuracy = None
    if "decode" in parts or "accuracy" in parts:
        build_checkpoint(path, args.quick)
    if "decode" in parts:
        from benchmarks.e2e import make_inputs  # noqa: PLC0415

        inputs = Path(args.weights) / "quantize-inputs.pt"
        make_inputs(inputs)
        decode = run_decode(args, path, inputs, bandwidths)
        bandwidths.append(common.measure_read_bandwidth(torch.device("cpu"), gib=0.25 if args.quick else 1.0))
        bandwidth = statistics.median(bandwidths)
    else:
        decode = previous.get("decode")
        bandwidth = previous.get("bandwidth_gbs") if decode else statistics.median(bandwidths)
        bandwidths = previous.get("bandwidth_samples_gbs", [bandwidth]) if decode else bandwidths
    accuracy = run_accuracy(path, args.quick) if "accuracy" in parts else previous.get("accuracy")
    if "trained" in parts:
        trained = {size: run_trained(Path(args.weights), size, out_dir if args.out or not args.quick else None)
                   for size in (("quick",) if args.quick else TRAINED_MODELS)}
    else:
        trained = previous.get("trained")
        trained = {"full": trained} if trained and "variants" in trained else trained  # written before "code"
    if args.quick and not args.out:
        return
    write_report(out_dir, info, args, bandwidth, bandwidths, ops, decode, accuracy, path, trained)


if __name__ == "__main__":
    main()
