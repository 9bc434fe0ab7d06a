"""Load and save checkpoints in the official Idefics2 safetensors layout.

The official names and ours differ only in their prefixes (every sub-name inside a component is
the official one), so the whole mapping is this table:
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import Idefics2Config
from .generation import GenerationDefaults
from .model import Idefics2

# official checkpoint prefix        -> prefix in Idefics2 (first match wins)
PREFIX_TABLE: tuple[tuple[str, str], ...] = (
    ("model.vision_model.encoder.", "vision."),  # encoder.layers.N.* -> vision.layers.N.*
    ("model.vision_model.", "vision."),
    ("model.connector.", "connector."),
    ("model.text_model.", "text."),
    ("lm_head.", "lm_head."),
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as it is."""


def official_to_ours(name: str) -> str | None:
    for official, ours in PREFIX_TABLE:
        if name.startswith(official):
            return ours + name[len(official) :]
    return None


def ours_to_official(name: str) -> str:
    # The reverse of the table; the encoder row must be tried first for vision.layers.*.
    if name.startswith("vision.layers."):
        return "model.vision_model.encoder." + name[len("vision.") :]
    for official, ours in PREFIX_TABLE[1:]:
        if name.startswith(ours):
            return official + name[len(ours) :]
    raise KeyError(name)


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Official tensor name -> the file that holds it, for a single or sharded checkpoint.

    Checks that every shard the index names exists; raises CheckpointError naming what is missing.
    """
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    index_path, single_path = path / INDEX_FILE, path / SINGLE_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path} is not a valid safetensors index (needs a 'weight_map'): {err}") from err
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise CheckpointError(
                f"{path}: the index names {len(shards)} shard(s) but {len(missing)} are missing: {', '.join(missing)}"
            )
        return {name: path / shard for name, shard in weight_map.items()}
    if single_path.is_file():
        names = _tensor_names(single_path)
        return {name: single_path for name in names}
    raise CheckpointError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


# safetensors dtype codes -> torch dtypes (the file format: 8-byte little-endian header length,
# a JSON header {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw data).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(file: Path) -> tuple[dict[str, dict], int]:
    """Parse and check a safetensors header: (tensor name -> {dtype, shape, data_offsets},
    offset of the data section). Raises CheckpointError naming the file when the header is
    corrupt or a tensor's bytes run past the end of the file (a truncated download)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file} is not a safetensors file: only {size} bytes long")
            header_len = struct.unpack("<Q", prefix)[0]
            if header_len > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{file} is not a safetensors file (header length {header_len} is impossible)")
            header = json.loads(handle.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} has a corrupt safetensors header: {err}") from err
    except OSError as err:
        raise CheckpointError(f"{file} could not be read: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            count = math.prod(entry["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{file}: tensor {name} has a corrupt header entry {entry!r}") from err
        if end - begin != count * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{file}: tensor {name} has inconsistent offsets {entry['data_offsets']}")
        if data_start + end > size:
            raise CheckpointError(
                f"{file} is truncated: tensor {name} needs bytes up to {data_start + end} but the file "
                f"has {size} (re-download it)"
            )
    return header, data_start


def _tensor_names(file: Path) -> list[str]:
    return list(read_header(file)[0])


Headers = dict[Path, tuple[dict[str, dict], int]]  # file -> read_header(file)


def _iter_tensors(
    files: dict[str, Path], headers: Headers, keep_mapped: bool = False
) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """Yield (official name, file, tensor) for every tensor of `files`, file by file; each
    tensor is a zero-copy view of the file's memory mapping (private: writing to it never
    touches the file).

    keep_mapped=False (copy loading): a yielded view is valid only until the next one is asked
    for (the caller copies it into its parameter), and the pages it read are handed back to
    the kernel right after, so the process never holds more than one source tensor besides the
    model it is building.
    keep_mapped=True (mapped loading): the views stay valid for as long as they are referenced
    (each keeps its file's mapping alive), and tensors that lie back to back in the file are
    views of one storage, back to back (which is what lets gate/up fuse without a copy).
    """
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    page = mmap.PAGESIZE
    for file, names in by_file.items():
        header, data_start = headers[file]
        with open(file, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        file_bytes = torch.frombuffer(mapped, dtype=torch.uint8) if keep_mapped else None
        for name in names:
            if name not in header:
                raise CheckpointError(f"{file} does not hold tensor {name}, which the index says it does")
            entry = header[name]
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = (data_start + offset for offset in entry["data_offsets"])
            if keep_mapped:  # _use_mapping checked that every tensor starts on an element boundary
                yield name, file, file_bytes[begin:end].view(dtype).view(entry["shape"])
                continue
            view = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
            yield name, file, view.reshape(entry["shape"])
            del view
            aligned = begin - begin % page
            if hasattr(mapped, "madvise") and end > aligned:
                mapped.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
        del file_bytes
        if not keep_mapped:
            mapped.close()


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    mmap: bool | None = None,
) -> Idefics2:
    """Build the model from `path` (config.json + official safetensors) in `dtype` on `device`.

    Two ways, the same model and the same checks:

    - mapped (mmap=True; the default on the CPU when every checkpoint tensor is already in
      `dtype`): the parameters *are* the checkpoint's bytes, views of a private (copy-on-write)
      memory mapping of each file. Nothing is read at load time: pages are read on first use
      and stay shared with the page cache, like the reference's loader. Changing a parameter
      in place never writes to the file. Projections are fused as views where the file holds
      them back to back (gate/up in the official layout); q/k/v are copied into a fused matrix
      only when small, else they run one by one (see `layers.fuse_linears`, mode "mapped").
    - copied (mmap=False, and always on GPUs or when converting dtype): the model is laid out
      once in `dtype` on `device` in its final form (fused projections; see
      `Idefics2.fuse_projections`) and each tensor is copied from the mapped file into it,
      converting on the way: peak memory is the model plus one tensor in flight.

    Strict: every expected tensor present, nothing unexpected, every shape equal; otherwise
    CheckpointError naming tensor and file. `progress(done, total)` is called after each file.
    """
    path = Path(path)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    device = torch.device(device)
    config = Idefics2Config.from_pretrained(path)
    files = checkpoint_files(path)
    with torch.device("meta"):
        model = Idefics2(config)
    expected_names = {name for name, _ in model.named_parameters()}

    unexpected = sorted(name for name in files if official_to_ours(name) not in expected_names)
    if unexpected:
        shown = ", ".join(f"{name} (in {files[name].name})" for name in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: unexpected tensors not in the model: {shown}{more}")
    present = {official_to_ours(name) for name in files}
    tied = {"lm_head.weight"} if config.text.tie_word_embeddings else set()
    missing = sorted(ours_to_official(name) for name in expected_names if name not in present and name not in tied)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {shown}")

    headers = {file: read_header(file) for file in sorted(set(files.values()))}
    mapped = _use_mapping(mmap, headers, dtype, device)
    if not mapped:
        _allocate_parameters(model, dtype, device)  # uninitialised; every one is overwritten below
        model.fuse_projections("empty")
    expected = dict(model.named_parameters())
    total_files = len(set(files.values()))
    current_file, files_done = None, 0
    with torch.no_grad():
        for name, file, tensor in _iter_tensors(files, headers, keep_mapped=mapped):
            if file != current_file:
                if current_file is not None and progress is not None:
                    files_done += 1
                    progress(files_done, total_files)
                current_file = file
            ours = official_to_ours(name)
            target = expected[ours]
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{file.name}: tensor {name} has shape {list(tensor.shape)} but the config "
                    f"({path / 'config.json'}) needs {list(target.shape)}"
                )
            if not tensor.is_floating_point():
                raise CheckpointError(f"{file.name}: tensor {name} has dtype {tensor.dtype}, expected floating point")
            if mapped:
                module_name, _, attribute = ours.rpartition(".")
                setattr(model.get_submodule(module_name), attribute, torch.nn.Parameter(tensor, requires_grad=False))
            else:
                target.copy_(tensor)  # converting dtype, moving device: parameters never alias the file
            del tensor
    if progress is not None and current_file is not None:
        progress(files_done + 1, total_files)
    if config.text.tie_word_embeddings:
        model.lm_head.weight = model.text.embed_tokens.weight
    if mapped:
        model.fuse_projections("mapped")
    # Non-persistent buffers (RoPE frequencies) are recomputed, not loaded.
    model.text.rotary = type(model.text.rotary)(config.text.head_dim, config.text.rope_theta).to(device)
    model.generation_defaults = GenerationDefaults.from_pretrained(path, config)
    model.eval()
    return model


def _use_mapping(mmap: bool | None, headers: Headers, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether parameters can be views of the mapped files: on the CPU, and only when no tensor
    needs converting. mmap=None picks that whenever it can; True insists (or says why not)."""
    if mmap is False:
        return False
    reason = None
    if device.type != "cpu":
        reason = f"the model goes to {device}, not the CPU"
    else:
        for file, (header, data_start) in headers.items():
            stored = {SAFETENSORS_DTYPES[entry["dtype"]] for entry in header.values()}
            if stored != {dtype}:
                shown = ", ".join(sorted(str(d).removeprefix("torch.") for d in stored))
                reason = f"{file.name} holds {shown} tensors and the model is asked for {dtype}"
                break
            if any((data_start + entry["data_offsets"][0]) % dtype.itemsize for entry in header.values()):
                reason = f"{file.name} has tensors that do not start on a {dtype} element boundary"
                break
    if reason is not None and mmap:
        raise ValueError(f"cannot map the checkpoint (mmap=True): {reason}; load with mmap=False to copy")
    return reason is None


def _allocate_parameters(model: torch.nn.Module, dtype: torch.dtype, device) -> None:
    """Give every (meta) parameter real, uninitialised storage of `dtype` on `device`.
    (Not `.to(dtype).to_empty()`: those dispatch through meta-tensor Python refs, whose first
    use imports sympy and friends, a noticeable share of a small model's load time.)"""
    for name, param in list(model.named_parameters()):
        module_name, _, attribute = name.rpartition(".")
        storage = torch.empty(param.shape, dtype=dtype, device=device)
        setattr(model.get_submodule(module_name), attribute, torch.nn.Parameter(storage, requires_grad=False))


def save_checkpoint(
    model: Idefics2,
    path: str | Path,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write config.json + safetensors with the official tensor names (sharded with an index
    when `max_shard_bytes` is given and the model is larger)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if name == "lm_head.weight" and model.config.text.tie_word_embeddings:
            continue
        value = param.detach()
        tensors[ours_to_official(name)] = (value if dtype is None else value.to(dtype)).contiguous().cpu()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        _save_file_replacing(tensors, path / SINGLE_FILE)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_size = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_size + size > max_shard_bytes:
            shards.append({})
            shard_size = 0
        shards[-1][name] = tensor
        shard_size += size
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_file_replacing(shard, path / shard_name)
        weight_map.update({name: shard_name for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _save_file_replacing(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Write a safetensors file next to `file`, then rename it over `file`. A model loaded
    mapped may be saving over the very files its parameters are views of: truncating such a
    file in place would pull the bytes from under them (a crash on the next read). Renaming
    leaves the old file alive, unnamed, for as long as something maps it."""
    partial = file.with_name(file.name + ".partial")
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, file)
