"""Decoding user images: EXIF orientation, every PIL mode to RGB, truncated files and decompression bombs refused.

A bad image raises `BadSample` with a short `reason` (the key it is counted under when bad samples are
skipped) and a detail for the one-line error.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
KEEP_FORMATS = ("JPEG", "PNG", "WEBP")  # stored as-is when already upright RGB; anything else becomes PNG
TRUNCATED = ("truncated", "broken data stream")  # how PIL words a file that ends early


class BadSample(ValueError):
    """A sample that cannot be used. `reason`: unreadable_image, truncated_image, empty_file, missing_file,
    image_too_large, unsupported_mode, missing_caption or empty_caption."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason.replace('_', ' ')}: {detail}")
        self.reason = reason


def read_image_file(value: str | dict | None) -> bytes:
    """The bytes of a `datasets.Image(decode=False)` value ({"bytes", "path"}) or of an image path."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value["bytes"]
    path = value.get("path") if isinstance(value, dict) else value
    if not path:
        raise BadSample("missing_file", "the row has no image")
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadSample("missing_file", f"{path} does not exist") from None
    except OSError as e:  # a directory, no permission
        raise BadSample("unreadable_image", f"{path}: {e.strerror or e}") from None


def _to_8bit(im: Image.Image) -> Image.Image:
    """Single-channel 16/32-bit int or float image -> L, scaled from its bit depth (not clipped)."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        a = a * 255.0 if a.max(initial=0.0) <= 1.0 else a  # float images hold [0, 1] or [0, 255]
    elif im.mode.startswith("I;16") or a.max(initial=0.0) > 255:
        a = a / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (LA, PA, RGBA, P with a transparent colour)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _to_8bit(im).convert("RGB")
    if im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    try:
        return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, ...
    except ValueError as e:
        raise BadSample("unsupported_mode", f"cannot convert mode {im.mode} to RGB ({e})") from None


def open_rgb(data: bytes) -> tuple[Image.Image, bool]:
    """Decode `data` fully -> (upright RGB image, whether it differs from the stored one). Raises BadSample."""
    if not data:
        raise BadSample("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, do not just warn
            im = Image.open(io.BytesIO(data))  # checks the size against Image.MAX_IMAGE_PIXELS
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("image_too_large", str(e)) from None
    except UnidentifiedImageError:
        raise BadSample("unreadable_image", f"not an image file PIL can read ({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError) as e:  # how PIL reports truncated or corrupt data
        reason = "truncated_image" if any(k in str(e).lower() for k in TRUNCATED) else "unreadable_image"
        raise BadSample(reason, str(e)) from None
    changed = im.mode != "RGB" or im.getexif().get(EXIF_ORIENTATION, 1) != 1 or im.format not in KEEP_FORMATS
    return to_rgb(ImageOps.exif_transpose(im)), changed


def clean_image_bytes(data: bytes) -> bytes:
    """Bytes of an upright RGB image: the original bytes when they already are one, else a lossless PNG."""
    im, changed = open_rgb(data)
    if not changed:
        return data
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()
