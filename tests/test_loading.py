"""Checkpoint loading: official names via the prefix table, sharded files, dtypes, strictness."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from reference_models import make_reference_checkpoint
from safetensors.torch import load_file, save_file

import idefics2_mini as im
from idefics2_mini.backends import fusion
from idefics2_mini.loading import INDEX_FILE, SINGLE_FILE, official_to_ours, ours_to_official


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_reference_checkpoint(path, seed=4)
    return path


def copy_of(checkpoint, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(checkpoint, target)
    return target


def test_prefix_table_round_trips_every_name(checkpoint):
    model = im.Idefics2.from_pretrained(checkpoint)
    official = set(load_file(checkpoint / SINGLE_FILE))
    ours = {name for name, _ in model.named_parameters()}
    assert {official_to_ours(name) for name in official} == ours
    assert {ours_to_official(name) for name in ours} == official


def test_sharded_equals_single_and_dtypes(checkpoint, tmp_path):
    model = im.Idefics2.from_pretrained(checkpoint)
    im.save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=2_000_000)
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = im.Idefics2.from_pretrained(tmp_path / "sharded")
    for (name, a), (_, b) in zip(model.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name
    for dtype in (torch.bfloat16, torch.float16):
        low = im.Idefics2.from_pretrained(tmp_path / "sharded", dtype=dtype)
        assert {p.dtype for p in low.parameters()} == {dtype}
        assert torch.equal(low.lm_head.weight, model.lm_head.weight.to(dtype))


def test_progress_called_per_file(checkpoint, tmp_path):
    im.save_checkpoint(im.Idefics2.from_pretrained(checkpoint), tmp_path / "s", max_shard_bytes=2_000_000)
    calls = []
    im.Idefics2.from_pretrained(tmp_path / "s", progress=lambda done, total: calls.append((done, total)))
    total = calls[0][1]
    assert calls == [(i, total) for i in range(1, total + 1)]


def rewrite(path, change):
    tensors = load_file(path / SINGLE_FILE)
    change(tensors)
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})


def test_missing_tensor_is_named(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    rewrite(path, lambda t: t.pop("model.connector.perceiver_resampler.latents"))
    with pytest.raises(im.CheckpointError, match="missing .*model.connector.perceiver_resampler.latents"):
        im.Idefics2.from_pretrained(path)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    rewrite(path, lambda t: t.update({"model.vision_model.head.probe": torch.zeros(3)}))
    with pytest.raises(im.CheckpointError, match="unexpected .*model.vision_model.head.probe"):
        im.Idefics2.from_pretrained(path)


def test_config_not_matching_weights(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 2
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(im.CheckpointError, match=r"down_proj.weight has shape \[96, 200\] but the config .* needs \[96, 202\]"):
        im.Idefics2.from_pretrained(path)


def test_missing_shard_is_named(checkpoint, tmp_path):
    im.save_checkpoint(im.Idefics2.from_pretrained(checkpoint), tmp_path / "s", max_shard_bytes=2_000_000)
    next((tmp_path / "s").glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(im.CheckpointError, match="missing shard model-00002-of"):
        im.Idefics2.from_pretrained(tmp_path / "s")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_file_is_named(checkpoint, tmp_path, damage):
    path = copy_of(checkpoint, tmp_path)
    data = (path / SINGLE_FILE).read_bytes()
    if damage == "truncate":
        data = data[: len(data) - 1000]
    elif damage == "garbage":
        data = b"\x00\x01not a safetensors file" * 10
    else:
        data = b""
    (path / SINGLE_FILE).write_bytes(data)
    with pytest.raises(im.CheckpointError, match=SINGLE_FILE):
        im.Idefics2.from_pretrained(path)


def test_empty_folder_and_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        im.Idefics2.from_pretrained(tmp_path)
    with pytest.raises((im.CheckpointError, FileNotFoundError), match="nowhere"):
        im.Idefics2.from_pretrained(tmp_path / "nowhere")
    im.Idefics2Config.from_dict({}).save(tmp_path)  # a config but no weights
    with pytest.raises(im.CheckpointError, match="neither model.safetensors nor"):
        im.Idefics2.from_pretrained(tmp_path)


def test_projections_are_fused_without_copies(checkpoint):
    model = im.Idefics2.from_pretrained(checkpoint, mmap=False)
    attention = model.text.layers[0].self_attn
    fused = fusion.fused_group(attention)
    assert fused is not None
    assert attention.q_proj.weight.data_ptr() == fused.weight.data_ptr()  # a view, not a copy
    assert attention.k_proj.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    names = {name for name, _ in model.named_parameters()}
    assert "text.layers.0.self_attn.q_proj.weight" in names and not any("fused" in n for n in names)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        fused_logits = model(ids)
        assert fused.current()
    model.requires_grad_(True)
    unfused_logits = model(ids)  # gradients wanted: the separate linears run
    assert not fused.current() and unfused_logits.requires_grad
    model.requires_grad_(False)
    assert (fused_logits - unfused_logits.detach()).abs().max() <= 1e-5
    moved = model.to(torch.float64)  # new tensors: fusion no longer current, results still right
    with torch.no_grad():
        assert not fused.current()
        assert (moved(ids).float() - fused_logits.detach()).abs().max() <= 1e-4
        fusion.fuse_projections(moved)
        assert fusion.fused_group(attention).current() and fusion.fused_group(attention).weight.dtype == torch.float64


def test_mapped_load_aliases_the_file_copy_on_write(checkpoint, tmp_path, monkeypatch):
    """The CPU default for a checkpoint already in the asked dtype: parameters are views of the
    mapped file. Same values and logits as a copied load; writing to a parameter leaves the
    file alone; gate/up (back to back in the file) are fused as a view, q/k/v are not."""
    path = copy_of(checkpoint, tmp_path)
    file_bytes_before = (path / SINGLE_FILE).read_bytes()
    mapped = im.Idefics2.from_pretrained(path)
    copied = im.Idefics2.from_pretrained(path, mmap=False)
    for (name, a), (_, b) in zip(mapped.named_parameters(), copied.named_parameters()):
        assert torch.equal(a, b), name
        assert not a.requires_grad
    mlp = mapped.text.layers[0].mlp
    assert fusion.fused_group(mlp) is not None and fusion.fused_group(mlp).current()
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_proj.weight.data_ptr() + mlp.gate_proj.weight.nbytes
    # q/k/v are not back to back in the file (k, o, q, v order): small ones are copied into a
    # fused matrix, big ones run one by one.
    attention = mapped.text.layers[0].self_attn
    assert fusion.fused_group(attention) is not None and fusion.fused_group(attention).current()
    file_storage = mlp.down_proj.weight.untyped_storage().data_ptr()
    assert attention.q_proj.weight.untyped_storage().data_ptr() != file_storage
    assert attention.o_proj.weight.untyped_storage().data_ptr() == file_storage
    monkeypatch.setattr(fusion, "MAPPED_COPY_MAX_ELEMENTS", 0)
    assert fusion.fused_group(im.Idefics2.from_pretrained(path).text.layers[0].self_attn) is None
    monkeypatch.undo()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert (mapped(ids) - copied(ids)).abs().max() <= 1e-5
        mapped.text.layers[0].mlp.down_proj.weight.mul_(2)  # copy-on-write: private to this process
    assert (path / SINGLE_FILE).read_bytes() == file_bytes_before
    assert torch.equal(im.Idefics2.from_pretrained(path).text.layers[0].mlp.down_proj.weight,
                       copied.text.layers[0].mlp.down_proj.weight)


def test_mapped_load_sharded_and_when_it_cannot_map(checkpoint, tmp_path):
    model = im.Idefics2.from_pretrained(checkpoint, mmap=False)
    im.save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=2_000_000)
    sharded = im.Idefics2.from_pretrained(tmp_path / "sharded")
    assert len({p.untyped_storage().data_ptr() for p in sharded.parameters()}) > 1
    for (name, a), (_, b) in zip(sharded.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name
    # Converting dtype needs a copy: the default copies, insisting on a mapping is an error.
    bf16 = im.Idefics2.from_pretrained(checkpoint, dtype=torch.bfloat16)
    assert fusion.fused_group(bf16.text.layers[0].self_attn) is not None
    with pytest.raises(ValueError, match="cannot map the checkpoint.*float32.*bfloat16"):
        im.Idefics2.from_pretrained(checkpoint, dtype=torch.bfloat16, mmap=True)


def test_mapped_model_can_save_over_its_own_files(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    model = im.Idefics2.from_pretrained(path)  # parameters are views of path's files
    copied = im.Idefics2.from_pretrained(path, mmap=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # a change, made in the private mapping
    im.save_checkpoint(model, path)
    im.save_checkpoint(model, path, max_shard_bytes=2_000_000)  # now sharded, still over itself
    reloaded = im.Idefics2.from_pretrained(path)
    for (name, a), (_, b) in zip(reloaded.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(reloaded.lm_head.weight, 3 * copied.lm_head.weight)
    assert not list(path.glob("*.partial"))


def test_mapping_only_where_the_bytes_can_be_used_as_they_are(checkpoint):
    from idefics2_mini.loading import _use_mapping, inspect_checkpoint  # noqa: PLC0415

    headers = inspect_checkpoint(checkpoint).headers
    assert _use_mapping(None, headers, torch.float32, torch.device("cpu"))
    assert not _use_mapping(False, headers, torch.float32, torch.device("cpu"))
    assert not _use_mapping(None, headers, torch.float32, torch.device("cuda"))  # a GPU always copies
    with pytest.raises(ValueError, match="goes to cuda"):
        _use_mapping(True, headers, torch.float32, torch.device("cuda"))


def test_check_and_the_loader_apply_the_same_rules(checkpoint, tmp_path):
    """`check_checkpoint` (the CLI's `check`) and the loader run one inspection: every problem
    the loader raises is one that check lists."""
    from idefics2_mini.loading import check_checkpoint  # noqa: PLC0415

    path = copy_of(checkpoint, tmp_path)
    problems, findings = check_checkpoint(path, im.Idefics2, require_tokenizer=False)
    assert problems == [] and any(line.startswith("tensors: all") for line in findings)
    rewrite(path, lambda t: (t.pop("model.connector.perceiver_resampler.latents"),
                             t.update({"model.vision_model.head.probe": torch.zeros(3)})))
    problems, _ = check_checkpoint(path, im.Idefics2, require_tokenizer=False)
    assert len(problems) == 2
    with pytest.raises(im.CheckpointError) as raised:
        im.Idefics2.from_pretrained(path)
    assert all(problem in str(raised.value) for problem in problems)
