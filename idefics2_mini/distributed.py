"""Beyond one device, on torch.distributed: tensor parallelism for inference, FSDP2 for training.

Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM", arXiv:1909.08053; the layout of
gpt-fast's tp.py and torchtitan's plans), decoder only:

    attention  q/k/v split by output rows (each rank: Hq/N query heads, Hkv/N kv heads, whole
               heads, so RoPE, GQA and the KV cache stay local), o_proj split by input columns
               -> one all-reduce of the attention output
    MLP        gate/up split by output rows, down by input columns -> one all-reduce
    the rest   embeddings, lm_head, norms, the vision tower and the connector: replicated

Every rank computes the same hidden states, so every rank holds the same logits and picks the
same token; only rank 0 talks to the user. The layout is applied as plain module structure
(smaller nn.Linear layers, the heads counts of the attention module, a forward hook for each
all-reduce), so the Triton kernels and the CPU backends run on the local shards unchanged.
Why explicit shards and not DTensor's `parallelize_module`: the model's kernels, fused
projections and KV cache see plain local tensors, and a reader sees in twenty lines what is
split and where the two all-reduces are.

The vision tower and perceiver stay replicated: no released implementation shards a vision
encoder, they run once per image (not per token), and their weights are about a tenth of the
8B's (benchmarks/distributed.py reports the bytes per rank).

    torchrun --nproc-per-node 2 -m idefics2_mini --tp 2 --image cat.png "What is this?"
    model = load_tensor_parallel(path, group=init_distributed())   # each rank reads its slices only

Fine-tuning with FSDP2 (`fully_shard`, Zhao et al. 2023 "PyTorch FSDP", arXiv:2304.11277) is in
`shard_for_training`: each vision, perceiver and decoder layer is one FSDP unit, the root holds
the rest; it composes with LoRA (lora.py) and checkpointing (training.py) applied before it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Our module name (within a decoder layer) -> the dim of its weight that is split.
TENSOR_PARALLEL_PLAN = {
    "self_attn.q_proj": 0,
    "self_attn.k_proj": 0,
    "self_attn.v_proj": 0,
    "self_attn.o_proj": 1,
    "mlp.gate_proj": 0,
    "mlp.up_proj": 0,
    "mlp.down_proj": 1,
}


class DistributedError(ValueError):
    """A distributed run that cannot work as asked: printed as one line with the fix."""


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_distributed(expected_world_size: int | None = None, backend: str | None = None):
    """The default process group, started from torchrun's environment (gloo on the CPU, nccl
    with CUDA). Raises DistributedError when not launched by torchrun or when the world size is
    not `expected_world_size`."""
    if not launched_by_torchrun():
        missing = [name for name in TORCHRUN_VARIABLES[:3] if name not in os.environ]
        raise DistributedError(
            f"not launched by torchrun ({', '.join(missing)} unset): run "
            f"`torchrun --nproc-per-node {expected_world_size or 'N'} -m idefics2_mini ...`"
        )
    world_size = int(os.environ["WORLD_SIZE"])
    if expected_world_size is not None and world_size != expected_world_size:
        raise DistributedError(
            f"--tp {expected_world_size} but torchrun started {world_size} processes: "
            f"use --nproc-per-node {expected_world_size}"
        )
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
    return dist.group.WORLD


def check_tensor_parallel_degree(config, tp: int) -> None:
    """The decoder's heads, kv heads and MLP width must split evenly over `tp` ranks."""
    text = config.text
    counts = {
        "attention heads": text.num_attention_heads,
        "key/value heads": text.num_key_value_heads,
        "MLP width": text.intermediate_size,
    }
    for what, count in counts.items():
        if tp < 1 or count % tp:
            raise DistributedError(
                f"tensor parallel degree {tp} does not divide the decoder's {count} {what}: use a divisor "
                f"of {text.num_key_value_heads} (the kv heads), e.g. --tp {_largest_divisor(text, tp)}"
            )


def _largest_divisor(text, tp: int) -> int:
    return max(d for d in range(1, max(tp, 1) + 1)
               if text.num_key_value_heads % d == 0 and text.num_attention_heads % d == 0
               and text.intermediate_size % d == 0)


