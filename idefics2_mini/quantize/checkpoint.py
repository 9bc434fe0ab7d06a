"""Quantized checkpoints: write them, and load them or a float checkpoint quantized on the way.

A quantized checkpoint is an official-layout folder (config.json + model.safetensors, or shards
with an index) in which every quantized linear's `<name>.weight` is replaced by

    <name>.qweight   I8 [out, in]         (int8)   or  U8 [out, in/2]   (int4, two nibbles a byte)
    <name>.scales    F32 [out, 1]         (int8)   or  BF16 [out, in/G] (int4)
    <name>.zeros     same as scales, only when asymmetric

(the layout: kernels/dequant_matmul.py), `<name>` the official name (e.g.
`model.text_model.layers.0.self_attn.q_proj`); every other tensor keeps its official name, in a
float dtype. config.json carries a `quantization` block (formats.QuantSpec.to_config):

    "quantization": {"format": "idefics2_mini.weight_only", "version": 2, "bits": 4,
                     "group_size": 64, "symmetric": false, "components": ["text", "connector", "lm_head"],
                     "lm_head_bits": 8}

(an int4 model's lm_head is int8 unless `lm_head_bits` says 4: formats.py; a version 1 block,
without the key, quantized it with `bits`).

`load_quantized` fills a model built on the meta device from either kind of folder, streaming:
the model is laid out once in its final, quantized form, then the files are read in blocks of
rows (each block quantized, or converted, into place, and its pages handed back to the kernel
right after), so peak memory is the quantized model plus one block - the official 33.6 GB of
fp32 files load as int4 in ~6 GB.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .. import loading
from ..config import Idefics2Config
from .formats import QuantizationError, QuantSpec, quantize_weight
from .fusion import fuse_quantized_projections
from .linear import QuantizedLinear, checked_linear_names

QUANTIZED_SUFFIXES = (".qweight", ".scales", ".zeros")
BLOCK_BYTES = 16 * 2**20  # rows of a stored tensor read (and quantized) at once
CALIBRATION_WINDOWS, CALIBRATION_LENGTH = 128, 512  # `quantize --calibration`: the GPTQ paper's 128 x 2048, shorter


def stored_spec(config: Idefics2Config) -> QuantSpec | None:
    """The QuantSpec a checkpoint's config.json declares, or None for a float checkpoint."""
    return None if config.quantization is None else QuantSpec.from_config(config.quantization)


def apply_structure(model: nn.Module, spec: QuantSpec, dtype: torch.dtype | None = None) -> list[str]:
    """Replace the spec's linears of `model` by empty QuantizedLinear modules on the same device
    (the meta device for a skeleton), without reading any weight; returns their names."""
    names = checked_linear_names(model, spec)
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear, layer = getattr(parent, attribute), spec.for_layer(name)
        setattr(parent, attribute, QuantizedLinear(
            linear.in_features, linear.out_features, layer.bits, layer.group_for(linear.in_features), layer.symmetric,
            bias=linear.bias is not None, compute_dtype=dtype or linear.weight.dtype, device=linear.weight.device))
    model.quantization = spec
    return names


def quantized_skeleton(model: nn.Module, block: dict) -> nn.Module:
    """`model` (built from a config.json with a quantization `block`, on the meta device) in the
    quantized form the checkpoint stores: what loading.check_checkpoint compares files with."""
    apply_structure(model, QuantSpec.from_config(block))
    return model


# ----------------------------------------------------------------------------- reading


