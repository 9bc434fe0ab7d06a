"""Load, check and save checkpoints in the official Idefics2 safetensors layout.

This module knows files, not the architecture: it fills (or checks against) a model that the
caller built, so `model.py` can use it without it importing `model.py`.

    inspect_checkpoint(folder)           every tensor's name, shape and file, from the headers only
    tensor_problems(model, found)        the one rule: every expected tensor, nothing else, same shapes
    load_weights(model, folder, ...)     both checks, then the bytes: mapped or copied
    check_checkpoint(folder, Idefics2)   both checks plus config and tokenizer, every problem listed
    save_checkpoint(model, folder)

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .backends.fusion import fuse_projections
from .config import Idefics2Config

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
# Every tensor is floating point except a quantized linear's integers (idefics2_mini/quantize/).
INTEGER_TENSOR_SUFFIXES = (".qweight",)


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


Headers = dict[Path, tuple[dict[str, dict], int]]  # file -> read_header(file)


@dataclass
class Inspection:
    """What a checkpoint folder holds, read from its index and safetensors headers only (not the
    data, so it takes seconds even for the 33.6 GB official download)."""

    files: dict[str, Path] = field(default_factory=dict)  # official tensor name -> the file holding it
    headers: Headers = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    def entry(self, name: str) -> dict:
        """The header entry {dtype, shape, data_offsets} of tensor `name`."""
        return self.headers[self.files[name]][0][name]


def inspect_checkpoint(folder: str | Path) -> Inspection:
    """Read a checkpoint folder's index and every file's safetensors header. Problems found (all
    of them, not only the first): no weights; an index that is not valid; a shard the index
    names missing; a file truncated or with a corrupt header (see `read_header`); the index and
    a shard disagreeing on which tensors it holds; a tensor that is not floating point."""
    folder = Path(folder)
    found = Inspection()
    if not folder.is_dir():
        found.problems.append(f"{folder} is not a folder")
        return found
    index_path, single_path = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"'weight_map' is a {type(weight_map).__name__}")
        except (ValueError, KeyError, TypeError) as err:
            found.problems.append(f"{INDEX_FILE} is not a valid index (needs a 'weight_map' object): {err}")
            return found
        shards = sorted(set(weight_map.values()))
        found.findings.append(f"{INDEX_FILE}: {len(weight_map)} tensors in {len(shards)} shard(s)")
        for shard in shards:
            listed = {name for name, file in weight_map.items() if file == shard}
            if not (folder / shard).is_file():
                found.problems.append(f"missing shard {shard} (the index puts {len(listed)} tensors in it)")
                continue
            if _add_file(found, folder / shard):
                _compare_shard(shard, listed, set(found.headers[folder / shard][0]), found.problems)
    elif single_path.is_file():
        if _add_file(found, single_path):
            found.findings.append(f"{SINGLE_FILE}: {len(found.files)} tensors")
    else:
        found.problems.append(f"no weights: {folder} holds neither {SINGLE_FILE} nor {INDEX_FILE} (+ shards)")
    for name, file in found.files.items():
        if name.endswith(INTEGER_TENSOR_SUFFIXES):
            continue
        if not SAFETENSORS_DTYPES[found.entry(name)["dtype"]].is_floating_point:
            found.problems.append(f"{file.name}: tensor {name} has dtype {found.entry(name)['dtype']}, "
                                  "expected floating point")
    return found


def _add_file(found: Inspection, file: Path) -> bool:
    try:
        found.headers[file] = read_header(file)
    except CheckpointError as err:
        found.problems.append(str(err))
        return False
    found.files.update({name: file for name in found.headers[file][0]})
    return True


def _compare_shard(shard: str, listed: set[str], held: set[str], problems: list[str]) -> None:
    if listed - held:
        problems.append(f"{shard} lacks {len(listed - held)} tensor(s) the index puts in it: {_shown(listed - held)}")
    if held - listed:
        problems.append(f"{shard} holds {len(held - listed)} tensor(s) the index does not list: {_shown(held - listed)}")


def _shown(names, limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def tensor_problems(model: nn.Module, found: Inspection, folder: str | Path = "") -> list[str]:
    """The checkpoint against the model built from its config.json (on the meta device is
    enough): every parameter present under its official name, no tensor the model lacks, every
    shape equal. A tied parameter (lm_head = embeddings) is expected once."""
    expected = {ours_to_official(name): list(param.shape) for name, param in model.named_parameters()}
    # Persistent buffers: a quantized linear's qweight/scales/zeros (the plain model has none).
    parameter_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    expected.update({ours_to_official(name): list(buffer.shape) for name, buffer in model.state_dict().items()
                     if name not in parameter_names})
    config_file = Path(folder) / "config.json"
    problems = []
    missing = set(expected) - set(found.files)
    unexpected = set(found.files) - set(expected)
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) that config.json needs are in no shard: {_shown(missing)}")
    if unexpected:
        shown = _shown(f"{name} (in {found.files[name].name})" for name in unexpected)
        problems.append(f"{len(unexpected)} unexpected tensor(s), which the model does not have: {shown}")
    wrong = [f"{name} has shape {found.entry(name)['shape']} but the config ({config_file}) needs {shape}"
             for name, shape in sorted(expected.items()) if name in found.files and found.entry(name)["shape"] != shape]
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: " + "; ".join(wrong[:3]))
    return problems


def check_checkpoint(
    folder: str | Path, build_model: Callable[[Idefics2Config], nn.Module], require_tokenizer: bool = True
) -> tuple[list[str], list[str]]:
    """Verify a checkpoint folder without loading any weights: (problems, findings).

    config.json readable; `inspect_checkpoint`'s file checks; `tensor_problems` against
    `build_model(config)` (e.g. `Idefics2`, built on the meta device: names and shapes only);
    tokenizer.model present and the 32000-piece Mistral SentencePiece model."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"], []
    problems: list[str] = []
    findings: list[str] = []
    config = None
    try:
        config = Idefics2Config.from_pretrained(folder)
        findings.append(f"config.json: {config.text.num_hidden_layers} decoder layers, "
                        f"{config.vision.num_hidden_layers} vision layers, vocab {config.text.vocab_size}")
    except (OSError, ValueError) as err:
        problems.append(f"config.json: {err}")
    found = inspect_checkpoint(folder)
    problems += found.problems
    findings += found.findings
    if config is not None and found.files and not problems:
        with torch.device("meta"):  # shapes only, no memory
            model = build_model(config)
        if config.quantization is not None:  # a quantized checkpoint stores its quantized layers' tensors
            from .quantize.checkpoint import quantized_skeleton  # noqa: PLC0415

            quantized_skeleton(model, config.quantization)
        problems += tensor_problems(model, found, folder)
        if not problems:
            total = sum(end - begin for name in found.files for begin, end in [found.entry(name)["data_offsets"]])
            findings.append(f"tensors: all {len(found.files)} present, {total / 1e9:.2f} GB")

    tokenizer_path = folder / "tokenizer.model"
    if tokenizer_path.is_file():
        try:
            from .tokenizer import Idefics2Tokenizer  # noqa: PLC0415  (sentencepiece only when checked)

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


