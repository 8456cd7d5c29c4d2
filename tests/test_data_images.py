"""Images: every mode Pillow opens becomes RGB as an independent numpy conversion of its raw pixels
says it should (16-bit rescaled, not clipped; alpha laid on white); what has no faithful RGB form is
refused with one line; images over 40 megapixels are named in one warning line.

Each reference works from the raw array (`np.asarray` of the image as Pillow decoded it), not from
Pillow's own conversion, except where Pillow's conversion is the standard one (CMYK, YCbCr, HSV: the
formulas are written out here too).
"""

import colorsys
import io

import numpy as np
import pytest
from PIL import Image

from alignment.data import images as images_module
from alignment.data import validate_examples
from alignment.data.images import ImageProblem, large_image_warning, processor_resize, to_rgb

WHITE = 255.0


def mean_abs_diff(image: Image.Image, reference: np.ndarray) -> float:
    """Mean |converted - reference| in grey levels over every pixel and channel; `reference` [H, W, 3]."""
    assert image.mode == "RGB" and image.size == (reference.shape[1], reference.shape[0])
    return float(np.abs(np.asarray(image).astype(np.float64) - reference).mean())


def grey(values: np.ndarray) -> np.ndarray:
    """[H, W] grey levels -> [H, W, 3]."""
    return np.repeat(values[..., None].astype(np.float64), 3, axis=-1)


def ramp(high: int, dtype, shape=(32, 48)) -> np.ndarray:
    """Every value of 0..high spread over `shape` (row-major), as `dtype`."""
    return np.linspace(0, high, shape[0] * shape[1]).reshape(shape).round().astype(dtype)


def reopened(image: Image.Image, fmt: str) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    opened.load()
    return opened


def test_16_bit_png_is_rescaled_not_clipped():
    """A 16-bit grey PNG (Pillow opens it as I;16): 65535 is white, 32768 mid-grey. Clipping to 255 (the
    old conversion) turned 99.6% of this ramp white; the reference is value / 257."""
    raw = ramp(65535, np.uint16)
    image = reopened(Image.fromarray(raw), "PNG")
    assert image.mode == "I;16"
    rgb, converted = to_rgb(image)
    assert converted and mean_abs_diff(rgb, grey(raw / 257.0)) < 2
    assert (np.asarray(rgb) == 255).mean() < 0.01


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16", "<u2"), ("I;16N", "=u2")])
def test_16_bit_byte_orders(mode, dtype):
    raw = ramp(65535, np.uint16)
    image = Image.frombytes(mode, (raw.shape[1], raw.shape[0]), raw.astype(dtype).tobytes())
    assert np.array_equal(np.asarray(image), raw)  # the raw array Pillow holds is the ramp
    assert mean_abs_diff(to_rgb(image)[0], grey(raw / 257.0)) < 1


@pytest.mark.parametrize("high, low, scale", [
    (255, 0, "8-bit values in a 32-bit image stay as they are"),
    (65535, 0, "16-bit values (e.g. a 16-bit TIFF read as I) are divided by 257"),
    (1_000_000, -5000, "any other range is rescaled from its minimum to its maximum"),
])
def test_32_bit_integer(high, low, scale):
    raw = (ramp(high - low, np.int64) + low).astype(np.int32)
    black, white = (0, 255) if high == 255 else (0, 65535) if high == 65535 else (low, high)
    reference = (raw.astype(np.float64) - black) * 255.0 / (white - black)
    assert mean_abs_diff(to_rgb(Image.fromarray(raw, "I"))[0], grey(reference)) < 1, scale


def test_float_images():
    unit = np.linspace(0, 1, 32 * 48, dtype=np.float32).reshape(32, 48)  # 0..1 floats: 1 is white
    assert mean_abs_diff(to_rgb(Image.fromarray(unit, "F"))[0], grey(unit * 255.0)) < 1
    wide = unit * 4000 - 1000  # outside 0..1 and 0..255: minimum to maximum
    assert mean_abs_diff(to_rgb(Image.fromarray(wide, "F"))[0], grey((wide + 1000) / 4000 * 255.0)) < 1
    nan = unit.copy()
    nan[3, 4] = np.nan
    with pytest.raises(ImageProblem, match="NaN or infinite") as info:
        to_rgb(Image.fromarray(nan, "F"))
    assert info.value.reason == "unconvertible_image"