def _stream_blocks(found: loading.Inspection, block_bytes: int | None = None
                   ) -> Iterator[tuple[str, Path, int, torch.Tensor]]:
    """Yield (official name, file, first row, rows [r, ...]) for every tensor, file by file, in
    blocks of whole rows of at most `block_bytes` (a 0-d or 1-d tensor is one block). Each block
    is a view of the file's private mapping, valid until the next is asked for; its pages are
    then handed back to the kernel, so the process holds at most one block of the files."""
    by_file: dict[Path, list[str]] = {}
    for name, file in found.files.items():
        by_file.setdefault(file, []).append(name)
    page = mmap.PAGESIZE
    block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
    for file, names in by_file.items():
        header, data_start = found.headers[file]
        with open(file, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            for name in sorted(names, key=lambda n: header[n]["data_offsets"][0]):
                entry = header[name]
                dtype = loading.SAFETENSORS_DTYPES[entry["dtype"]]
                shape = entry["shape"]
                begin = data_start + entry["data_offsets"][0]
                rows = shape[0] if len(shape) >= 2 else 1
                row_shape = shape[1:] if len(shape) >= 2 else shape
                row_bytes = dtype.itemsize * max(1, int(torch.Size(row_shape).numel()))
                per_block = max(1, block_bytes // row_bytes)
                for first in range(0, rows, per_block):
                    count = min(per_block, rows - first)
                    offset = begin + first * row_bytes
                    view = torch.frombuffer(mapped, dtype=dtype, count=count * row_bytes // dtype.itemsize,
                                            offset=offset)
                    yield name, file, first, view.view(count, *row_shape) if len(shape) >= 2 else view.view(shape)
                    del view
                    aligned = offset - offset % page
                    end = offset + count * row_bytes
                    if hasattr(mapped, "madvise") and end > aligned:
                        mapped.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
        finally:
            mapped.close()


def _stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our name -> the tensor a checkpoint holds: parameters and persistent buffers (a
    QuantizedLinear's), a tensor registered twice (a tied lm_head) under its first name."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor
    return tensors


def _allocate(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Real, uninitialised storage for every (meta) parameter and buffer: floats in `dtype`,
    a QuantizedLinear's buffers in their own dtypes (int8/uint8, fp32/bf16 scales)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                               requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if isinstance(module, QuantizedLinear):  # the model's own buffers are recomputed, not loaded
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)  # noqa: SLF001
        if isinstance(module, QuantizedLinear):
            module.compute_dtype = dtype


def load_quantized(model: nn.Module, path: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
                   quantize: QuantSpec | str | None = None,
                   progress: Callable[[int, int], None] | None = None, fuse: bool = True) -> nn.Module:
    """Fill `model` (built from `path`'s config.json on the meta device) from a quantized
    checkpoint, or from a float one quantized by `quantize` on the way (streaming; see the
    module docstring). Floats come in `dtype` on `device`. Raises CheckpointError /
    QuantizationError naming the tensor and file before any data is read. `fuse`: the float
    projection groups left (e.g. the vision tower's) are laid out fused (backends/fusion.py), the
    quantized ones too (quantize/fusion.py)."""
    path = Path(path)
    device = torch.device(device)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    stored = stored_spec(model.config)
    wanted = QuantSpec.parse(quantize) if isinstance(quantize, str) else quantize
    if stored is not None and wanted is not None and wanted != stored:
        raise QuantizationError(f"{path} is already quantized ({stored.name}); it cannot be loaded as "
                                f"{wanted.name} (quantize the float checkpoint instead)")
    spec = stored or wanted
    if spec is None:
        raise QuantizationError(f"{path} is not a quantized checkpoint and no quantization was asked for")
    found = loading.inspect_checkpoint(path)
    problems = found.problems or _name_problems(model, found, path, stored is not None, spec)
    if problems:
        raise loading.CheckpointError(f"{path}: " + "; ".join(problems))
    tied = loading._tied_parameters(model)  # noqa: SLF001  (alias -> name, e.g. a tied lm_head)
    quantize_from_tied = {alias: name for alias, name in tied.items()
                          if spec.targets(alias.rpartition(".")[0]) and stored is None}
    tied = {alias: name for alias, name in tied.items() if not spec.targets(alias.rpartition(".")[0])}
    names = apply_structure(model, spec, dtype)
    quantize_on_load = {loading.ours_to_official(name + ".weight"): name for name in names} if stored is None else {}
    _allocate(model, dtype, device)
    if fuse:
        from ..backends import fusion  # noqa: PLC0415

        fusion.fuse_projections(model, "empty")  # the float groups left (fusion skips quantized ones)
        fuse_quantized_projections(model, "empty")  # the quantized ones: the loop below fills them through views
    targets = _stored_tensors(model)
    total_files, files_done, current = len(found.headers), 0, None
    with torch.no_grad():
        for name, file, first, block in _stream_blocks(found):
            if file != current:
                if current is not None and progress is not None:
                    files_done += 1
                    progress(files_done, total_files)
                current = file
            if name in quantize_on_load:
                layer = model.get_submodule(quantize_on_load[name])
                layer.set_rows(first, quantize_weight(block, spec.for_layer(quantize_on_load[name])))
                continue
            destination = targets[loading.official_to_ours(name)]
            if first == 0 and block.shape == destination.shape:
                destination.copy_(block)
            else:  # a block of rows
                destination[first : first + block.shape[0]].copy_(block)
        if progress is not None and current is not None:
            progress(files_done + 1, total_files)
        for alias, name in tied.items():
            module_name, _, attribute = alias.rpartition(".")
            setattr(model.get_submodule(module_name), attribute, model.get_parameter(name))
        for alias, name in quantize_from_tied.items():  # a tied lm_head: quantized from the embedding
            layer_name = alias.rpartition(".")[0]
            layer, source = model.get_submodule(layer_name), model.get_parameter(name)
            rows = max(1, BLOCK_BYTES // (4 * source.shape[1]))
            for first in range(0, source.shape[0], rows):
                layer.set_rows(first, quantize_weight(source[first : first + rows], spec.for_layer(layer_name)))
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.check()
    return model


def _name_problems(model: nn.Module, found: loading.Inspection, path: Path, quantized: bool,
                   spec: QuantSpec) -> list[str]:
    """The loader's name and shape rule (loading.tensor_problems) against what the folder must
    hold: the quantized layout for a quantized checkpoint (a missing `.scales` named as such),
    the official float layout when quantizing on load."""
    if not quantized:
        return loading.tensor_problems(model, found, path)
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    apply_structure(skeleton, spec)
    expected = {loading.ours_to_official(name) for name in _stored_tensors(skeleton)}
    lacking = sorted(name for name in expected - set(found.files) if name.endswith(QUANTIZED_SUFFIXES))
    problems = []
    if lacking:
        problems.append(f"the quantized checkpoint ({spec.name}) lacks {len(lacking)} quantization tensor(s): "
                        + loading._shown(lacking)  # noqa: SLF001
                        + " (written by an interrupted or other tool? re-run `python -m idefics2_mini quantize`)")
    return problems + loading.tensor_problems(skeleton, found, path)


# ----------------------------------------------------------------------------- writing


def save_quantized(model: nn.Module, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write a quantized model (after `quantize(model, ...)` or a quantized load) as a quantized
    checkpoint folder (module docstring)."""
    spec = getattr(model, "quantization", None)
    if not isinstance(spec, QuantSpec):
        raise QuantizationError("the model is not quantized (call idefics2_mini.quantize.quantize first)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in _stored_tensors(model).items():
        if name == "lm_head.weight" and model.config.text.tie_word_embeddings:
            continue
        tensors[loading.ours_to_official(name)] = tensor.detach().contiguous().cpu()
    loading.write_safetensors(tensors, path, max_shard_bytes)
    config = model.config.to_dict()
    config["quantization"] = spec.to_config()
    info = getattr(model, "quantization_info", None)  # how the integers were chosen (gptq.py); not read back
    if info:
        config["quantization"]["how"] = info
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m idefics2_mini quantize",
        description="Write a weight-only quantized copy of a checkpoint (int8 per channel or int4 group-wise); "
        "`python -m idefics2_mini --weights OUT ...` and Idefics2.from_pretrained(OUT) load it. Streams: peak "
        "memory is about the quantized model.",
    )
    parser.add_argument("--weights", required=True, metavar="DIR", help="the float checkpoint folder (official layout)")
    parser.add_argument("--bits", required=True, type=int, metavar="8|4", help="8 (per channel) or 4 (group-wise)")
    parser.add_argument("--group-size", type=int, default=None, metavar="G",
                        help="int4 only: 32, 64 (default) or 128 input columns per scale")
    parser.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                        help="symmetric (no zeros) or asymmetric (default: symmetric for int8, asymmetric for int4)")
    parser.add_argument("--components", default=",".join(QuantSpec(8).components), metavar="LIST",
                        help="comma-separated: text, connector, lm_head, vision (default: text,connector,lm_head)")
    parser.add_argument("--lm-head-bits", type=int, default=None, metavar="8|4",
                        help="the lm_head's width when quantized (default 8: an int4 lm_head costs the most "
                        "accuracy for the fewest bytes)")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="a UTF-8 text file like what the model will read: the integers are then chosen by "
                        "GPTQ on it (fewer flipped tokens than rounding to nearest, same format and speed; holds the "
                        "float model in memory, in --dtype, and runs it over the text once per few layers)")
    parser.add_argument("--calibration-windows", type=int, default=None, metavar="N",
                        help=f"with --calibration: windows of the text to run (default {CALIBRATION_WINDOWS})")
    parser.add_argument("--calibration-length", type=int, default=None, metavar="T",
                        help=f"with --calibration: tokens per window (default {CALIBRATION_LENGTH})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the tensors left in float (embeddings, norms, vision tower; default float32)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (created; files replaced)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size of the written files (default 5)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (QuantizationError, ValueError, OSError) as err:
        if os.environ.get("IDEFICS2_MINI_DEBUG"):
            raise
        print(f"error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> None:
    from ..model import Idefics2  # noqa: PLC0415

    source, out = Path(args.weights), Path(args.out)
    spec = QuantSpec(args.bits, args.group_size, args.symmetric,
                     tuple(c.strip() for c in args.components.split(",") if c.strip()), args.lm_head_bits)
    if not source.is_dir():
        raise QuantizationError(f"--weights {source}: no such folder")
    if out.resolve() == source.resolve():
        raise QuantizationError("--out must be a new folder, not the checkpoint being read")
    config = Idefics2Config.from_pretrained(source)
    if config.quantization is not None:
        raise QuantizationError(f"{source} is already quantized ({stored_spec(config).name}); quantize the float "
                                "checkpoint")
    start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    if args.calibration is None:
        if args.calibration_windows is not None or args.calibration_length is not None:
            raise QuantizationError("--calibration-windows / --calibration-length go with --calibration FILE")
        print(f"quantizing {source} to {spec.name} ...", file=sys.stderr, flush=True)
        model = Idefics2.from_pretrained(source, dtype=dtype, quantize=spec, backends=False)
    else:
        model = _quantize_gptq(source, spec, dtype, args)
    save_quantized(model, out, max_shard_bytes=int(args.max_shard_gb * 2**30))
    copied = _copy_side_files(source, out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    before = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    print(f"wrote {out}: {size / 1e9:.2f} GB (from {before / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s"
          + (f"; copied {', '.join(copied)}" if copied else ""), file=sys.stderr)


def _quantize_gptq(source: Path, spec: QuantSpec, dtype: torch.dtype, args: argparse.Namespace) -> nn.Module:
    """--calibration: the float model loaded, its integers chosen by GPTQ on the text (gptq.py)."""
    from ..model import Idefics2  # noqa: PLC0415
    from ..tokenizer import Idefics2Tokenizer  # noqa: PLC0415
    from .gptq import calibration_windows, quantize_gptq  # noqa: PLC0415

    file = Path(args.calibration)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise QuantizationError(f"--calibration {file}: no such file") from err
    except UnicodeDecodeError as err:
        raise QuantizationError(f"--calibration {file}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    tokenizer = Idefics2Tokenizer.from_pretrained(source)
    asked = CALIBRATION_WINDOWS if args.calibration_windows is None else args.calibration_windows
    length = CALIBRATION_LENGTH if args.calibration_length is None else args.calibration_length
    windows = calibration_windows(tokenizer.encode(text, add_bos=False), asked, length, tokenizer.bos_token_id)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    say(f"quantizing {source} to {spec.name} with GPTQ: {windows.shape[0]} calibration windows of "
        f"{windows.shape[1]} tokens from {file}" + (f" (the text holds no more than {windows.shape[0]}; "
        f"{asked} were asked for)" if windows.shape[0] < asked else "") + " ...")
    model = Idefics2.from_pretrained(source, dtype=dtype, backends=False)
    return quantize_gptq(model, spec, windows, log=say)


def _copy_side_files(source: Path, out: Path) -> list[str]:
    """Tokenizer, processor and generation files: everything but the weights and config.json."""
    copied = []
    for file in sorted(source.iterdir()):
        if file.is_file() and file.suffix != ".safetensors" and file.name not in (
                "config.json", loading.INDEX_FILE, "BUILT") and not file.name.endswith(".partial"):
            shutil.copy2(file, out / file.name)
            copied.append(file.name)
    return copied