def load_weights(
    model: nn.Module,
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    mmap: bool | None = None,
    fuse: bool = True,
) -> nn.Module:
    """Fill `model` (built from `path`'s config.json, on the meta device) with the checkpoint's
    tensors in `dtype` on `device`; parameters come back frozen (requires_grad=False).

    Strict: `inspect_checkpoint` and `tensor_problems` first, from the headers alone; any
    problem raises CheckpointError naming tensor and file before a byte of data is read. Then
    one of two ways, the same model:

    - mapped (mmap=True; the default on the CPU when every checkpoint tensor is already in
      `dtype`): the parameters *are* the checkpoint's bytes, views of a private (copy-on-write)
      memory mapping of each file. Nothing is read at load time: pages are read on first use
      and stay shared with the page cache, like the reference's loader. Changing a parameter
      in place never writes to the file. With `fuse`, projections are fused as views where the
      file holds them back to back (gate/up in the official layout; backends/fusion.py, mode
      "mapped").
    - copied (mmap=False, and always on GPUs or when converting dtype): the model is laid out
      once in `dtype` on `device` in its final form (with `fuse`: the fused projections'
      matrices) and each tensor is copied from the mapped file into it, converting on the way:
      peak memory is the model plus one tensor in flight.

    `progress(done, total)` is called after each file.
    """
    path = Path(path)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    device = torch.device(device)
    found = inspect_checkpoint(path)
    problems = found.problems or tensor_problems(model, found, path)
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    tied = _tied_parameters(model)
    if device.type == "cpu":
        check_fits(model, dtype, path)

    mapped = _use_mapping(mmap, found.headers, dtype, device)
    if not mapped:
        _allocate_parameters(model, dtype, device)  # uninitialised; every one is overwritten below
        if fuse:
            fuse_projections(model, "empty")
    expected = dict(model.named_parameters())
    total_files = len(found.headers)
    current_file, files_done = None, 0
    with torch.no_grad():
        for name, file, tensor in _iter_tensors(found.files, found.headers, keep_mapped=mapped):
            if file != current_file:
                if current_file is not None and progress is not None:
                    files_done += 1
                    progress(files_done, total_files)
                current_file = file
            ours = official_to_ours(name)
            if mapped:
                module_name, _, attribute = ours.rpartition(".")
                setattr(model.get_submodule(module_name), attribute, torch.nn.Parameter(tensor, requires_grad=False))
            else:
                expected[ours].copy_(tensor)  # converting dtype, moving device: parameters never alias the file
            del tensor
    if progress is not None and current_file is not None:
        progress(files_done + 1, total_files)
    for alias, name in tied.items():
        module_name, _, attribute = alias.rpartition(".")
        setattr(model.get_submodule(module_name), attribute, model.get_parameter(name))
    if mapped and fuse:
        fuse_projections(model, "mapped")
    return model


