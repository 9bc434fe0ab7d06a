"""`python -m idefics2_mini finetune` on the demo checkpoint: the loss falls, the outputs are
written, a resumed run equals an uninterrupted one, the merged checkpoint loads in both
implementations with the adapted model's logits, and every bad input gets one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import idefics2_mini as im
from idefics2_mini import demo, lora
from idefics2_mini.cli import main as cli_main
from idefics2_mini.finetune import DEMO_DATA, FinetuneError, FinetuneOptions, finetune

ASSETS = DEMO_DATA.parent


@pytest.fixture(scope="module")
def demo_weights(tmp_path_factory):
    return demo.ensure_demo_checkpoint(tmp_path_factory.mktemp("weights"))[0]


@pytest.fixture(scope="module")
def demo_run(demo_weights, tmp_path_factory):
    """The README's demo command: 60 LoRA steps on the shipped data, merged at the end."""
    out = tmp_path_factory.mktemp("run")
    result = finetune(FinetuneOptions(out=out, weights=demo_weights, data=DEMO_DATA, lr=1e-2, steps=60,
                                      grad_accum=1, lora_dropout=0.0, merge=True, quiet=True))
    return demo_weights, out, result


def test_demo_run_overfits_and_writes_its_files(demo_run):
    _, out, result = demo_run
    first, last = result.losses[0], sum(result.losses[-5:]) / 5
    assert first / last > 2.5, result.losses  # memorising six chats: the loss falls by a large factor
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 61))
    assert set(metrics[0]) == {"step", "loss", "lr", "tokens_per_s"}
    assert all(m["tokens_per_s"] > 0 for m in metrics)
    for name in ("adapter_model.safetensors", "adapter_config.json", "loss.png", "trainer_state.pt"):
        assert (out / name).is_file(), name
    from PIL import Image

    with Image.open(out / "loss.png") as curve:
        assert curve.size == (720, 420)


def test_merged_checkpoint_loads_here_and_in_the_reference(demo_run):
    weights, out, _ = demo_run
    adapted = im.Idefics2.from_pretrained(weights)
    lora.load_adapter(adapted, out)
    merged = im.Idefics2.from_pretrained(out / "merged")
    processor = im.Idefics2Processor.from_pretrained(out / "merged")
    example = json.loads(DEMO_DATA.read_text().splitlines()[0])
    prompt = processor.apply_chat_template(example["messages"][:1], add_generation_prompt=True)
    batch = processor(text=prompt, images=[ASSETS / example["images"][0]])
    # Folding B·A into W changes the rounding of every adapted matmul; the demo's random weights
    # amplify that through the layers to ~3e-5 of the logits' scale (measured), hence 1e-4 of it.
    with torch.no_grad():
        expected = adapted(**batch)
        tolerance = 1e-4 * expected.abs().max().item()
        assert (merged(**batch) - expected).abs().max().item() <= tolerance
    from transformers import Idefics2ForConditionalGeneration

    reference = Idefics2ForConditionalGeneration.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        ref_logits = reference(**batch).logits
    assert (ref_logits - expected).abs().max().item() <= tolerance


def test_resume_equals_an_uninterrupted_run(demo_weights, tmp_path):
    common = dict(weights=demo_weights, data=DEMO_DATA, lr=1e-2, lr_schedule="constant", grad_accum=2,
                  batch_size=2, lora_dropout=0.1, quiet=True)
    straight = finetune(FinetuneOptions(out=tmp_path / "straight", steps=5, **common))
    finetune(FinetuneOptions(out=tmp_path / "resumed", steps=3, **common))
    resumed = finetune(FinetuneOptions(out=tmp_path / "resumed", steps=5, resume=True, **common))
    assert resumed.losses[:3] == straight.losses[:3]
    torch.testing.assert_close(resumed.losses, straight.losses, rtol=1e-5, atol=0)
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_full_finetune_bf16_with_checkpointing(demo_weights, tmp_path):
    """--lora-rank 0 trains every parameter but the vision tower; bf16 weights with fp32 master
    copies; checkpointed layers. It writes a full checkpoint that loads."""
    result = finetune(FinetuneOptions(out=tmp_path, weights=demo_weights, data=DEMO_DATA, lora_rank=0, steps=3,
                                      lr=1e-3, dtype="bfloat16", gradient_checkpointing=True, quiet=True))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    trained = im.Idefics2.from_pretrained(tmp_path, dtype=torch.bfloat16)
    base = im.Idefics2.from_pretrained(demo_weights, dtype=torch.bfloat16)
    assert torch.equal(trained.vision.layers[0].mlp.fc1.weight, base.vision.layers[0].mlp.fc1.weight)
    assert not torch.equal(trained.text.layers[0].mlp.up_proj.weight, base.text.layers[0].mlp.up_proj.weight)