def straight_alpha_reference(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """colour [H, W, 3] with alpha [H, W] (0-255) laid on white."""
    a = alpha[..., None].astype(np.float64) / 255.0
    return colour.astype(np.float64) * a + WHITE * (1 - a)


def random_pixels(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_rgba_and_la_are_laid_on_white():
    rgba = random_pixels((16, 24, 4))
    assert mean_abs_diff(to_rgb(Image.fromarray(rgba, "RGBA"))[0],
                         straight_alpha_reference(rgba[..., :3], rgba[..., 3])) < 1
    la = random_pixels((16, 24, 2), seed=1)
    assert mean_abs_diff(to_rgb(Image.fromarray(la, "LA"))[0], straight_alpha_reference(grey(la[..., 0]), la[..., 1])) < 1


def test_premultiplied_alpha_is_laid_on_white():
    """RGBa / La hold colour * alpha: on white that is colour_premultiplied + (255 - alpha). The old
    conversion dropped alpha (transparent pixels black) for RGBa and raised for La."""
    alpha = random_pixels((16, 24), seed=2)
    colour = random_pixels((16, 24, 3), seed=3)
    premultiplied = (colour.astype(np.float64) * alpha[..., None] / 255.0).round().astype(np.uint8)
    reference = premultiplied.astype(np.float64) + (WHITE - alpha[..., None])
    rgba = Image.fromarray(np.dstack([premultiplied, alpha]), "RGBa")
    assert mean_abs_diff(to_rgb(rgba)[0], reference) < 1
    la = Image.frombytes("La", (24, 16), np.dstack([premultiplied[..., 0], alpha]).tobytes())
    assert mean_abs_diff(to_rgb(la)[0], grey(premultiplied[..., 0] + (WHITE - alpha))) < 1


def palette_image(mode="P") -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """A 4-colour palette image: (image, indices [H, W], palette [4, 3])."""
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255], [40, 200, 40]], dtype=np.uint8)
    indices = np.arange(16 * 24).reshape(16, 24) % 4
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette(palette.flatten().tolist())
    return image, indices, palette


def test_palette_with_and_without_transparency():
    image, indices, palette = palette_image()
    assert mean_abs_diff(to_rgb(image)[0], palette[indices].astype(np.float64)) == 0
    image = reopened(image, "PNG")
    image.info["transparency"] = 2  # index 2 is transparent (a GIF / PNG tRNS palette entry)
    reference = palette[indices].astype(np.float64)
    reference[indices == 2] = WHITE
    assert mean_abs_diff(to_rgb(image)[0], reference) == 0
    alphas = bytes([255, 128, 0, 255])  # a per-entry alpha table (PNG tRNS)
    image.info["transparency"] = alphas
    expected = straight_alpha_reference(palette[indices], np.array(list(alphas))[indices])
    assert mean_abs_diff(to_rgb(image)[0], expected) < 1


def test_palette_with_alpha_band():
    image, indices, palette = palette_image()
    alpha = random_pixels((16, 24), seed=4)
    pa = image.convert("PA")
    pa.putalpha(Image.fromarray(alpha, "L"))
    assert mean_abs_diff(to_rgb(pa)[0], straight_alpha_reference(palette[indices], alpha)) < 1


def test_grey_rgb_with_transparent_colour_key():
    """L and RGB with a tRNS colour: that colour is transparent (white); the old code kept RGB as is."""
    rgb = random_pixels((16, 24, 3), seed=5)
    rgb[:4] = (7, 8, 9)
    image = Image.fromarray(rgb, "RGB")
    image.info["transparency"] = (7, 8, 9)
    reference = rgb.astype(np.float64)
    reference[:4] = WHITE
    assert mean_abs_diff(to_rgb(image)[0], reference) == 0
    raw16 = ramp(65535, np.uint16)
    image = Image.fromarray(raw16)  # I;16 with a tRNS grey level (16-bit PNG)
    image.info["transparency"] = int(raw16[0, 5])
    reference = grey(raw16 / 257.0)
    reference[raw16 == raw16[0, 5]] = WHITE
    assert mean_abs_diff(to_rgb(image)[0], reference) < 1


def test_one_bit_and_grey():
    bits = random_pixels((16, 24), seed=6) > 127
    assert mean_abs_diff(to_rgb(Image.fromarray(bits))[0], grey(bits * 255.0)) == 0
    levels = random_pixels((16, 24), seed=7)
    assert mean_abs_diff(to_rgb(Image.fromarray(levels, "L"))[0], grey(levels)) == 0
    rgbx = random_pixels((16, 24, 4), seed=8)
    assert mean_abs_diff(to_rgb(Image.fromarray(rgbx, "RGBX"))[0], rgbx[..., :3].astype(np.float64)) == 0


def test_cmyk():
    """Without a colour profile: R = 255 (1 - C/255)(1 - K/255), likewise G with M and B with Y."""
    cmyk = random_pixels((16, 24, 4), seed=9).astype(np.float64)
    reference = 255.0 * (1 - cmyk[..., :3] / 255.0) * (1 - cmyk[..., 3:] / 255.0)
    assert mean_abs_diff(to_rgb(Image.fromarray(cmyk.astype(np.uint8), "CMYK"))[0], reference) < 1


