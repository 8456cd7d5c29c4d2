"""Turning the many ways a row holds an image into one PIL RGB image.

A raw image value is a ``PIL.Image.Image``, PNG/JPEG ``bytes``, a path (``str`` or
``os.PathLike``, relative to the data folder) or a ``{"bytes": ..., "path": ...}`` struct
(how ``datasets`` stores an ``Image`` feature in parquet and arrow files).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError


class ImageProblem(Exception):
    """Why an image value cannot be opened: ``reason`` is a ValidationReport key."""

    def __init__(self, reason: str, problem: str, fix: str):
        super().__init__(problem)
        self.reason, self.problem, self.fix = reason, problem, fix


def _struct_value(value: dict) -> Any:
    """The bytes of an ``{"bytes", "path"}`` struct when present, else its path."""
    if value.get("bytes") is not None:
        return value["bytes"]
    return value.get("path")


def resolve_inside(path: str | os.PathLike, base_dir: str | os.PathLike) -> Path:
    """``path`` (relative to ``base_dir`` unless absolute) resolved, symlinks included.

    Raises ``ImageProblem("image_outside_folder")`` when the result leaves ``base_dir``
    (``..`` or a symlink pointing out), ``ImageProblem("missing_image")`` when it does not exist.
    """
    base = Path(base_dir).resolve()
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = base / candidate
    resolved = candidate.resolve()
    if not resolved.is_relative_to(base):
        raise ImageProblem(
            "image_outside_folder",
            f"image path {os.fspath(path)!r} resolves to {resolved}, outside the data folder {base}",
            "Keep images inside the data folder and refer to them by relative paths without '..'",
        )
    if not resolved.is_file():
        raise ImageProblem(
            "missing_image",
            f"image file {resolved} does not exist",
            "Fix the path (relative to the data file's folder) or remove the row",
        )
    return resolved


def _decode(data: bytes | Path, what: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageProblem(
            "corrupt_image",
            f"{what} cannot be decoded as an image ({type(err).__name__}: {err})",
            "Re-encode the image as PNG or JPEG, or remove the row",
        ) from err


def open_image(value: Any, base_dir: str | os.PathLike) -> Image.Image:
    """Decode a raw image value into a loaded PIL image (mode unchanged).

    Raises ``ImageProblem`` with reason ``missing_image``, ``image_outside_folder`` or
    ``corrupt_image``.
    """
    if isinstance(value, dict):
        value = _struct_value(value)
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if isinstance(value, bytes):
        return _decode(value, f"image bytes ({len(value)} bytes)")
    if isinstance(value, str | os.PathLike):
        path = resolve_inside(value, base_dir)
        return _decode(path, f"image file {path}")
    if value is None:
        raise ImageProblem("missing_image", "the row has no image", "Give every row one image")
    raise ImageProblem(
        "corrupt_image",
        f"image value of type {type(value).__name__} is not a PIL image, bytes, a path or a {{bytes, path}} struct",
        "Store images as files, bytes or a datasets Image feature",
    )


BACKGROUND = (255, 255, 255)  # what transparent pixels are laid on: white, as a page shows them
LARGE_IMAGE_PIXELS = 40_000_000  # images over this many pixels get a warning (the processor shrinks them anyway)
_ALPHA_MODES = ("RGBA", "LA", "PA")
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}  # premultiplied alpha -> the straight-alpha mode Pillow composites
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # one channel wider than 8 bits


def _unconvertible(problem: str) -> ImageProblem:
    return ImageProblem("unconvertible_image", problem,
                        "Save the image as an 8- or 16-bit PNG or a JPEG, or remove the row")


def _value_range(pixels, mode: str) -> tuple[float, float]:
    """The (black, white) values of a wide mode's pixels: 16-bit modes span 0-65535; ``I`` (32-bit) and
    ``F`` (float) span 0-1 (``F`` only), 0-255 or 0-65535 when every pixel lies there, else their own
    minimum-maximum. Non-finite floats cannot be placed: ``ImageProblem("unconvertible_image")``."""
    import numpy as np

    if mode.startswith("I;16"):
        return 0.0, 65535.0
    if not np.isfinite(pixels).all():
        raise _unconvertible(f"a {mode} image with NaN or infinite pixel values has no faithful 8-bit form")
    low, high = float(pixels.min()), float(pixels.max())
    ranges = ((0.0, 1.0),) if mode == "F" else ()
    for black, white in (*ranges, (0.0, 255.0), (0.0, 65535.0)):
        if black <= low and high <= white:
            return black, white
    return low, max(high, low + 1.0)


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    """An ``I;16*``, ``I`` or ``F`` image as mode ``L``: its value range (``_value_range``) rescaled
    linearly to 0-255 and rounded, never clipped. A 16-bit PNG's tRNS grey level becomes an alpha mask
    (mode ``LA``)."""
    import numpy as np

    pixels = np.asarray(image)
    black, white = _value_range(pixels, image.mode)
    scaled = (pixels.astype(np.float32) - black) * np.float32(255.0 / (white - black))
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    transparent = image.info.get("transparency")
    if isinstance(transparent, int | float):
        grey.putalpha(Image.fromarray(np.where(pixels == transparent, 0, 255).astype(np.uint8), "L"))
    return grey


def _on_background(image: Image.Image) -> Image.Image:
    """A straight-alpha image (``RGBA``, ``LA``, ``PA``, or any mode with a ``transparency`` key) laid on
    ``BACKGROUND``, as RGB."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")


