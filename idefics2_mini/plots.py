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
