"""Image files in, 8-bit RGB PIL images out: the bottom of the data layer.

:func:`load_image` reads any file PIL can decode and converts it (:func:`to_rgb`) the same way
wherever images enter headstart: folders, ``predict`` and the in-memory copy.
:func:`image_problem` says whether a file decodes at all, by decoding it fully once, so that a
truncated file is found when a folder is scanned and not later inside a loader worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from headstart.errors import HeadstartError

#: File extensions (lower case) treated as images when scanning folders.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def load_image(path: str | Path) -> Image.Image:
    """Read any image file as an 8-bit RGB PIL image, EXIF orientation applied.

    Grayscale, palette, 1-bit, CMYK and 16/32-bit images are converted rather than rejected;
    transparent pixels are composited on white. Raises :class:`HeadstartError` when the file is
    missing or cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except FileNotFoundError:
        raise HeadstartError(f"image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise HeadstartError(
            f"cannot read image {path}: {e}. Re-export it as JPEG or PNG, or remove it."
        ) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (see :func:`load_image`)."""
    if im.mode.startswith("I") or im.mode == "F":
        # PIL's convert("RGB") clips wide integers to 255, turning 16-bit images white:
        # scale by the bit depth instead.
        return Image.fromarray(_wide_to_uint8(np.asarray(im), im.mode), "L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        # Transparent pixels usually hold black or junk colour; white is what viewers show.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, P, 1, CMYK, YCbCr, LAB, HSV and RGB: PIL's own conversion is right for these.
    return im.convert("RGB")


def _wide_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float grayscale array to 0–255."""
    if mode == "F":
        a = a.astype(np.float64)
        # Floats are usually 0–1 (scientific exports); otherwise assume they are already 0–255.
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(a * scale), 0, 255).round().astype(np.uint8)
    if mode.startswith("I;16"):
        top = 65535.0
    else:
        # Mode "I" is a 32-bit container, often holding 16-bit (or 8-bit) data: take the
        # smallest bit depth that holds the largest value.
        peak = int(a.max()) if a.size else 0
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else float(2**32 - 1)
    return np.clip(a.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)


def is_image_name(p: Path) -> bool:
    """True for a name with an image extension that is not a dot file.

    Dot files include macOS ``._name.jpg`` resource forks, which are not images.
    """
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def image_problem(path: str | Path) -> str | None:
    """None when ``path`` decodes as an image, else why not (one line).

    ``Image.verify()`` reads headers and chunk checksums only, and passes a JPEG cut off in the
    middle of its data; only decoding finds that. JPEGs are decoded in draft mode (libjpeg's
    1/8-scale IDCT), which still reads every byte of the compressed data, at a fraction of the
    cost of a full-size decode; other formats are decoded in full.
    """
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft(im.mode, (1, 1))
            im.load()
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; all mean "unreadable"
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header, EXIF rotation applied."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees on load
            w, h = h, w
        return w, h
