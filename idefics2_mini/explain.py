"""`python -m idefics2_mini explain`: answer a question about images, then draw where the answer looked.

    python -m idefics2_mini explain --image cat.png "What animal is this?" --out explain-cat

    1. answer with the fast path (`generate`, greedy), as the main command does;
    2. run the prompt + answer once more through `forward(output_attentions=("perceiver", "text"))`:
       the decoder's and the perceiver's attention probabilities, written out as math;
    3. carry each answer token's attention back to image patches: decoder rollout to the 64
       image tokens of each image, perceiver rollout from those latents to patches
       (attention_maps.py: Abnar & Zuidema 2020, attention rollout with the residual);
    4. write into --out:
         index.html       the answer, each word linked to its picture (hover or click)
         word_NN.png      per answer word: every picture with the heatmap (and, when the image
                          was split, the 5 crops the model saw, each with its own)
         answer.png       every word's heatmap in one grid
         latents_NN.png   per model image (crop): the 64 perceiver latents' maps, 8×8
         maps.npz         the maps as arrays: word_maps_<k> [words, h, w] in [0, 1] on picture k
                          (the picture's aspect ratio), latent_maps_<i> [64, rows, cols]
         explain.json     question, answer, words and their token positions, method, files

Heatmaps are normalised per word (its hottest pixel over all pictures = 1) and mean "share of
this word's output that came from here, per pixel of the original picture".
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .attention_maps import (
    METHODS,
    CropLayout,
    answer_patch_mass,
    crop_layouts,
    display_size,
    grid_values,
    normalised,
    paint,
    perceiver_flow,
)
from .plots import heatmap_overlay, labelled_grid

DEMO_MAX_NEW_TOKENS = 12
DEFAULT_MAX_NEW_TOKENS = 64
PICTURE_SIDE = 448  # longest side of a picture in word_NN.png
TILE_SIDE = 96  # longest side of a tile in latents_NN.png


@dataclass
class Explanation:
    """An answer and where it looked. Masses are per answer token (`token_mass`) or per perceiver
    latent (`latent_mass`) over each model image's L patch tokens (`patch_grid` places them)."""

    question: str
    answer: str
    answer_ids: list[int]
    words: list[str]  # the answer's words (tokens grouped at SentencePiece word starts)
    word_tokens: list[list[int]]  # indices into answer_ids of each word's tokens
    image_sizes: list[tuple[int, int]]  # (width, height) of each original picture
    layouts: list[CropLayout]  # one per model image: where it lies in its picture
    token_mass: torch.Tensor  # [answer tokens, I, L] (attention_maps.answer_patch_mass)
    latent_mass: torch.Tensor  # [I, 64, L] (attention_maps.perceiver_flow)
    patch_grid: torch.Tensor  # [I, R, C] token index of each patch, -1 = padding
    method: str

    def crop_mass(self, values: torch.Tensor, image: int) -> np.ndarray:
        """values [L] over model image `image`'s tokens -> [rows, cols] over its patches."""
        return grid_values(values, self.patch_grid[image]).numpy()

    def word_maps(self, word: int, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Word `word`'s heatmap on every picture, drawn at sizes[k] = (width, height): a list
        of [height, width] float32 in [0, 1], normalised together (the hottest pixel = 1)."""
        mass = self.token_mass[self.word_tokens[word]].sum(dim=0)  # [I, L]
        maps = [np.zeros((h, w), dtype=np.float32) for w, h in sizes]
        for index, layout in enumerate(self.layouts):
            maps[layout.image] += paint(self.crop_mass(mass[index], index), layout, self.image_sizes[layout.image],
                                        sizes[layout.image])
        top = max(float(m.max()) for m in maps)
        return [m / top if top > 0 else m for m in maps]


def answer_words(tokenizer, answer_ids: Sequence[int]) -> tuple[list[str], list[list[int]]]:
    """Group answer tokens into words: a new word starts at a piece beginning with "▁" (SentencePiece's
    word marker) and at every special token. -> (word texts, token indices of each word)."""
    special = set(tokenizer.all_special_ids)
    words: list[list[int]] = []
    for index, token in enumerate(int(t) for t in answer_ids):
        starts_word = tokenizer.convert_ids_to_tokens(token).startswith("▁")
        if not words or starts_word or token in special or int(answer_ids[index - 1]) in special:
            words.append([index])
        else:
            words[-1].append(index)
    texts = [tokenizer.decode([int(answer_ids[i]) for i in word]).strip() or "·" for word in words]
    return texts, words


@torch.no_grad()
def explain(model, processor, images: Sequence[Image.Image], question: str, max_new_tokens: int = 32,
            method: str = "rollout") -> Explanation:
    """Answer `question` about `images` (PIL, loaded) greedily, then compute where each answer
    token looked (see the module docstring). One sequence."""
    from .chat import user_message  # noqa: PLC0415

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    prompt = processor.apply_chat_template([user_message(question, len(images))], add_generation_prompt=True)
    batch = {k: v.to(model.device) for k, v in processor(text=prompt, images=list(images)).items()}
    prompt_len = batch["input_ids"].shape[1]
    generated = model.generate(**batch, max_new_tokens=max_new_tokens)[0, prompt_len:].tolist()
    stops = set(model.generation_defaults.eos_token_ids) | {model.generation_defaults.pad_token_id}
    answer_ids = list(generated)
    while answer_ids and answer_ids[-1] in stops:  # the stop token and the pads after it
        answer_ids.pop()

    # The prompt and the answer in one forward, the attention written out (decoder and perceiver).
    input_ids = torch.cat([batch["input_ids"], torch.tensor([answer_ids], dtype=torch.long, device=model.device)],
                          dim=1)
    out = model(input_ids, torch.ones_like(input_ids), batch["pixel_values"], batch["pixel_attention_mask"],
                output_attentions=("perceiver", "text"))
    # Answer token j was chosen from the logits at the position before it.
    query_positions = [prompt_len - 1 + j for j in range(len(answer_ids))]
    num_images = out.patch_grid.shape[0]
    if query_positions:
        token_mass = answer_patch_mass(out.text_attentions, out.perceiver_attentions, input_ids[0], query_positions,
                                       model.config.image_token_id, method)
    else:
        token_mass = torch.zeros(0, num_images, out.patch_grid[0].numel())
    latent_mass = perceiver_flow(out.perceiver_attentions, method)

    processing = processor.image_processor
    layouts = crop_layouts([image.size for image in images], processing.do_image_splitting, processing.longest_edge,
                           processing.shortest_edge, model.config.vision.patch_size)
    grid = out.patch_grid.cpu()
    for index, layout in enumerate(layouts):  # the geometry must match the tokens the model saw
        rows, cols = int((grid[index, :, 0] >= 0).sum()), int((grid[index, 0] >= 0).sum())
        if (rows, cols) != (layout.rows, layout.cols):
            raise RuntimeError(f"image {index}: the model saw {rows}x{cols} patches, the layout says "
                               f"{layout.rows}x{layout.cols}")
    words, word_tokens = answer_words(processor.tokenizer, answer_ids)
    answer = processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
    return Explanation(question, answer, answer_ids, words, word_tokens, [image.size for image in images], layouts,
                       token_mass, latent_mass, grid, method)


# ----------------------------------------------------------------------------- files


def write_explanation(explanation: Explanation, images: Sequence[Image.Image], out_dir: str | Path) -> list[Path]:
    """Write the pictures, the HTML page and the arrays (see the module docstring) -> the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = [image.convert("RGB") for image in images]
    sizes = [display_size(w, h, PICTURE_SIDE) for w, h in explanation.image_sizes]
    split = any(layout.crop for layout in explanation.layouts)
    files: list[Path] = []
    arrays: dict[str, np.ndarray] = {}

    word_maps = [explanation.word_maps(j, sizes) for j in range(len(explanation.words))]
    summary_tiles, summary_labels = [], []
    for j, (word, maps) in enumerate(zip(explanation.words, word_maps)):
        pictures = [heatmap_overlay(image, values) for image, values in zip(images, maps)]
        tiles, labels = list(pictures), [f"picture {k + 1}" for k in range(len(images))]
        if split:  # one row per picture: the picture, then the 5 crops the model saw of it
            crop_tiles, crop_labels = _crop_tiles(explanation, images, explanation.token_mass[
                explanation.word_tokens[j]].sum(dim=0))
            tiles, labels = [], []
            for k, picture in enumerate(pictures):
                tiles += [picture] + crop_tiles[5 * k : 5 * k + 5]
                labels += [f"picture {k + 1}"] + crop_labels[5 * k : 5 * k + 5]
        title = f'"{word}": word {j + 1} of {len(explanation.words)}, {explanation.method} (hot = looked at)'
        files.append(_save(labelled_grid(tiles, labels, 6 if split else len(images), title),
                           out / f"word_{j:02d}.png"))
        summary_tiles += [picture.resize(display_size(*picture.size, 192)) for picture in pictures]
        summary_labels += [word[:24]] * len(images)
    if word_maps:
        for k in range(len(images)):
            arrays[f"word_maps_{k}"] = np.stack([maps[k] for maps in word_maps])
        files.append(_save(labelled_grid(summary_tiles, summary_labels, 6 if len(images) == 1 else 2 * len(images),
                                         f"where each answer word looked ({explanation.method})"), out / "answer.png"))

    for index, layout in enumerate(explanation.layouts):
        crop = images[layout.image].crop(layout.box)
        tile_size = display_size(*crop.size, TILE_SIDE)
        masses = explanation.latent_mass[index]  # [64, L]
        maps = [explanation.crop_mass(latent, index)[None] for latent in masses]
        latent_maps = np.concatenate(maps)  # [64, rows, cols]
        arrays[f"latent_maps_{index}"] = latent_maps
        tiles = [heatmap_overlay(crop, normalised(_draw_crop(values, layout, tile_size))) for values in latent_maps]
        name = f"picture {layout.image + 1}" + (f", crop {_CROP_NAMES[layout.crop]}" if split else "")
        files.append(_save(labelled_grid(tiles, [f"latent {k}" for k in range(len(tiles))], 8,
                                         f"{name}: what each of the 64 perceiver latents gathered "
                                         f"({explanation.method})"), out / f"latents_{index:02d}.png"))

    files.append(_write(out / "maps.npz", lambda f: np.savez_compressed(f, **arrays)))
    record = {
        "question": explanation.question, "answer": explanation.answer, "answer_ids": explanation.answer_ids,
        "words": explanation.words, "word_tokens": explanation.word_tokens, "method": explanation.method,
        "image_sizes": explanation.image_sizes,
        "crops": [{"picture": l.image, "crop": l.crop, "box": l.box, "patch_rows": l.rows, "patch_cols": l.cols}
                  for l in explanation.layouts],
        "files": [f.name for f in files] + ["explain.json", "index.html"],
    }
    files.append(_write(out / "explain.json", lambda f: f.write(json.dumps(record, indent=1).encode())))
    files.append(_write(out / "index.html", lambda f: f.write(_html(explanation, files).encode())))
    return files


_CROP_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right", "whole")


def _draw_crop(mass: np.ndarray, layout: CropLayout, size: tuple[int, int]) -> np.ndarray:
    """A crop's [rows, cols] mass drawn on the crop itself at `size`."""
    width, height = layout.box[2] - layout.box[0], layout.box[3] - layout.box[1]
    own = CropLayout(0, 0, (0, 0, width, height), layout.resized, layout.rows, layout.cols, layout.patch_size)
    return paint(mass, own, (width, height), size)


def _crop_tiles(explanation: Explanation, images, mass: torch.Tensor):
    """The 5 crops the model saw of each picture, each with this mass [I, L] drawn on it,
    normalised together."""
    drawn = []
    for index, layout in enumerate(explanation.layouts):
        crop = images[layout.image].crop(layout.box)
        size = display_size(*crop.size, PICTURE_SIDE // 2)
        drawn.append((crop, _draw_crop(explanation.crop_mass(mass[index], index), layout, size), layout))
    top = max(float(values.max()) for _, values, _ in drawn)
    tiles = [heatmap_overlay(crop, values / top if top > 0 else values) for crop, values, _ in drawn]
    labels = [f"the model's {_CROP_NAMES[layout.crop]} crop" for _, _, layout in drawn]
    return tiles, labels


def _save(image: Image.Image, path: Path) -> Path:
    return _write(path, lambda f: image.save(f, format="PNG"))


def _write(path: Path, writer) -> Path:
    from .files import write_atomically  # noqa: PLC0415

    def write(tmp) -> None:
        with open(tmp, "wb") as f:
            writer(f)

    return write_atomically(path, write)


def _html(explanation: Explanation, files: list[Path]) -> str:
    words = " ".join(
        f'<a class="word" href="word_{j:02d}.png" data-img="word_{j:02d}.png">{html.escape(word)}</a>'
        for j, word in enumerate(explanation.words)
    ) or "<i>(empty: the model stopped at once)</i>"
    first = "word_00.png" if explanation.words else ""
    latents = "\n".join(f'<p><img src="{f.name}" alt="{f.name}"></p>' for f in files if f.name.startswith("latents_"))
    answer_grid = '<h2>All words</h2><p><img src="answer.png" alt="every word"></p>' if explanation.words else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>idefics2_mini explain</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 1em auto; }}
