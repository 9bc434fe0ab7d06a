"""`python -m idefics2_mini explain` and the maths behind its pictures (attention_maps.py):
rollout rows are distributions; attention forced onto one patch puts the heatmap's maximum on
that patch of the original picture, unsplit and through a split crop; the command runs on the
demo checkpoint and writes normalised maps with the picture's aspect ratio and an HTML page."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from idefics2_mini import attention_maps, cli, demo
from idefics2_mini.explain import Explanation, write_explanation

IMAGE_TOKEN = 32001
LATENTS = 4


def test_rollout_rows_are_distributions():
    generator = torch.Generator().manual_seed(0)
    layers = [torch.rand(3, 7, 7, generator=generator).tril() for _ in range(3)]
    layers = [a / a.sum(-1, keepdim=True) for a in layers]
    flow = attention_maps.rollout(layers)
    assert torch.allclose(flow.sum(-1), torch.ones(7)) and not flow.triu(1).any()  # causal stays causal
    assert torch.allclose(attention_maps.rollout(layers, torch.tensor([6, 2])), flow[[6, 2]])
    # perceiver: the patch part + the initial-latent part of each latent sum to one
    perceiver = [torch.rand(2, 3, LATENTS, 5 + LATENTS, generator=generator) for _ in range(2)]
    perceiver = [a / a.sum(-1, keepdim=True) for a in perceiver]
    patches = attention_maps.perceiver_flow(perceiver)
    assert patches.shape == (2, LATENTS, 5) and bool((patches.sum(-1) < 1).all())
    one_layer = attention_maps.perceiver_flow(perceiver[:1])
    assert torch.allclose(one_layer, 0.5 * perceiver[0].mean(1)[..., :5])


def forced_explanation(image_size, split, target_image, target_latent, target_patch):
    """An Explanation whose attention is forced: the answer's one token reads only image
    `target_image`'s token `target_latent`, and that latent reads only patch `target_patch`
    (row, col); every other latent reads only latents, every other query only itself."""
    layouts = attention_maps.crop_layouts([image_size], split)
    rows, cols = max(lay.rows for lay in layouts), max(lay.cols for lay in layouts)
    grid = torch.full((len(layouts), rows, cols), -1, dtype=torch.long)
    for index, layout in enumerate(layouts):
        grid[index, : layout.rows, : layout.cols] = (torch.arange(rows * cols).view(rows, cols)
                                                     [: layout.rows, : layout.cols])
    num_patches = rows * cols
    perceiver = torch.zeros(len(layouts), 2, LATENTS, num_patches + LATENTS)
    perceiver[..., num_patches:] = torch.eye(LATENTS)
    target_token = int(grid[target_image][target_patch])
    perceiver[target_image, :, target_latent] = 0
    perceiver[target_image, :, target_latent, target_token] = 1
    input_ids = [1, 5]
    for _ in layouts:
        input_ids += [32000] + [IMAGE_TOKEN] * LATENTS
    input_ids += [32000, 6, 7]  # the answer token is chosen at the last position
    length = len(input_ids)
    text = torch.eye(length)[None, None].repeat(1, 2, 1, 1)
    text[0, :, -1] = 0
    text[0, :, -1, 2 + target_image * (LATENTS + 1) + 1 + target_latent] = 1
    mass = attention_maps.answer_patch_mass([text], [perceiver], torch.tensor(input_ids), [length - 1], IMAGE_TOKEN)
    latent_mass = attention_maps.perceiver_flow([perceiver])
    return Explanation("q?", "word", [7], ["word"], [[0]], [image_size], layouts, mass, latent_mass, grid, "rollout")


# Expected boxes by hand (left, top, right, bottom in the 451x300 original):
# - not split: resized to 378x451 (h, w: the short side raised to 378, the long one kept), 27x32
#   patches; patch (5, 20) is y 70..84, x 280..294 there, times 300/378 and 451/451;
# - split, crop 1 (top-right, x 225..451, y 0..150): 226x150 resized to 378x378; patch (2, 3) is
#   y 28..42, x 42..56 there, times 150/378 and 226/378, plus 225 on x;
# - split, crop 4 (the whole picture, as not split): patch (20, 1) is y 280..294, x 14..28.
@pytest.mark.parametrize("split, target_image, patch, box", [
    (False, 0, (5, 20), (280, 70 * 300 / 378, 294, 84 * 300 / 378)),
    (True, 1, (2, 3), (225 + 42 * 226 / 378, 28 * 150 / 378, 225 + 56 * 226 / 378, 42 * 150 / 378)),
    (True, 4, (20, 1), (14, 280 * 300 / 378, 28, 294 * 300 / 378)),
])
def test_forced_attention_puts_the_maximum_on_that_patch(tmp_path, split, target_image, patch, box):
    size = (451, 300)  # width, height
    explanation = forced_explanation(size, split, target_image, target_latent=2, target_patch=patch)
    picture = Image.new("RGB", size, (120, 160, 200))
    write_explanation(explanation, [picture], tmp_path)
    word_map = np.load(tmp_path / "maps.npz")["word_maps_0"][0]
    height, width = word_map.shape
    assert word_map.max() == 1.0 and word_map.min() == 0.0
    layout = explanation.layouts[target_image]
    left, top, right, bottom = layout.patch_box(*patch)  # in the original's pixels
    assert np.allclose((left, top, right, bottom), box)
    y, x = np.unravel_index(np.argmax(word_map), word_map.shape)
    scale_x, scale_y = width / size[0], height / size[1]
    assert left * scale_x - 1 <= x <= right * scale_x + 1 and top * scale_y - 1 <= y <= bottom * scale_y + 1
    # the hot area is exactly that one patch (to a pixel of rounding), nothing else is painted
    hot = word_map > 0
    assert hot.sum() <= (right - left + 2) * scale_x * (bottom - top + 2) * scale_y
    latent_maps = np.load(tmp_path / "maps.npz")[f"latent_maps_{target_image}"]
    assert latent_maps.shape == (LATENTS, layout.rows, layout.cols)
    assert np.unravel_index(np.argmax(latent_maps[2]), latent_maps[2].shape) == patch


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    demo.ensure_demo_checkpoint(root)
    return root


@pytest.mark.parametrize("split", [False, True])
def test_explain_command_on_the_demo_checkpoint(weights_root, tmp_path, monkeypatch, capsys, split):
    monkeypatch.setenv(demo.WEIGHTS_DIR_ENV, str(weights_root))
    image = "idefics2_mini/assets/chelsea.png"
    argv = ["explain", "--image", image, "What animal is this?", "--out", str(tmp_path), "--quiet",
            "--max-new-tokens", "4", "--split-images" if split else "--no-split-images"]
    status = cli.main(argv)
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "RANDOM" in err and "index.html" in err
    record = json.loads((tmp_path / "explain.json").read_text())
    assert record["answer"] == out.strip() and record["words"]
    for name in record["files"]:
        assert (tmp_path / name).is_file(), name
    words = len(record["words"])
    assert {f"word_{j:02d}.png" for j in range(words)} | {"answer.png", "maps.npz", "index.html"} <= set(
        record["files"])
    assert len([f for f in record["files"] if f.startswith("latents_")]) == (5 if split else 1)
    maps = np.load(tmp_path / "maps.npz")
    word_maps = maps["word_maps_0"]
    width, height = Image.open(image).size
    assert word_maps.shape[0] == words
    assert abs(word_maps.shape[1] / word_maps.shape[2] - height / width) < 0.01  # the picture's aspect ratio
    assert word_maps.min() >= 0 and np.allclose(word_maps.max(axis=(1, 2)), 1.0)  # normalised per word
    assert maps["latent_maps_0"].shape[0] == 64
    page = (tmp_path / "index.html").read_text()
    assert all(f'href="word_{j:02d}.png"' in page for j in range(words)) and "Abnar" in page
    with Image.open(tmp_path / "word_00.png") as picture:
        assert picture.width > 400 and picture.height > 250


def test_explain_bad_inputs(tmp_path, capsys):
    assert cli.main(["explain", "--image", str(tmp_path / "missing.png"), "Hi?", "--out", str(tmp_path)]) == 1
    assert "not found" in capsys.readouterr().err
    assert cli.main(["explain", "Hi?", "--out", str(tmp_path)]) == 2  # --image is required
    assert cli.main(["explain", "--image", "idefics2_mini/assets/chelsea.png", "Hi?", "--out", str(tmp_path),
                     "--method", "saliency"]) == 2
