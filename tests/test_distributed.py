"""torch.distributed on the CPU (gloo, 2 processes started by torchrun, bounded in time):
tensor-parallel inference equals one process (logits <= 1e-5, greedy tokens equal; padded and
packed images; through the KV cache past the sliding window; the command line's answer), FSDP2
LoRA fine-tuning equals one process (loss and adapter after 2 steps <= 1e-5, with
checkpointing; the merged checkpoint), and the errors: not launched by torchrun, a world size
that does not fit, a degree that does not divide the heads, a missing shard file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference_models import make_reference_checkpoint
from safetensors.torch import load_file

import idefics2_mini as im
from idefics2_mini import demo, distributed
from idefics2_mini.finetune import DEMO_DATA

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp")
    make_reference_checkpoint(path, seed=0, sliding_window=16)
    return path


def test_tensor_parallel_equals_one_process(checkpoint, tmp_path):
    from distributed_worker import batch, run

    done = torchrun(str(TESTS / "distributed_worker.py"), str(checkpoint), str(tmp_path / "tp.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    parallel = torch.load(tmp_path / "tp.pt", weights_only=False)
    single_model = im.Idefics2.from_pretrained(checkpoint)
    inputs = batch()
    assert inputs["input_ids"].shape[1] > 16 + 20  # prompt + answer go past the window
    single = run(single_model, inputs)
    real = inputs["attention_mask"].bool()
    for layout in ("padded", "packed"):
        logits, tokens = parallel[layout]
        assert (logits - single[layout][0])[real].abs().max().item() <= 1e-5, layout
        assert torch.equal(tokens, single[layout][1]), layout
    # Each rank holds the decoder's split weights once over 2: fewer bytes than the whole model.
    assert parallel["weight_bytes"] < distributed.weight_bytes(single_model)


def test_command_line_answers_as_one_process(checkpoint):
    (checkpoint / "tokenizer.model").write_bytes((TESTS.parent / "weights" / "tokenizer.model").read_bytes())
    question = ["--weights", str(checkpoint), "--max-new-tokens", "12", "--quiet", "Tell me about the sea."]
    single = subprocess.run([sys.executable, "-m", "idefics2_mini", *question], capture_output=True, text=True,
                            timeout=TIMEOUT_S, check=False)
    parallel = torchrun("-m", "idefics2_mini", "--tp", "2", *question)
    assert single.returncode == 0 and parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout == single.stdout and single.stdout.strip()


def test_fsdp2_lora_equals_one_process(tmp_path):
    weights = demo.ensure_demo_checkpoint(tmp_path / "weights")[0]
    common = ["--weights", str(weights), "--data", str(DEMO_DATA), "--steps", "2", "--lr", "1e-3",
              "--lora-dropout", "0", "--quiet"]
    # One process: each example alone, two per step; two processes: one example each per step.
    single = subprocess.run(
        [sys.executable, "-m", "idefics2_mini", "finetune", *common, "--out", str(tmp_path / "single"),
         "--batch-size", "1", "--grad-accum", "2"], capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = torchrun("-m", "idefics2_mini", "finetune", *common, "--out", str(tmp_path / "fsdp"), "--batch-size", "2",
                       "--grad-accum", "1", "--gradient-checkpointing", "--merge")
    assert sharded.returncode == 0, sharded.stderr[-3000:]

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("fsdp")) == 2
    for a, b in zip(losses("fsdp"), losses("single")):
        assert abs(a - b) <= 1e-5 * abs(b)
    one = load_file(tmp_path / "single" / "adapter_model.safetensors")
    two = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        assert (one[name] - two[name]).abs().max().item() <= 1e-5, name
    assert any(one[name].abs().max() > 0 for name in one if "lora_B" in name)  # the adapters did train
    merged = im.Idefics2.from_pretrained(tmp_path / "fsdp" / "merged")
    assert not any(".lora_" in name for name, _ in merged.named_parameters())


def test_errors_are_one_line(checkpoint, tmp_path):
    alone = subprocess.run([sys.executable, "-m", "idefics2_mini", "--tp", "2", "--weights", str(checkpoint), "Hi"],
                           capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert alone.returncode == 1 and "not launched by torchrun" in alone.stderr
    assert "torchrun --nproc-per-node 2" in alone.stderr
    mismatch = torchrun("-m", "idefics2_mini", "--tp", "4", "--weights", str(checkpoint), "Hi")
    assert mismatch.returncode != 0 and "--tp 4 but torchrun started 2 processes" in mismatch.stderr
    config = im.Idefics2Config.from_pretrained(checkpoint)  # 4 heads, 2 kv heads
    with pytest.raises(distributed.DistributedError, match="degree 3 does not divide the decoder's 4 attention heads"):
        distributed.check_tensor_parallel_degree(config, 3)
    with pytest.raises(distributed.DistributedError, match="degree 4 does not divide the decoder's 2 key/value heads"):
        distributed.check_tensor_parallel_degree(config, 4)


def test_missing_shard_file_is_named(checkpoint, tmp_path):
    import torch.distributed as dist

    model = im.Idefics2.from_pretrained(checkpoint, backends=False)
    im.save_checkpoint(model, tmp_path, max_shard_bytes=1_000_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(im.CheckpointError, match=rf"rank 0 of 1.*missing shard {shards[-1].name}"):
            distributed.load_tensor_parallel(tmp_path)
    finally:
        dist.destroy_process_group()


def test_distributed_benchmark_smoke(tmp_path):
    """benchmarks/distributed.py on the tiny model: TP 1 and 2 give the same tokens, and a rank
    of TP 2 holds fewer decoder bytes than TP 1's process."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.distributed", "--model", "tiny", "--new-tokens", "4", "--repeats", "1",
         "--weights-dir", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=TESTS.parent, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "distributed-tiny.json").read_text())["rows"]
    one, two = rows["1"][0], rows["2"]
    assert all(rank["tokens"] == one["tokens"] for rank in two)
    assert all(rank["decoder_weight_bytes"] < 0.55 * one["decoder_weight_bytes"] for rank in two)  # norms replicated
    assert two[0]["all_reduces_per_generate"] > 0
