"""Decoding real-world files: every mode to RGB, orientation, junk, broken files, decompression bombs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_classifier.images import (
    ImageError,
    is_candidate,
    list_image_files,
    load_array,
    open_image,
    resize_square,
)


def save(image: Image.Image, path: Path, fmt: str, **kwargs) -> Path:
    image.save(path, fmt, **kwargs)
    return path


def test_png_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 10, 30, 30))
    image = open_image(save(rgba, tmp_path / "a.png", "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((20, 20)) == (0, 0, 255)


def test_palette_with_transparency_and_grayscale(tmp_path):
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.info["transparency"] = 0
    palette.paste(0, (0, 0, 10, 20))
    image = open_image(save(palette, tmp_path / "p.png", "PNG", transparency=0))
    assert image.getpixel((2, 2)) == (255, 255, 255)
    assert image.getpixel((15, 5)) == (10, 200, 10)
    gray = open_image(save(Image.new("L", (10, 10), 77), tmp_path / "g.jpg", "JPEG"))
    assert gray.mode == "RGB" and abs(gray.getpixel((5, 5))[0] - 77) <= 2


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (30, 30), (0, 255, 255, 0))  # pure red in CMYK
    red, green, blue = open_image(save(cmyk, tmp_path / "c.jpg", "JPEG")).getpixel((15, 15))
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.full((16, 16), 32768, dtype=np.uint16)
    values[:, 8:] = 65535
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = open_image(path)
    assert image.getpixel((2, 2))[0] == 128
    assert image.getpixel((12, 2))[0] == 255


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    red, _, blue = open_image(path).getpixel((10, 10))
    assert red > 200 and blue < 50


def test_exif_orientation_is_applied(tmp_path):
    wide = Image.new("RGB", (80, 40), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 40, 40))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = open_image(save(wide, tmp_path / "rotated.jpg", "JPEG", exif=exif))
    assert image.size == (40, 80)
    assert sum(image.getpixel((20, 10))) > 600  # the white half is now on top
    assert sum(image.getpixel((20, 70))) < 100


@pytest.mark.parametrize("fmt", ["BMP", "WEBP", "TIFF", "PNG", "GIF"])
def test_format_is_read_whatever_the_extension(tmp_path, fmt):
    path = save(Image.new("RGB", (24, 24), (10, 120, 240)), tmp_path / "photo.jpg", fmt)
    array = load_array(path, 16, "squash")
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8
    assert abs(int(array[8, 8, 2]) - 240) < 20


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    path = save(Image.new("RGB", (1600, 1200), (90, 90, 90)), tmp_path / "big.jpg", "JPEG")
    image = open_image(path, draft_size=160)
    assert image.size == (200, 150) or min(image.size) >= 160
    assert image.size[0] < 1600


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "HTML"),
        (b"just some notes\n", "not an image"),
        (b'{"error": "rate limited"}', "JSON"),
    ],
)
def test_non_images_are_refused_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        open_image(path)


def test_truncated_jpeg_is_refused(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_array(path, 32, "crop")


def test_decompression_bomb_is_refused(tmp_path):
    path = save(Image.new("1", (10_000, 9_000)), tmp_path / "bomb.png", "PNG")
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match="too many pixels"):
        open_image(path)


def test_resize_modes():
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 50, 100))  # a blue band on the left quarter
    squash = np.asarray(resize_square(wide, 50, "squash"))
    crop = np.asarray(resize_square(wide, 50, "crop"))
    pad = np.asarray(resize_square(wide, 50, "pad"))
    assert squash.shape == crop.shape == pad.shape == (50, 50, 3)
    assert squash[25, 2, 2] > 200  # the band is kept, squeezed
    assert crop[25, 2, 0] > 200 and crop[25, 2, 2] < 50  # the centre crop cuts the band off
    assert pad[2, 25].sum() == 0 and pad[25, 25, 0] > 200  # black bars above and below


def test_perceptual_hash_is_close_for_copies_and_far_for_other_photos():
    from conftest import synthetic_photo

    from image_classifier.images import perceptual_hash

    photo = synthetic_photo(0, 1, size=(120, 90))
    smaller = np.asarray(Image.fromarray(photo).resize((60, 45)).resize((120, 90)))
    other = synthetic_photo(1, 2, size=(120, 90))

    def bits(a: str, b: str) -> int:
        return bin(int(a, 16) ^ int(b, 16)).count("1")

    assert len(perceptual_hash(photo)) == 16
    assert bits(perceptual_hash(photo), perceptual_hash(smaller)) <= 4
    assert bits(perceptual_hash(photo), perceptual_hash(other)) > 12


def test_hidden_and_junk_files_are_ignored(tmp_path):
    for name in ("a.jpg", ".DS_Store", "Thumbs.db", ".hidden.jpg", "desktop.ini"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "b.jpg").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.png").write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)] == ["a.jpg", "sub/c.png"]
    assert not is_candidate(Path("x/.DS_Store"))