class InsufficientMemoryError(MemoryError):
    """The model, in the dtype asked for, needs more memory than this machine has available."""


def memory_available() -> tuple[int, str] | None:
    """(bytes this process may still take, where that figure comes from): MemAvailable of
    /proc/meminfo (free memory plus the page cache and other memory the kernel can reclaim),
    lowered by a cgroup v2 limit (a container's memory.max minus its memory.current) where
    one is set. None where neither can be read (not Linux)."""
    found = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    found = (int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo")
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            if found is None or room < found[0]:
                found = (max(room, 0), "the container's memory limit (/sys/fs/cgroup/memory.max)")
    except (OSError, ValueError):
        pass
    return found


def parameter_count(model: nn.Module) -> int:
    """Elements of `model`'s parameters, a tied one counted once (works on the meta device)."""
    return sum(param.numel() for param in model.parameters())


def check_fits(model: nn.Module, dtype: torch.dtype, path: str | Path = "") -> None:
    """Raise InsufficientMemoryError, before any allocation, when `model`'s parameters (built on
    the meta device from config.json: counts only) in `dtype` need more bytes than
    `memory_available()` reports. A model mapped from its files needs them resident too: its
    pages would otherwise be read from disk again and again, every token."""
    available = memory_available()
    count = parameter_count(model)
    need = count * dtype.itemsize
    if available is None or need <= available[0]:
        return
    gb = lambda size: f"{size / 1e9:.1f} GB"  # noqa: E731
    options = [f"bfloat16 ({gb(2 * count)}: dtype=torch.bfloat16, --dtype bfloat16)"] if dtype.itemsize > 2 else []
    options += [f"int8 (about {gb(count)}: quantize='int8', --quantize int8)",
                f"int4 (about {gb(count / 2)}: quantize='int4', --quantize int4)"]
    where = f"{path}: " if str(path) else ""
    raise InsufficientMemoryError(
        f"{where}the model needs {gb(need)} of memory in {str(dtype).removeprefix('torch.')} "
        f"({count / 1e9:.2f} B parameters x {dtype.itemsize} bytes), but this machine has {gb(available[0])} "
        f"available ({available[1]}); load it in " + " or ".join(options) + ", or free memory first"
    )


def _tied_parameters(model: nn.Module) -> dict[str, str]:
    """{name: the name it shares its Parameter with} for parameters registered twice (a tied
    lm_head): the checkpoint holds them once, and the loader ties them again after loading."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


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


def _allocate_parameters(model: nn.Module, dtype: torch.dtype, device) -> None:
    """Give every (meta) parameter real, uninitialised storage of `dtype` on `device`.
    (Not `.to(dtype).to_empty()`: those dispatch through meta-tensor Python refs, whose first
    use imports sympy and friends, a noticeable share of a small model's load time.)"""
    for name, param in list(model.named_parameters()):
        module_name, _, attribute = name.rpartition(".")
        storage = torch.empty(param.shape, dtype=dtype, device=device)
        setattr(model.get_submodule(module_name), attribute, torch.nn.Parameter(storage, requires_grad=False))


def save_checkpoint(
    model: nn.Module,
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
    write_safetensors(tensors, path, max_shard_bytes)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, max_shard_bytes: int | None = None) -> None:
    """Write `tensors` (official names) into `path` as model.safetensors, or as shards of at most
    `max_shard_bytes` with an index when they are larger."""
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
