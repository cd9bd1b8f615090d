"""Reading real-world image files into clean RGB arrays, or a clear reason why not.

Every stage that opens a photo (gather, preprocess, predict) goes through here, so a file that one stage
accepts is accepted by all of them. Source files are only ever read.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps

ResizeMode = Literal["squash", "crop", "pad"]
RESIZE_MODES: tuple[str, ...] = ("squash", "crop", "pad")

MAX_PIXELS = 89_478_485
"""Images above this many pixels are refused (Pillow's own decompression-bomb limit)."""

JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store", "icon\r"})
JUNK_DIRS = frozenset({"__macosx", ".git", ".ipynb_checkpoints"})


NOT_AN_IMAGE = "not an image"
"""How every refusal of a file that is something else begins: `not an image: <what it is>`."""
HTML_PAGE = "an HTML page"
"""What a web page saved or served in place of a photo is called, here and in gather's download checks."""


class ImageError(Exception):
    """A file that cannot be used as an image; the message is the reason shown to the user."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def is_candidate(path: Path) -> bool:
    """Whether a file in a category folder should be looked at (hidden and OS junk files are not)."""
    name = path.name
    return not name.startswith(".") and name.lower() not in JUNK_NAMES


def list_image_files(folder: Path) -> list[Path]:
    """Candidate files below `folder`, recursively, in a stable order."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") or part.lower() in JUNK_DIRS for part in relative[:-1]):
            continue
        if path.is_file() and is_candidate(path):
            found.append(path)
    return found


def _sniff_non_image(head: bytes) -> str | None:
    """A reason when the first bytes show the file is plainly not an image."""
    if not head:
        return "empty file (0 bytes)"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:512]:
        return f"{NOT_AN_IMAGE}: {HTML_PAGE}"
    if text.startswith((b"<?xml", b"<svg")) and b"<svg" in text[:1024]:
        return f"{NOT_AN_IMAGE}: SVG vector graphics are not supported, convert it to PNG"
    if text.startswith((b"{", b"[")):
        return f"{NOT_AN_IMAGE}: JSON text"
    return None


def open_image(source: Path | bytes | BinaryIO, draft_size: int | None = None) -> Image.Image:
    """Open and fully decode the first frame, upright (EXIF orientation applied), in RGB.

    `draft_size` lets JPEGs much larger than the target decode at 1/2, 1/4 or 1/8 scale, which is
    several times faster; the result is still at least `draft_size` pixels on each side.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        if isinstance(source, Path):
            with open(source, "rb") as handle:
                head = handle.read(2048)
        else:
            head = source.read(2048)
            source.seek(0)
    except OSError as error:
        raise ImageError(f"cannot read file: {error.strerror or error}") from None
    reason = _sniff_non_image(head)
    if reason:
        raise ImageError(reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except Image.DecompressionBombError:
            raise ImageError(
                f"too many pixels (over {MAX_PIXELS:,}): refused as a possible decompression bomb"
            ) from None
        except Image.UnidentifiedImageError:
            raise ImageError(f"{NOT_AN_IMAGE}: unrecognised file format") from None
        except OSError as error:
            raise ImageError(f"cannot read file: {error}") from None
        try:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(
                    f"too many pixels ({width}x{height}, over {MAX_PIXELS:,}): "
                    "refused as a possible decompression bomb"
                )
            if width < 1 or height < 1:
                raise ImageError("image has no pixels")
            if draft_size and image.format == "JPEG":
                image.draft(None, (draft_size, draft_size))
            image.load()
            if image.format != "JPEG" or "exif" in image.info:  # a JPEG without EXIF has no orientation
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
        except ImageError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageError(f"truncated or corrupt image data ({image.format}): {error}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency over white, 16-bit and float scaled, CMYK converted."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = values.max() if values.size else 0
        scale = 255.0 / 65535.0 if top > 255 else 1.0
        gray = np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_square(image: Image.Image, size: int, mode: ResizeMode) -> Image.Image:
    """Make a `size` x `size` image: stretch (squash), centre-crop (crop) or letterbox in black (pad)."""
    width, height = image.size
    resample = Image.Resampling.BILINEAR
    if mode == "squash":
        return image.resize((size, size), resample)
    if mode == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.resize((size, size), resample, box=(left, top, left + side, top + side))
    if mode == "pad":
        scale = size / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", (size, size))
        canvas.paste(image.resize(inner, resample), ((size - inner[0]) // 2, (size - inner[1]) // 2))
        return canvas
    raise ValueError(f"unknown resize mode {mode!r}; choose from {', '.join(RESIZE_MODES)}")


def _dct_rows(count: int, size: int) -> np.ndarray:
    """The first `count` rows of an unnormalised DCT-II matrix (scipy.fftpack.dct's convention)."""
    k = np.arange(count)[:, None]
    n = np.arange(size)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * size))


_PHASH_DCT = _dct_rows(8, 32)


def perceptual_hash(array: np.ndarray) -> str:
    """64-bit pHash as 16 hex digits: the same bits as imagehash.phash, at a tenth of the cost.

    Grayscale at 32x32 (Lanczos), 2-D DCT, the 8x8 lowest frequencies compared with their median.
    Resized or re-compressed copies of a photo land a few bits apart; different photos about 32.
    """
    gray = Image.fromarray(array).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    low = _PHASH_DCT @ np.asarray(gray, dtype=np.float64) @ _PHASH_DCT.T
    bits = (low > np.median(low)).ravel()
    return f"{int(''.join('1' if bit else '0' for bit in bits), 2):016x}"


def load_array(source: Path | bytes | BinaryIO, size: int, mode: ResizeMode) -> np.ndarray:
    """A file as a `size` x `size` x 3 uint8 array, or ImageError with the reason."""
    image = open_image(source, draft_size=size)
    return np.asarray(resize_square(image, size, mode), dtype=np.uint8)


def inspect(source: Path | bytes | BinaryIO) -> ImageInfo:
    """Decode fully (so truncated files fail here) and report format and upright size."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            fmt = Image.open(source).format or "unknown"
        except Exception:  # the precise reason comes from open_image below
            fmt = "unknown"
    if not isinstance(source, Path):
        source.seek(0)
    image = open_image(source)
    return ImageInfo(format=fmt, width=image.width, height=image.height)
