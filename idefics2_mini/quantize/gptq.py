"""GPTQ: the integers of a quantized weight chosen with calibration text instead of rounded to
nearest (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", Algorithm 1).

Rounding to nearest (formats.quantize_weight) makes each weight's own error as small as it can
be. What a layer is judged by is its output on the inputs it gets: for one output row w,
||X w_q - X w||^2 = (w_q - w) H (w_q - w)^T with H = X^T X, X [tokens, in] the layer's inputs.
GPTQ quantizes the columns of W left to right and after each one moves that column's rounding
error onto the columns not yet quantized, in the proportions that minimise this output error
(the optimal-brain-surgeon update, read off the upper Cholesky factor U of H^-1: row i of U says
how column i's error spreads to the columns after it). The grid of a group (its scale and zero,
formats.group_grid) is taken when the group is reached, from its columns as updated by then.
The stored format, the kernels and the decode speed are round-to-nearest's: only which integers
are stored changes.

    from idefics2_mini.quantize import QuantSpec, quantize_gptq
    quantize_gptq(model, QuantSpec(4), calibration)     # calibration: token ids [B, T]
    python -m idefics2_mini quantize --weights DIR --bits 4 --calibration text.txt --out DIR

The linears are done in model order, a few modules at a time (their H within
`max_hessian_bytes`), each few from one pass of the calibration text through the model as it is
by then: the layers before them are quantized already, so each H holds the inputs the layer will
really get (the paper's order). A pass stops once the last layer it measures has run. Linears
the text never reaches (the connector and the vision tower, with text only) are rounded to
nearest, and named in `model.quantization_info` (written into the checkpoint's quantization
block). Needs the float model in memory (the 8B in bf16: ~17 GB) and a calibration pass per few
layers: an offline step, unlike quantizing while loading.

Measured on the two small trained LMs of benchmarks/quantize.py (part `trained`; calibration: 64
windows of 128 tokens of their training text; judged on held-out text): int4 g64's output error
per layer ~2-3% -> ~0.3-1%, teacher-forced top-1 agreement with fp32 98.2% -> 99.4% (docstrings)
and 97.9% -> 99.1% (source), greedy continuations of 32 tokens identical to fp32's 11 -> 19 and
7 -> 20 of 24 prompts; ~3 s for their 29 linears on 2 CPU cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from .formats import QuantizationError, QuantizedWeight, QuantSpec, group_grid, pack_int4, round_to_grid
from .linear import QuantizedLinear, _spec, checked_linear_names, replace_linears, unfuse_float_group

BLOCK_COLUMNS = 128  # columns updated together before the lazy update of the rest (the paper's B)
DAMP = 0.01  # added to H's diagonal, times its mean: keeps H invertible (dead inputs, few tokens)
# Calibration tokens per input column below which quantize_gptq warns. With fewer tokens than a
# layer's width, H has directions the text never shows, and GPTQ moves error into them: on the
# 8B-wide random checkpoint (layers 4096-14336 wide, 2,048 tokens) int4 g64's output error on
# other text went from rounding's 11.4% to 14.9%; on the trained LMs (<= 768 wide, 8,192 tokens)
# it went from 2-3% to 0.3-1%. The paper calibrates on 128 x 2048 tokens.
CALIBRATION_TOKENS_PER_INPUT = 4


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = DAMP) -> QuantizedWeight:
    """weight [N, K] float, hessian [K, K] (X^T X / tokens of the layer's inputs) -> the weight
    quantized under `spec` by GPTQ (module docstring). With H a multiple of the identity no error
    moves, and this is round-to-nearest exactly."""
    rows, k = weight.shape
    group = spec.group_for(k)
    if k % group:
        raise QuantizationError(f"group size {group} does not divide the linear's {k} input columns")
    w = weight.detach().float().clone()
    h = hessian.detach().float().to(w.device, copy=True)
    dead = torch.diagonal(h) == 0  # inputs that were always 0: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_cholesky(h, damp)
    q = torch.empty(rows, k, dtype=torch.int8, device=w.device)
    scales = torch.empty(rows, k // group, dtype=spec.scale_dtype(), device=w.device)
    zeros = None if spec.symmetric else torch.empty_like(scales)
    block = max(BLOCK_COLUMNS // group, 1) * group if group <= BLOCK_COLUMNS else BLOCK_COLUMNS
    for start in range(0, k, block):
        end = min(start + block, k)
        part = w[:, start:end].clone()  # this block's columns, updated column by column
        errors = torch.zeros_like(part)
        for i in range(end - start):
            column = start + i
            if column % group == 0:  # the group's grid, from its columns as they are now
                now = torch.cat([part[:, i:], w[:, end : column + group]], 1)[:, :group]
                s, z = group_grid(now, spec)
                scales[:, column // group] = s
                if zeros is not None:
                    zeros[:, column // group] = z
                s_col, z_col = s.float(), None if z is None else z.float()
            value = part[:, i]
            q[:, column] = round_to_grid(value, s_col, z_col, spec)
            dequantized = q[:, column].float() * s_col + (0.0 if z_col is None else z_col)
            error = (value - dequantized) / u[column, column]
            part[:, i:] -= error[:, None] * u[column, column:end][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]  # the block's errors onto every later column at once
    return QuantizedWeight(q if spec.bits == 8 else pack_int4(q, group), scales, zeros)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp mean(diag H) I)^-1, damped more if H is not
    positive definite in fp32 (few calibration tokens, correlated inputs)."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean = torch.diagonal(h).mean()
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * 10**attempt * mean * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    raise QuantizationError("GPTQ: the layer's input covariance is not invertible even damped 10^5-fold "
                            "(calibration text too short or degenerate? give more, varied text)")


class _Hessians:
    """Forward hooks that sum X^T X of chosen linears' inputs. Linears fed the very same tensor
    (q/k/v, gate/up) share one sum."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.shared: dict[str, str] = {}  # name -> the name whose sum it shares
        self._last: tuple[torch.Tensor, str] | None = None

    def hook(self, name: str):
        def record(module, inputs, output):
            x = inputs[0]
            if self._last is not None and self._last[0] is x:
                self.shared[name] = self._last[1]
                return
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            if name in self.sums:
                self.sums[name].addmm_(flat.T, flat)
            else:
                self.sums[name] = flat.T @ flat
            self.tokens[name] = self.tokens.get(name, 0) + flat.shape[0]
            self._last = (x, name)

        return record

    def of(self, name: str) -> torch.Tensor | None:
        source = self.shared.get(name, name)
        return None if source not in self.sums else self.sums[source] / self.tokens[source]


class _PassDone(Exception):
    """Raised by a hook once the last linear a calibration pass measures has run."""


def quantize_gptq(model: nn.Module, bits: int | str | QuantSpec = 4, calibration: torch.Tensor | None = None,
                  group_size: int | None = None, symmetric: bool | None = None,
                  components: tuple[str, ...] | None = None, batch_size: int = 8,
                  max_hessian_bytes: int = 2 * 2**30, damp: float = DAMP,
                  log: Callable[[str], None] | None = None) -> nn.Module:
    """Replace the spec's linears of the float `model` by QuantizedLinear whose integers GPTQ
    chose on `calibration` (token ids [B, T], int64: text like the model will see, at least
    CALIBRATION_TOKENS_PER_INPUT tokens per input column of the widest layer, e.g. 128 windows of
    512 for the 8B), in place; returns the model (module docstring). The spec as in `quantize`;
    `log` gets a line per few layers (and a warning when the text is short)."""
    spec = _spec(bits, group_size, symmetric, components)
    if calibration is None or not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 \
            or calibration.dtype not in (torch.int64, torch.int32) or calibration.numel() == 0:
        raise QuantizationError("GPTQ needs calibration token ids, an int64 tensor [windows, tokens] "
                                f"(got {getattr(calibration, 'shape', type(calibration).__name__)})")
    vocab = model.config.text.vocab_size
    if int(calibration.min()) < 0 or int(calibration.max()) >= vocab:
        raise QuantizationError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary)")
    names = checked_linear_names(model, spec)
    widest = max(model.get_submodule(name).in_features for name in names)
    if calibration.numel() < CALIBRATION_TOKENS_PER_INPUT * widest and log is not None:
        log(f"gptq: warning: {calibration.numel():,} calibration tokens for inputs up to {widest:,} wide (fewer "
            f"than {CALIBRATION_TOKENS_PER_INPUT}x): H is poorly sampled, and GPTQ may fit the calibration text "
            "rather than the model's inputs; give more text")
    from .fusion import fuse_group  # noqa: PLC0415

    # a fused float group runs q/k/v (gate/up) as one matmul, past the members' hooks: unfused for
    # the passes, fused again, quantized, at the end
    parents = [model.get_submodule(name.rpartition(".")[0]) if "." in name else model for name in names]
    unfused = [parent for parent in parents if unfuse_float_group(parent)]
    was_training = model.training
    model.eval()
    start, done, rounded = time.perf_counter(), 0, []
    for chunk in _chunks(model, names, max_hessian_bytes):
        hessians = _Hessians()
        handles = [model.get_submodule(name).register_forward_hook(hessians.hook(name)) for name in chunk]
        handles.append(model.get_submodule(chunk[-1]).register_forward_hook(_stop_pass))
        try:
            with torch.no_grad():
                for first in range(0, calibration.shape[0], batch_size):
                    try:
                        model(calibration[first : first + batch_size])
                    except _PassDone:
                        pass
        finally:
            for handle in handles:
                handle.remove()

        def make(name: str, linear: nn.Linear) -> QuantizedLinear:
            layer_spec = spec.for_layer(name)
            hessian = hessians.of(name)
            if hessian is None:  # the text never reached it
                rounded.append(name)
                return QuantizedLinear.from_linear(linear, layer_spec)
            return QuantizedLinear.from_linear(linear, layer_spec, gptq_weight(linear.weight, hessian, layer_spec, damp))

        replace_linears(model, chunk, make)
        done += len(chunk)
        if log is not None:
            log(f"gptq: {done}/{len(names)} linears ({chunk[-1]}), {time.perf_counter() - start:.1f} s")
    for parent in unfused:
        fuse_group(parent, "copy")
    model.train(was_training)
    model.quantization = spec
    model.quantization_info = {"method": "gptq", "calibration_windows": int(calibration.shape[0]),
                               "calibration_tokens": int(calibration.numel()), "damp": damp,
                               "rounded_to_nearest": rounded}
    if rounded and log is not None:
        log(f"gptq: {len(rounded)} linear(s) the calibration text does not reach rounded to nearest: "
            + ", ".join(rounded[:4]) + (" ..." if len(rounded) > 4 else ""))
    return model