def write_data(folder: Path, lines: list[str]) -> Path:
    shutil.copy(ASSETS / "cat.jpg", folder / "cat.jpg")
    (folder / "not_an_image.jpg").write_text("hello")
    data = folder / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


GOOD = json.dumps({"messages": [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": "A cat."}], "images": ["cat.jpg"]})


@pytest.mark.parametrize("line, message", [
    ("{not json", r"data.jsonl:2: not valid JSON"),
    (json.dumps({"text": "hi"}), r'data.jsonl:2: expected an object with a "messages" list'),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}], "images": []}), r"data.jsonl:2: the chat has no assistant turn"),
    (GOOD.replace("cat.jpg", "missing.jpg"), r"data.jsonl:2: image not found: .*missing.jpg"),
    (GOOD.replace("cat.jpg", "not_an_image.jpg"), r"data.jsonl:2: .*not_an_image.jpg is not a readable image"),
    (GOOD.replace('["cat.jpg"]', '["cat.jpg", "cat.jpg"]'), r"data.jsonl:2: the chat has 1 image item\(s\) but 2 image path\(s\)"),
    (GOOD.replace('"images": ["cat.jpg"]', '"images": "cat.jpg"'), r'data.jsonl:2: "images" must be a list'),
])
def test_bad_data_lines_are_named(demo_weights, tmp_path, line, message):
    data = write_data(tmp_path, [GOOD, line])
    with pytest.raises(FinetuneError, match=message):
        finetune(FinetuneOptions(out=tmp_path / "out", weights=demo_weights, data=data, steps=1, quiet=True))


def test_other_bad_inputs(demo_weights, tmp_path):
    data = write_data(tmp_path, [GOOD])
    options = dict(weights=demo_weights, data=data, steps=1, quiet=True)
    with pytest.raises(FinetuneError, match=r"data.jsonl:1: the example is \d+ tokens long .* --max-length 16"):
        finetune(FinetuneOptions(out=tmp_path / "a", max_length=16, **options))
    with pytest.raises(FinetuneError, match="--resume: .*trainer_state.pt not found"):
        finetune(FinetuneOptions(out=tmp_path / "b", resume=True, **options))
    with pytest.raises(FinetuneError, match="--data FILE.jsonl is needed with --weights"):
        finetune(FinetuneOptions(out=tmp_path / "c", weights=demo_weights, quiet=True))
    with pytest.raises(FinetuneError, match="not a checkpoint folder"):
        finetune(FinetuneOptions(out=tmp_path / "d", weights=tmp_path, data=data, quiet=True))
    with pytest.raises(FinetuneError, match="data file not found"):
        finetune(FinetuneOptions(out=tmp_path / "e", weights=demo_weights, data=tmp_path / "nope.jsonl", quiet=True))
    finetune(FinetuneOptions(out=tmp_path / "f", **options))
    with pytest.raises(FinetuneError, match="already holds a run"):
        finetune(FinetuneOptions(out=tmp_path / "f", **options))


def test_command_line_errors_are_one_line(demo_weights, tmp_path, capsys):
    data = write_data(tmp_path, [GOOD, "{oops"])
    status = cli_main(["finetune", "--weights", str(demo_weights), "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err[-1].startswith("error: ") and "data.jsonl:2: not valid JSON" in err[-1]
    assert cli_main(["finetune", "--out", str(tmp_path / "o"), "--lora-rank", "-1"]) == 1
    assert "--lora-rank must be >= 0" in capsys.readouterr().err
    assert cli_main(["finetune", "--out", str(tmp_path / "o"), "--steps", "2", "--epochs", "1"]) == 2  # argparse
