"""The embedded demo checkpoint: deterministic, atomic, official layout, real-image capable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import PIL.Image
import pytest
import torch

import idefics2_mini as im
from idefics2_mini import demo
from idefics2_mini.processor import Idefics2Processor


def folder_bytes(path):
    return {file.name: file.read_bytes() for file in sorted(path.iterdir())}


def test_build_is_deterministic_and_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(1)
    rng_before = torch.get_rng_state()
    first = demo.build_checkpoint(tmp_path / "a" / "demo-tiny")
    assert torch.equal(torch.get_rng_state(), rng_before)
    torch.manual_seed(2)  # another global state must not change the weights
    second = demo.build_checkpoint(tmp_path / "b" / "demo-tiny")
    assert folder_bytes(first) == folder_bytes(second)
    assert sorted(folder_bytes(first)) == ["config.json", "generation_config.json", "model.safetensors",
                                           "tokenizer.model"]


def test_official_layout_and_shape_rules(tmp_path):
    path, built = demo.ensure_demo_checkpoint(tmp_path)
    assert built and path == tmp_path / "demo-tiny"
    config = im.Idefics2Config.from_pretrained(path)
    assert (config.vision.image_size, config.vision.patch_size) == (980, 14)
    assert config.perceiver.resampler_n_latents == 64 and config.text.vocab_size == 32003
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [2, 32002]
    assert json.loads((path / "generation_config.json").read_text())["bad_words_ids"] == [[32000], [32001]]
    assert (path / "tokenizer.model").read_bytes() == demo.SHIPPED_TOKENIZER_MODEL.read_bytes()
    assert os.stat(path).st_mode & 0o777 == 0o755

    # A 980x980 image (the largest the real model takes: the 70x70 position table) runs through.
    model = im.Idefics2.from_pretrained(path)
    assert model.generation_defaults.eos_token_ids == (2, 32002)
    processor = Idefics2Processor.from_pretrained(path)
    image = PIL.Image.fromarray((torch.rand(980, 980, 3) * 255).byte().numpy())
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}], True)
    batch = processor(text=prompt, images=[image])
    assert batch["pixel_values"].shape[-2:] == (980, 980)
    with torch.no_grad():
        logits = model(**batch, last_token_only=True)
    assert logits.shape == (1, 1, 32003) and torch.isfinite(logits).all()

    # Found again without a rebuild; rebuilt when it no longer matches demo_config().
    assert demo.ensure_demo_checkpoint(tmp_path) == (path, False)
    stale = json.loads((path / "config.json").read_text())
    stale["text_config"]["num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(stale))
    assert demo.ensure_demo_checkpoint(tmp_path) == (path, True)
    assert demo.demo_is_current(path)


def test_an_interrupted_build_is_never_taken_for_a_finished_one(tmp_path, monkeypatch):
    target = tmp_path / "demo-tiny"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.shutil, "copyfile", crash)  # dies after the weights are written
    with pytest.raises(KeyboardInterrupt):
        demo.build_checkpoint(target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    # A process killed outright leaves its staging folder; the next build removes it.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".demo-tiny.tmp-{int(dead.stdout)}-x"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    assert not demo.demo_is_current(leftover)
    demo.build_checkpoint(target)
    assert demo.demo_is_current(target) and not leftover.exists()


def test_weights_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(demo.WEIGHTS_DIR_ENV, str(tmp_path))
    assert demo.weights_root() == tmp_path
    monkeypatch.delenv(demo.WEIGHTS_DIR_ENV)
    assert demo.weights_root() == demo.DEFAULT_WEIGHTS_ROOT