def calibration_windows(token_ids: list[int] | torch.Tensor, windows: int, length: int, bos: int) -> torch.Tensor:
    """Token ids of a calibration text -> [n, length] int64: `windows` evenly spaced windows of
    length - 1 consecutive tokens, each after a BOS (where the model's inputs always start); fewer
    when the text is short (n = how many fit). Raises QuantizationError if not one fits."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    ids = ids[ids != bos]
    span = length - 1
    if windows < 1 or length < 2:
        raise QuantizationError(f"calibration needs at least 1 window of at least 2 tokens, got {windows} x {length}")
    if len(ids) < span:
        raise QuantizationError(f"the calibration text has {len(ids)} tokens, fewer than one window of {length}: "
                                "give more text or a smaller --calibration-length")
    count = min(windows, len(ids) // span)  # windows never overlap
    starts = torch.linspace(0, len(ids) - span, count).long() if count > 1 else torch.zeros(1, dtype=torch.long)
    body = torch.stack([ids[first : first + span] for first in starts.tolist()])
    return torch.cat([torch.full((count, 1), bos, dtype=torch.long), body], 1)


def _stop_pass(module, inputs, output):
    raise _PassDone


def _chunks(model: nn.Module, names: list[str], max_bytes: int) -> list[list[str]]:
    """`names` in order, cut into runs whose H (fp32, in x in per linear) fit `max_bytes`, never
    between two linears of one module (q/k/v share their input and are fused together)."""
    chunks: list[list[str]] = []
    size = 0
    for name in names:
        k = model.get_submodule(name).in_features
        same_module = chunks and chunks[-1][-1].rpartition(".")[0] == name.rpartition(".")[0]
        if chunks and (same_module or size + 4 * k * k <= max_bytes):
            chunks[-1].append(name)
            size += 4 * k * k
        else:
            chunks.append([name])
            size = 4 * k * k
    return chunks