def test_ycbcr():
    """JPEG's full-range BT.601: R = Y + 1.402 (Cr - 128), G = Y - 0.344136 (Cb - 128) - 0.714136 (Cr - 128),
    B = Y + 1.772 (Cb - 128)."""
    ycc = random_pixels((16, 24, 3), seed=10).astype(np.float64)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128
    reference = np.clip(np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1), 0, 255)
    assert mean_abs_diff(to_rgb(Image.fromarray(ycc.astype(np.uint8), "YCbCr"))[0], reference) < 1


def test_hsv():
    hsv = random_pixels((8, 12, 3), seed=11)
    reference = np.array([[colorsys.hsv_to_rgb(*(p / 255.0)) for p in row] for row in hsv]) * 255.0
    assert mean_abs_diff(to_rgb(Image.fromarray(hsv, "HSV"))[0], reference) < 1


def test_lab_grey_axis():
    """a* = b* = 0 is grey whatever the white point: Y = ((L* + 16) / 116)^3 (L* > 8), then sRGB's curve.
    Pillow's LAB bytes: L* scaled to 0-255, a* and b* signed (0 neutral)."""
    lightness = np.linspace(10, 100, 8 * 12).reshape(8, 12)
    lab = np.stack([lightness * 255 / 100, np.zeros_like(lightness), np.zeros_like(lightness)], -1)
    lab = lab.round().astype(np.uint8)
    y = ((lab[..., 0].astype(np.float64) * 100 / 255 + 16) / 116) ** 3
    srgb = np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055) * 255
    assert mean_abs_diff(to_rgb(Image.frombytes("LAB", (12, 8), lab.tobytes()))[0], grey(srgb)) < 2


def test_rgb_is_returned_unchanged():
    image = Image.fromarray(random_pixels((4, 4, 3)), "RGB")
    rgb, converted = to_rgb(image)
    assert rgb is image and not converted


def test_validation_counts_and_refuses(tmp_path):
    """Through validate_examples: a 16-bit PNG file is counted as converted and arrives rescaled; a float
    image with NaN is refused as `unconvertible_image`, naming the row's line and field."""
    raw = ramp(65535, np.uint16)
    Image.fromarray(raw).save(tmp_path / "deep.png")
    row = {"id": "a", "image_id": "a", "image": "deep.png", "question": "Who wrote this book?", "answer": "Ann",
           "kind": "author", "source": "rows.jsonl", "row": 0, "line": 1}
    kept, report = validate_examples([row], base_dir=tmp_path)
    assert report.converted_to_rgb == 1 and mean_abs_diff(kept[0]["image"], grey(raw / 257.0)) < 2
    nan = np.full((4, 4), np.nan, dtype=np.float32)
    bad = {**row, "image": Image.fromarray(nan, "F"), "line": 3}
    with pytest.raises(ValueError, match=r"rows.jsonl: line 3, field 'image': a F image with NaN"):
        validate_examples([bad], base_dir=tmp_path)
    assert validate_examples([bad], base_dir=tmp_path, policy="skip")[1].skipped == {"unconvertible_image": 1}


def test_large_images_are_named_with_the_processors_resize(tmp_path, monkeypatch):
    """Over LARGE_IMAGE_PIXELS (40 MP; lowered here so the test image stays small): listed by validation,
    then one line naming the largest and what the model's processor makes of it."""
    from transformers import CLIPImageProcessor

    monkeypatch.setattr(images_module, "LARGE_IMAGE_PIXELS", 1000)
    Image.new("RGB", (80, 40)).save(tmp_path / "wide.png")
    Image.new("RGB", (30, 30)).save(tmp_path / "small.png")
    Image.new("RGB", (50, 30)).save(tmp_path / "mid.png")
    rows = [{"id": n, "image_id": n, "image": f"{n}.png", "question": "Who wrote this book?", "answer": "Ann",
             "kind": "author"} for n in ("wide", "small", "mid")]
    _, report = validate_examples(rows, base_dir=tmp_path)
    assert report.large_images == {"wide.png": (80, 40), "mid.png": (50, 30)}
    clip = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20})
    line = large_image_warning(report.large_images, clip)
    assert line == ("warning: image wide.png is 80x40 (0 megapixels) and 1 more; the model's processor resizes it "
                    "to 40x20, then a centre crop of 20x20 anyway: shrink such images beforehand to save memory "
                    "and time")
    assert large_image_warning({}, clip) is None


def test_processor_resize_in_words():
    from transformers import CLIPImageProcessor, MllamaImageProcessor

    assert processor_resize(CLIPImageProcessor(size={"shortest_edge": 336}, do_center_crop=False), 8000, 6000) == \
        "to 448x336"
    mllama = MllamaImageProcessor(size={"height": 560, "width": 560}, max_image_tiles=4)
    assert processor_resize(mllama, 8000, 6000) == "to fit 4 tiles of 560x560"
