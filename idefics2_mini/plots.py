"""Small pictures drawn with Pillow (a runtime dependency), so no plotting library is needed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .files import write_atomically


def line_chart(
    file: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = (720, 420),
) -> Path:
    """Draw named (xs, ys) series as lines with axes, tick labels and a legend; write a PNG."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)]
    if not points:
        points = [(0.0, 0.0), (1.0, 1.0)]
    x_min, x_max = min(p[0] for p in points), max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    x_max = x_max if x_max > x_min else x_min + 1
    pad = 0.05 * (y_max - y_min) if y_max > y_min else 0.5
    y_min, y_max = y_min - pad, y_max + pad

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_min) / (x_max - x_min) * (width - left - right)
        py = top + (y_max - y) / (y_max - y_min) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):  # ticks and grid
        fx = x_min + (x_max - x_min) * i / 5
        fy = y_min + (y_max - y_min) * i / 5
        px, _ = to_pixel(fx, y_min)
        _, py = to_pixel(x_min, fy)
        draw.line([px, top, px, height - bottom], fill=(230, 230, 230))
        draw.line([left, py, width - right, py], fill=(230, 230, 230))
        draw.text((px - 10, height - bottom + 5), f"{fx:.4g}", fill="black", font=font)
        draw.text((5, py - 6), f"{fy:.4g}", fill="black", font=font)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for index, (name, (xs, ys)) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        line = [to_pixel(x, y) for x, y in zip(xs, ys)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            x, y = line[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        legend_y = top + 12 + 14 * index
        draw.line([width - right - 170, legend_y, width - right - 150, legend_y], fill=colour, width=2)
        draw.text((width - right - 145, legend_y - 6), name, fill=colour, font=font)
    draw.text((left, 12), title, fill="black", font=font)
    draw.text(((width - len(x_label) * 6) / 2, height - 20), x_label, fill="black", font=font)
    draw.text((5, 22), y_label, fill="black", font=font)
    return write_atomically(Path(file), lambda tmp: image.save(tmp, format="PNG"))


# Anchor colours of matplotlib's "inferno" (dark purple -> red -> yellow), interpolated linearly.
INFERNO_ANCHORS = ((0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                   (250, 193, 39), (252, 255, 164))


def colormap(values, anchors=INFERNO_ANCHORS):
    """values in [0, 1], any shape -> uint8 RGB of shape [..., 3] (numpy)."""
    import numpy as np  # noqa: PLC0415  (numpy is a runtime dependency; imported where used)

    table = np.asarray(anchors, dtype=np.float32)
    position = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * (len(table) - 1)
    low = np.floor(position).astype(int).clip(max=len(table) - 2)
    fraction = (position - low)[..., None]
    return (table[low] * (1 - fraction) + table[low + 1] * fraction).round().astype(np.uint8)


def heatmap_overlay(image: Image.Image, values, floor: float = 0.3, opacity: float = 0.6) -> Image.Image:
    """Draw a map over a picture: values [h, w] in [0, 1] (the picture is resized to w×h), each
    pixel coloured by the colormap with opacity floor + opacity·value: cold places are tinted
    dark, so that even a single hot patch stands out, while the picture stays visible."""
    import numpy as np  # noqa: PLC0415

    values = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    height, width = values.shape
    base = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    alpha = (floor + opacity * values)[..., None]
    mixed = base * (1 - alpha) + colormap(values).astype(np.float32) * alpha
    return Image.fromarray(mixed.round().astype(np.uint8))


def labelled_grid(tiles: Sequence[Image.Image], labels: Sequence[str], columns: int, title: str = "",
                  gap: int = 6, label_height: int = 14) -> Image.Image:
    """Tiles (any sizes) left to right, `columns` per row, each under its label; a row is as tall
    as its tallest tile; a title line on top."""
    font = ImageFont.load_default()
    columns = max(1, columns)
    rows = [list(range(start, min(start + columns, len(tiles)))) for start in range(0, len(tiles), columns)]
    row_heights = [max(tiles[i].height for i in row) + label_height for row in rows]
    width = max([gap + sum(tiles[i].width + gap for i in row) for row in rows] + [gap + 6 * len(title) + gap])
    top = label_height + gap if title else 0
    sheet = Image.new("RGB", (width, top + gap + sum(h + gap for h in row_heights)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((gap, gap // 2), title, fill="black", font=font)
    y = top + gap
    for row, height in zip(rows, row_heights):
        x = gap
        for index in row:
            draw.text((x, y), labels[index], fill="black", font=font)
            sheet.paste(tiles[index], (x, y + label_height))
            x += tiles[index].width + gap
        y += height + gap
    return sheet