def shard(tensor: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous 1/world_size slice of `tensor` along `dim` (a view)."""
    size = tensor.shape[dim] // world_size
    return tensor.narrow(dim, rank * size, size)


def apply_tensor_parallel(model: nn.Module, group=None) -> nn.Module:
    """Make `model` (real or on the meta device) this rank's tensor-parallel part of the model:
    each decoder linear of TENSOR_PARALLEL_PLAN replaced by its slice, the attention's head
    counts divided, an all-reduce after each attention and MLP. Idempotent per model."""
    if getattr(model, "tensor_parallel", None) is not None:
        raise DistributedError("the model is already tensor parallel")
    group = group or dist.group.WORLD
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    check_tensor_parallel_degree(model.config, world_size)
    for layer in model.text.layers:
        for name, dim in TENSOR_PARALLEL_PLAN.items():
            parent, attribute = layer.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            full = getattr(parent, attribute)
            local = nn.Linear(
                full.in_features // (world_size if dim == 1 else 1),
                full.out_features // (world_size if dim == 0 else 1),
                bias=False, device=full.weight.device, dtype=full.weight.dtype,
            )
            with torch.no_grad():
                if full.weight.device.type != "meta":
                    local.weight.copy_(shard(full.weight, dim, rank, world_size))
            local.weight.requires_grad_(full.weight.requires_grad)
            setattr(parent, attribute, local)
        attention = layer.self_attn
        attention.num_heads //= world_size
        attention.num_kv_heads //= world_size
        attention.register_forward_hook(_all_reduce_output(group))
        layer.mlp.register_forward_hook(_all_reduce_output(group))
    model.tensor_parallel = (rank, world_size, group)
    return model


def _all_reduce_output(group):
    def hook(module, inputs, output):
        dist.all_reduce(output, group=group)  # the partial sums of the row-split projection
        return output

    return hook


def load_tensor_parallel(path: str | Path, group=None, dtype: torch.dtype = torch.float32, device="cpu",
                         backends: bool = True) -> nn.Module:
    """This rank's part of the model, read from an official-layout checkpoint: replicated
    tensors whole, split ones as this rank's slice only (no rank ever holds a full split
    weight). Checked like `from_pretrained` (every tensor
    present, no extra one, shapes equal to config.json's) before any data is read."""
    from .backends import apply_backends  # noqa: PLC0415
    from .config import Idefics2Config  # noqa: PLC0415
    from .generation import GenerationDefaults  # noqa: PLC0415
    from .loading import (  # noqa: PLC0415
        CheckpointError,
        _iter_tensors,
        inspect_checkpoint,
        official_to_ours,
        tensor_problems,
    )
    from .model import Idefics2  # noqa: PLC0415

    path = Path(path)
    group = group or dist.group.WORLD
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    config = Idefics2Config.from_pretrained(path)
    check_tensor_parallel_degree(config, world_size)
    found = inspect_checkpoint(path)
    with torch.device("meta"):
        model = Idefics2(config)
    problems = found.problems or tensor_problems(model, found, path)
    if problems:
        raise CheckpointError(f"{path} (rank {rank} of {world_size}): " + "; ".join(problems))
    apply_tensor_parallel(model, group)
    device = torch.device(device)
    parameters = {}
    for name, param in list(model.named_parameters()):
        module_name, _, attribute = name.rpartition(".")
        value = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False)
        setattr(model.get_submodule(module_name), attribute, value)
        parameters[name] = value
    # The loader's own reading: each tensor a view of the file's private mapping, its pages
    # handed back right after it is copied, so a rank holds its parameters plus one tensor in
    # flight; only this rank's slice of a split weight is copied.
    with torch.no_grad():
        for official, _, tensor in _iter_tensors(found.files, found.headers):
            ours = official_to_ours(official)
            dim = _split_dim(ours)
            parameters[ours].copy_(tensor if dim is None else shard(tensor, dim, rank, world_size))
            del tensor
    if config.text.tie_word_embeddings:
        model.lm_head.weight = model.text.embed_tokens.weight
    model.text.rotary = type(model.text.rotary)(config.text.head_dim, config.text.rope_theta).to(device)
    model.generation_defaults = GenerationDefaults.from_pretrained(path, config)
    if backends:
        apply_backends(model, fuse="copy")
    return model.eval()


def _split_dim(name: str) -> int | None:
    """The split dim of our parameter `name` under TENSOR_PARALLEL_PLAN, None if replicated."""
    if not name.startswith("text.layers.") or not name.endswith(".weight"):
        return None
    inner = name.split(".", 3)[3].removesuffix(".weight")  # text.layers.N.<inner>.weight
    return TENSOR_PARALLEL_PLAN.get(inner)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters (a tied weight once)."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            local = param.to_local() if hasattr(param, "to_local") else param
            total += local.numel() * local.element_size()
    return total


# ----------------------------------------------------------------------------- FSDP2


def shard_for_training(model: nn.Module, group=None) -> nn.Module:
    """FSDP2: every vision, perceiver and decoder layer a unit, the root the rest. Parameters
    become DTensors sharded over the ranks' first dim; each unit's are gathered for its forward
    and backward and freed after. Apply LoRA and checkpointing first."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    from .training import checkpointed_layers  # noqa: PLC0415

    group = group or dist.group.WORLD
    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(group),))
    for layer in checkpointed_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The loss each rank backpropagates is already its share of the global mean (its tokens'
    # sum over the whole batch's count), so the ranks' gradients must be summed, not averaged.
    # FSDP's default averages (on torch 2.13 with gloo it does; PyTorch #162338 reported gloo
    # summing instead); a divide factor of 1 alone asks for PREMUL_SUM, which gloo lacks: so SUM
    # collectives are forced and the factor set to 1. tests/test_distributed.py checks the result
    # against one process.
    for unit in [m for m in model.modules() if hasattr(m, "set_gradient_divide_factor")]:
        unit.set_force_sum_reduction_for_comms(True)
        unit.set_gradient_divide_factor(1.0)
    return model


def gathered_for_saving(model: nn.Module):
    """Context: the FSDP2 model's parameters whole on every rank (for saving), sharded after."""
    import contextlib  # noqa: PLC0415

    @contextlib.contextmanager
    def gathered():
        units = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
        for unit in units:
            unit.unshard()
        try:
            yield model
        finally:
            for unit in units:
                unit.reshard()

    return gathered()