def to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """``(RGB image, converted)``: every mode Pillow opens, converted faithfully.

    - 16-bit (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``), 32-bit (``I``) and float (``F``) grey:
      rescaled linearly to 8 bits (``_value_range``), never clipped;
    - alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, ``P``/``L``/``RGB`` with a
      ``transparency`` key): composited onto white (``BACKGROUND``);
    - ``1``, ``L``, ``P``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion.

    What has no faithful RGB form (NaN pixels, a mode Pillow cannot convert) raises
    ``ImageProblem("unconvertible_image")``.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image, False
    if mode in _WIDE_MODES:
        image = _wide_to_8bit(image)
    elif mode in _PREMULTIPLIED:
        image = image.convert(_PREMULTIPLIED[mode])
    try:
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            return _on_background(image), True
        return image.convert("RGB"), True
    except ValueError as err:
        raise _unconvertible(f"an image of mode {mode} cannot be converted to RGB ({err})") from err


def is_large(image: Image.Image) -> bool:
    """Over ``LARGE_IMAGE_PIXELS`` pixels."""
    return image.width * image.height > LARGE_IMAGE_PIXELS


def _size_dict(size) -> dict:
    """A processor's ``size`` / ``crop_size`` (a dict, a ``SizeDict`` or None) as a dict of the keys set."""
    if size is None:
        return {}
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: v for k, v in items if v is not None}


def processor_resize(image_processor, width: int, height: int) -> str:
    """What the model's image processor makes of a ``width`` x ``height`` image, in words ("to 336x448,
    then a centre crop of 336x336"); a generic phrase for a processor whose sizing is not known."""
    size = _size_dict(getattr(image_processor, "size", None))
    if hasattr(image_processor, "merge_size") and size.get("longest_edge"):  # Qwen2-VL: a pixel budget
        scale = min(1.0, (size["longest_edge"] / (width * height)) ** 0.5)
        return f"to about {round(width * scale)}x{round(height * scale)} (at most {size['longest_edge']:,} pixels)"
    if "height" in size and "width" in size and getattr(image_processor, "max_image_tiles", None):  # Mllama
        tiles = image_processor.max_image_tiles
        return f"to fit {tiles} tile{'s' if tiles > 1 else ''} of {size['width']}x{size['height']}"
    if "height" in size and "width" in size:
        return f"to {size['width']}x{size['height']}"
    edge = size.get("shortest_edge") or size.get("longest_edge")
    if edge:
        scale = edge / (min(width, height) if "shortest_edge" in size else max(width, height))
        crop = _size_dict(getattr(image_processor, "crop_size", None))
        cropped = (f", then a centre crop of {crop['width']}x{crop['height']}"
                   if getattr(image_processor, "do_center_crop", False) and crop.get("width") else "")
        return f"to {round(width * scale)}x{round(height * scale)}{cropped}"
    return "to its input size"


def large_image_warning(large: dict[str, tuple[int, int]], image_processor=None) -> str | None:
    """One line about the images over ``LARGE_IMAGE_PIXELS`` (``{name: (width, height)}``), naming the
    largest and the resize the model's processor applies anyway; None when there are none."""
    if not large:
        return None
    name, (width, height) = max(large.items(), key=lambda item: item[1][0] * item[1][1])
    others = f" and {len(large) - 1} more" if len(large) > 1 else ""
    resize = processor_resize(image_processor, width, height) if image_processor is not None else "to its input size"
    return (f"warning: image {name} is {width}x{height} ({width * height / 1e6:.0f} megapixels){others}; the model's "
            f"processor resizes it {resize} anyway: shrink such images beforehand to save memory and time")


def images_of(example: dict[str, Any]) -> list[Any]:
    """An example's images, in placeholder order: its ``images`` list, else its one ``image``."""
    return list(example["images"]) if "images" in example else [example.get("image")]


def with_images(example: dict[str, Any], images: list[Any]) -> dict[str, Any]:
    """``example`` showing ``images`` in place of its own, under the key it used (``images`` or ``image``)."""
    return {**example, "images": list(images)} if "images" in example else {**example, "image": images[0]}


def image_fingerprint(value: Any) -> str:
    """A stable id for a raw image value: the relative path, or a hash of its bytes or pixels."""
    if isinstance(value, dict):
        value = _struct_value(value)
    if isinstance(value, str | os.PathLike):
        return Path(value).as_posix()
    if isinstance(value, Image.Image):
        data = value.tobytes() + repr((value.mode, value.size)).encode()
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    else:
        data = repr(value).encode()
    return hashlib.sha1(data).hexdigest()[:16]
