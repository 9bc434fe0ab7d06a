"""Weight-only quantization: int8 per output channel, int4 group-wise (32/64/128), symmetric or
asymmetric; activations stay in the model's dtype.

    from idefics2_mini.quantize import quantize, save_quantized
    quantize(model, bits=4, group_size=64)             # in place: the chosen nn.Linear -> QuantizedLinear
    quantize_gptq(model, 4, calibration=token_ids)     # the same, its integers chosen by GPTQ (gptq.py)
    save_quantized(model, "weights/idefics2-8b-int4")  # a quantized checkpoint (checkpoint.py)
    Idefics2.from_pretrained("weights/idefics2-8b-int4")               # loads it, quantized
    Idefics2.from_pretrained("weights/idefics2-8b", quantize="int4")   # quantizes while loading (streaming)

    python -m idefics2_mini quantize --weights DIR --bits 8|4 [--group-size G] --out DIR
    python -m idefics2_mini --quantize int8|int4 ...   (quantize on load)

Decode at batch 1 reads every weight once per token, so its speed is bandwidth / weight bytes:
int8 stores a quarter of fp32's bytes, int4 (+ bf16 scales) about a seventh. Which linears:
the decoder's, the connector's (projector and perceiver) and the lm_head by default (the
`components` of formats.COMPONENTS; the vision tower is optional); embeddings, norms and the
patch embedding stay float.

    formats.py      QuantSpec, and the quantization math (float -> integers, scales, zeros)
    linear.py       QuantizedLinear (its own fast path per call) and `quantize(model, ...)`
    cpu.py          the CPU kernel (qmatmul.c, built with the system C compiler) and the prefill path
    gptq.py         GPTQ: the integers chosen on calibration text (same format, fewer top-1 flips)
    fusion.py       q/k/v and gate/up of a quantized model as one call (the members' buffers, stacked)
    checkpoint.py   quantized checkpoints: save, streaming load, the `quantize` command
    kernels/dequant_matmul.py   the storage layout, dequantization reference and the Triton kernel (GPU)
"""

from kernels.dequant_matmul import dequantize_reference, quantized_matmul_reference

from .checkpoint import load_quantized, main, save_quantized
from .formats import COMPONENTS, QuantizationError, QuantizedWeight, QuantSpec, pack_int4, quantize_weight, unpack_int4
from .gptq import gptq_weight, quantize_gptq
from .linear import QuantizedLinear, quantize, quantized_linear_names

__all__ = [
    "COMPONENTS",
    "QuantSpec",
    "QuantizationError",
    "QuantizedLinear",
    "QuantizedWeight",
    "dequantize_reference",
    "gptq_weight",
    "load_quantized",
    "main",
    "pack_int4",
    "quantize",
    "quantize_gptq",
    "quantize_weight",
    "quantized_linear_names",
    "quantized_matmul_reference",
    "save_quantized",
    "unpack_int4",
]