a.word {{ padding: 1px 3px; border-radius: 3px; text-decoration: none; background: #eee; color: #000; }}
a.word:hover, a.word.on {{ background: #f5a623; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Where the answer looked</h1>
<p><b>Question:</b> {html.escape(explanation.question)}</p>
<p><b>Answer</b> (hover or click a word): {words}</p>
<p><img id="view" src="{first}" alt="the selected word's map"></p>
{answer_grid}
<h2>The perceiver's 64 latents</h2>
<p>Each image the model sees becomes 64 tokens: 64 learned latents that attend to its patches.
These maps show which patches each latent gathered.</p>
{latents}
<h2>Method</h2>
<p>{html.escape(METHOD_NOTE)}</p>
<script>
document.querySelectorAll("a.word").forEach(function (a) {{
  function show(event) {{
    document.getElementById("view").src = a.dataset.img;
    document.querySelectorAll("a.word.on").forEach(function (b) {{ b.classList.remove("on"); }});
    a.classList.add("on");
    if (event.type === "click") event.preventDefault();
  }}
  a.addEventListener("mouseover", show);
  a.addEventListener("click", show);
}});
</script>
</body></html>
"""


METHOD_NOTE = (
    "Attention rollout with the residual (Abnar & Zuidema, 'Quantifying Attention Flow in Transformers', "
    "ACL 2020, arXiv:2005.00928). Decoder: each layer's head-averaged attention A becomes 0.5A + 0.5I "
    "(rows renormalised) and their product gives how much of the output at the position that chose a word came "
    "from each of the image's 64 tokens. Perceiver: the same rollout from each latent back to the image's patches "
    "(patches are not updated by the perceiver; latents are). A word's map = its tokens' flow to the 64 image "
    "tokens times the latents' flow to the patches, spread over the pixels each patch covers in the original "
    "picture and scaled so the hottest pixel is 1. The vision tower's own mixing of patches is not rolled back. "
    "Attention maps show where information was read, not why the answer is what it is."
)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m idefics2_mini explain",
        description="Answer a question about images, then write pictures of where the answer looked "
        "(heatmaps per answer word, the perceiver latents' maps) and an HTML page into --out.",
    )
    parser.add_argument("prompt", help="the question")
    parser.add_argument("--image", action="append", required=True, metavar="PATH",
                        help="an image (repeat for several; they come before the question)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures and index.html")
    parser.add_argument("--weights", metavar="DIR", help="checkpoint folder in the official layout")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")
    parser.add_argument("--split-images", action=argparse.BooleanOptionalAction, default=None,
                        help="split each image into 4 crops + the whole (default: the checkpoint's setting)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help=f"longest answer (default {DEFAULT_MAX_NEW_TOKENS}; {DEMO_MAX_NEW_TOKENS} with the demo "
                        "checkpoint)")
    parser.add_argument("--method", choices=METHODS, default="rollout",
                        help="rollout (default): attention rollout with the residual; mean: the layers' plain average")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str]) -> int:
    from .chat import check_first_turn, first_turn_tokens  # noqa: PLC0415
    from .cli import DTYPES, CLIError, ProgressBar, _choose_weights, _demo_notice  # noqa: PLC0415
    from .config import Idefics2Config  # noqa: PLC0415
    from .image_processing import load_image, to_rgb  # noqa: PLC0415
    from .loading import check_checkpoint  # noqa: PLC0415
    from .model import Idefics2  # noqa: PLC0415
    from .processor import Idefics2Processor  # noqa: PLC0415

    args = build_parser().parse_args(argv)
    if not args.prompt.strip():
        raise CLIError("give a question")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: this torch has no usable CUDA GPU (use --device cpu)")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    images = [to_rgb(load_image(path)) for path in args.image]  # before the long part: loading weights
    weights, is_demo = _choose_weights(args.weights, quiet=args.quiet)
    problems, _ = check_checkpoint(weights, Idefics2, require_tokenizer=False)
    if problems:
        raise CLIError(f"{weights}: {problems[0]} (run `python -m idefics2_mini check {weights}` for details)")
    split = {} if args.split_images is None else {"do_image_splitting": args.split_images}
    processor = Idefics2Processor.from_pretrained(weights, **split)
    max_new_tokens = args.max_new_tokens or (DEMO_MAX_NEW_TOKENS if is_demo else DEFAULT_MAX_NEW_TOKENS)
    check_first_turn(first_turn_tokens(processor, args.prompt, len(images)), max_new_tokens,
                     Idefics2Config.from_pretrained(weights).text.max_position_embeddings)
    bar = ProgressBar(sys.stderr, f"loading {weights}", enabled=not args.quiet)
    model = Idefics2.from_pretrained(weights, dtype=dtype, device=device, progress=bar)
    bar.close()
    if is_demo:
        print(_demo_notice(weights), file=sys.stderr)
    explanation = explain(model, processor, images, args.prompt, max_new_tokens, args.method)
    print(explanation.answer)
    files = write_explanation(explanation, images, args.out)
    print(f"wrote {len(files)} files to {args.out}; open {Path(args.out) / 'index.html'}", file=sys.stderr)
    return 0
