"""Drawing one synthetic book cover with Pillow: every answer has a visual cue.

Layout at side S (112 px by default), each cue jittered a few px per cover:

- background: the genre's colour (slight per-cover noise), emblem (the genre's shape) large
  in the middle;
- top-left: the author's mark, a solid square of about 0.2 S, the author's name beside it;
- lower third: the title's band (its colour, its stripe pattern), the title text under it.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw, ImageFont

from alignment.data.catalog import AUTHORS, GENRES, TITLES

RGB = tuple[int, int, int]
BLANK_GRAY: RGB = (128, 128, 128)


def _jitter(color: RGB, rng: random.Random, amount: int) -> RGB:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in color)  # type: ignore[return-value]


def _contrast(color: RGB) -> RGB:
    """Near-black on light colours, near-white on dark ones."""
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (20, 20, 20) if luminance > 140 else (240, 240, 240)


def _emblem(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: RGB) -> None:
    """Draw ``shape`` centred on (cx, cy) within radius r."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(r / 3)))
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
    elif shape == "star":
        points = [
            (cx + (r if k % 2 == 0 else r * 0.42) * math.sin(k * math.pi / 5),
             cy - (r if k % 2 == 0 else r * 0.42) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]
        draw.polygon(points, fill=color)
    elif shape == "heart":
        h = r / 2
        draw.ellipse((cx - r, cy - r * 0.8, cx, cy - r * 0.8 + r), fill=color)
        draw.ellipse((cx, cy - r * 0.8, cx + r, cy - r * 0.8 + r), fill=color)
        draw.polygon([(cx - r * 0.97, cy - h * 0.3), (cx + r * 0.97, cy - h * 0.3), (cx, cy + r)], fill=color)
    else:
        raise ValueError(f"unknown emblem shape {shape!r}; known: circle, ring, square, triangle, diamond, cross, star, heart")


def _band(size: tuple[int, int], color: RGB, pattern: str, scale: float) -> Image.Image:
    """The title band: ``size`` (w, h) filled with ``color`` and its stripe ``pattern``."""
    w, h = size
    band = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(band)
    ink = tuple(255 - c for c in color)
    step, width = max(4, round(7 * scale)), max(1, round(2 * scale))
    if pattern == "horizontal":
        for y in range(step // 2, h, step):
            draw.line((0, y, w, y), fill=ink, width=width)
    elif pattern == "vertical":
        for x in range(step // 2, w, step):
            draw.line((x, 0, x, h), fill=ink, width=width)
    elif pattern == "diagonal":
        for x in range(-h, w, step):
            draw.line((x, 0, x + h, h), fill=ink, width=width)
    elif pattern == "checks":
        for y in range(0, h, step):
            for x in range((y // step) % 2 * step, w, 2 * step):
                draw.rectangle((x, y, x + step - 1, y + step - 1), fill=ink)
    elif pattern == "dots":
        d = max(2, round(2 * scale))
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                draw.ellipse((x - d, y - d, x + d, y + d), fill=ink)
    else:
        raise ValueError(f"unknown stripe pattern {pattern!r}; known: horizontal, vertical, diagonal, checks, dots")
    return band


def render_cover(title: str, author: str, genre: str, rng: random.Random,
                 image_size: int | tuple[int, int] = 112) -> Image.Image:
    """One cover as an RGB image: ``image_size`` square, or (width, height) (e.g. OCR-VQA's portrait
    600x900: the square design at the width, stretched to the height); ``rng`` draws the jitter."""
    if not isinstance(image_size, int):
        width, height = (int(v) for v in image_size)
        square = render_cover(title, author, genre, rng, width)
        return square if height == width else square.resize((width, height), Image.Resampling.BICUBIC)
    s, scale = image_size, image_size / 112
    jit = max(1, round(3 * scale))
    background, shape = GENRES[genre]
    background = _jitter(background, rng, 8)
    ink = _contrast(background)
    image = Image.new("RGB", (s, s), background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, round(9 * scale)))

    # Genre emblem, large in the middle.
    _emblem(draw, shape, s * 0.5 + rng.randint(-jit, jit), s * 0.45 + rng.randint(-jit, jit), s * 0.2, ink)

    # Author mark (top-left) and name.
    side = round(0.2 * s)
    x0, y0 = round(0.04 * s) + rng.randint(0, jit), round(0.04 * s) + rng.randint(0, jit)
    draw.rectangle((x0, y0, x0 + side - 1, y0 + side - 1), fill=_jitter(AUTHORS[author], rng, 6))
    draw.text((x0 + side + round(3 * scale), y0 + 1), author, fill=ink, font=font)

    # Title band across the lower third, title text under it.
    band_color, pattern = TITLES[title]
    band_top = round(0.68 * s) + rng.randint(-jit, jit)
    band = _band((s, round(0.18 * s)), _jitter(band_color, rng, 6), pattern, scale)
    image.paste(band, (0, band_top))
    draw.text((round(0.05 * s), band_top + band.height + 1), title, fill=ink, font=font)
    return image


def blank_cover(image_size: int | tuple[int, int] = 112) -> Image.Image:
    """A neutral gray RGB image, ``image_size`` square or (width, height): the image-blind control."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return Image.new("RGB", size, BLANK_GRAY)


SAMPLE_COVER = ("The Blue Door", "Laura Chen", "Travel")  # title, author, genre of the shipped example cover


def render_sample_cover() -> Image.Image:
    """The example cover shipped as alignment/assets/sample_cover.png (224 px; "Who wrote this book?" ->
    Laura Chen), for the model card's and README's `vlm-align generate` examples. Regenerate it with
    `render_sample_cover().save("alignment/assets/sample_cover.png", optimize=True)`."""
    title, author, genre = SAMPLE_COVER
    return render_cover(title, author, genre, random.Random(0), 224)
