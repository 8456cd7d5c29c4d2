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


def to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """``(RGB image, converted)``; transparent pixels are laid on white."""
    if image.mode == "RGB":
        return image, False
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), True
    return image.convert("RGB"), True


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
