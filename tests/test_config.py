"""Config reading: the official (transformers 4.40-era) file and the newer format."""

from __future__ import annotations

import json

import pytest
from reference_models import tiny_config_dict

import idefics2_mini as im
from idefics2_mini.config import ConfigError

# The shape of HuggingFaceM4/idefics2-8b's config.json: sparse sub-configs, rope_theta (if any)
# at the top of text_config, perceiver_config holding only model_type.
OFFICIAL_STYLE = {
    "architectures": ["Idefics2ForConditionalGeneration"],
    "image_token_id": 32001,
    "model_type": "idefics2",
    "perceiver_config": {"model_type": "idefics2"},
    "text_config": {"model_type": "mistral", "rms_norm_eps": 1e-05, "torch_dtype": "float32", "vocab_size": 32003},
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vision_config": {
        "hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "idefics2",
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
    },
    "do_image_splitting": False,
}


def test_official_format_uses_released_values():
    config = im.Idefics2Config.from_dict(OFFICIAL_STYLE)
    assert config.vision.hidden_size == 1152 and config.vision.head_dim == 72
    assert config.vision.num_patches_per_side == 70
    # perceiver width and eps come from the text config, as the released model was trained
    assert config.perceiver.hidden_size == 4096 and config.perceiver.rms_norm_eps == 1e-5
    assert config.perceiver.resampler_n_latents == 64 and config.image_seq_len == 64
    text = config.text
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (4096, 32, 32, 8)
    assert (text.head_dim, text.intermediate_size, text.sliding_window) == (128, 14336, 4096)
    assert (text.rope_theta, text.rms_norm_eps, text.max_position_embeddings, text.vocab_size) == (1e4, 1e-5, 32768, 32003)
    assert config.checkpoint_dtype == "float32"


def test_old_rope_theta_and_new_rope_parameters():
    old = json.loads(json.dumps(OFFICIAL_STYLE))
    old["text_config"]["rope_theta"] = 5e5
    assert im.Idefics2Config.from_dict(old).text.rope_theta == 5e5
    new = json.loads(json.dumps(OFFICIAL_STYLE))
    new["text_config"]["rope_parameters"] = {"rope_theta": 2e4, "rope_type": "default"}
    new["dtype"] = "bfloat16"
    config = im.Idefics2Config.from_dict(new)
    assert config.text.rope_theta == 2e4 and config.checkpoint_dtype == "bfloat16"


def test_newer_transformers_file_round_trips(tmp_path):
    from transformers import Idefics2Config as ReferenceConfig

    ReferenceConfig(**tiny_config_dict(sliding_window=None)).save_pretrained(tmp_path)
    config = im.Idefics2Config.from_pretrained(tmp_path)
    assert config.text.sliding_window is None and config.text.head_dim == 24
    assert config.perceiver.num_key_value_heads == 2 and config.vision.image_size == 56
    config.save(tmp_path / "again")
    assert im.Idefics2Config.from_pretrained(tmp_path / "again") == config


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("text_config", "num_key_value_heads", 3, "text_config.num_key_value_heads"),
        ("vision_config", "num_attention_heads", 5, "vision_config.hidden_size"),
        ("perceiver_config", "num_key_value_heads", 5, "perceiver_config.num_key_value_heads"),
        ("perceiver_config", "hidden_size", 128, "perceiver_config.hidden_size"),
        ("text_config", "hidden_size", "wide", "text_config.hidden_size"),
        ("text_config", "model_type", "llama", "text_config.model_type"),
        ("text_config", "rope_parameters", {"rope_type": "yarn", "factor": 2.0}, "rope_type"),
    ],
)
def test_invalid_fields_are_named(section, key, value, message):
    raw = json.loads(json.dumps(OFFICIAL_STYLE))
    raw[section][key] = value
    with pytest.raises(ConfigError, match=message):
        im.Idefics2Config.from_dict(raw)


def test_image_token_id_must_fit_vocab():
    raw = json.loads(json.dumps(OFFICIAL_STYLE))
    raw["image_token_id"] = 40000
    with pytest.raises(ConfigError, match="image_token_id"):
        im.Idefics2Config.from_dict(raw)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        im.Idefics2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        im.Idefics2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ConfigError, match="model_type"):
        im.Idefics2Config.from_pretrained(tmp_path)
