"""Decoding user images: every PIL mode to the right RGB pixels, EXIF orientation, bad files refused by reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data.images import BadSample, clean_image_bytes, open_rgb, read_image_file


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def palette_image(transparent: bool) -> Image.Image:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((0, 0), 1)
    if transparent:
        im.info["transparency"] = 0  # index 0 is see-through
    return im


MODES = [  # (image, format, expected RGB at (1, 1), expected at (0, 0) where it differs)
    (Image.new("L", (4, 4), 100), "PNG", (100, 100, 100)),
    (Image.new("1", (4, 4), 1), "PNG", (255, 255, 255)),
    (Image.new("LA", (4, 4), (0, 0)), "PNG", (255, 255, 255)),  # fully transparent black -> white
    (Image.new("LA", (4, 4), (40, 255)), "PNG", (40, 40, 40)),
    (Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "PNG", (255, 127, 127)),  # half red over white
    (palette_image(transparent=False), "PNG", (10, 20, 30)),
    (palette_image(transparent=True), "PNG", (255, 255, 255)),
    (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
    (Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)), "PNG", (100, 100, 100)),  # I;16: scaled, not clipped
    (Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG", (255, 255, 255)),
    (Image.new("I", (4, 4), 257 * 50), "TIFF", (50, 50, 50)),
    (Image.new("F", (4, 4), 0.5), "TIFF", (128, 128, 128)),
]


@pytest.mark.parametrize("im,fmt,rgb", MODES, ids=[f"{m[0].mode}-{m[2]}" for m in MODES])
def test_every_mode_becomes_the_right_rgb(im, fmt, rgb):
    out, changed = open_rgb(encode(im, fmt))
    assert out.mode == "RGB" and changed
    got = out.getpixel((1, 1))
    assert max(abs(a - b) for a, b in zip(got, rgb)) <= (8 if fmt == "JPEG" else 1), got


def test_transparent_palette_keeps_opaque_colours():
    out, _ = open_rgb(encode(palette_image(transparent=True)))
    assert out.getpixel((0, 0)) == (200, 100, 50) and out.getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (8, 4), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 4, 4))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    out, changed = open_rgb(encode(im, "PNG", exif=exif))
    assert changed and out.size == (4, 8)
    assert out.getpixel((1, 1))[0] > 200 and out.getpixel((1, 7))[2] > 200  # red on top after rotating


def test_upright_rgb_jpeg_keeps_its_bytes_other_images_become_png():
    jpeg = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "JPEG")
    assert clean_image_bytes(jpeg) == jpeg
    png = clean_image_bytes(encode(Image.new("L", (8, 8), 7)))
    assert Image.open(io.BytesIO(png)).format == "PNG" and Image.open(io.BytesIO(png)).mode == "RGB"


GOOD_PNG = encode(Image.effect_noise((32, 32), 40).convert("RGB"))


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"),
    (b"this is a text file named .jpg", "unreadable_image"),
    (GOOD_PNG[: len(GOOD_PNG) // 2], "truncated_image"),
    (encode(Image.effect_noise((32, 32), 40).convert("RGB"), "JPEG")[:-200], "truncated_image"),
])
def test_bad_bytes_raise_with_a_reason(data, reason):
    with pytest.raises(BadSample) as info:
        open_rgb(data)
    assert info.value.reason == reason and "\n" not in str(info.value)


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32 - 1)  # just over the limit: PIL only warns here
    with pytest.raises(BadSample, match="exceeds limit") as info:
        open_rgb(GOOD_PNG)
    assert info.value.reason == "image_too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over twice the limit: PIL raises
    with pytest.raises(BadSample) as info:
        open_rgb(GOOD_PNG)
    assert info.value.reason == "image_too_large"


def test_image_file_values(tmp_path):
    (tmp_path / "a.png").write_bytes(GOOD_PNG)
    assert read_image_file(str(tmp_path / "a.png")) == GOOD_PNG
    assert read_image_file({"bytes": b"x", "path": "ignored"}) == b"x"
    assert read_image_file({"bytes": None, "path": str(tmp_path / "a.png")}) == GOOD_PNG
    with pytest.raises(BadSample) as info:
        read_image_file(str(tmp_path / "gone.png"))
    assert info.value.reason == "missing_file" and "gone.png" in str(info.value)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_batched_pixel_values_equal_the_image_processor(kind):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    from mmalign.models.encoders import batched_pixel_values

    processor = (CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
                 if kind == "clip" else SiglipImageProcessor(size={"height": 32, "width": 32}))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),  # already the output size
              Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)),  # resized, then cropped
              Image.fromarray(rng.integers(0, 256, (70, 40), dtype=np.uint8)),  # grayscale
              Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA")]
    fast = batched_pixel_values(processor, images)
    assert fast is not None, "the fast path should cover the PIL-backend CLIP/SigLIP processors"
    ref = processor(images, return_tensors="pt")["pixel_values"]
    assert fast.shape == ref.shape == (4, 3, 32, 32)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0)
