"""Reading uploaded images safely: bounded bodies, bounded pixels, one clear error per bad input.

Everything a client sends is hostile until decoded: a body may be endless, a 40 kB PNG may claim
40,000 × 40,000 pixels (a decompression bomb: 4.8 GB once decoded), a file may be cut short or be
no image at all. Each of those becomes a :class:`BadInput` carrying an HTTP status and a code the
server turns into a 4xx JSON answer; nothing here can take the server down.

- The body size is checked against the declared ``Content-Length`` first, and counted again while
  it streams in (chunked uploads declare nothing), so an oversized upload is refused before it is
  in memory. The bytes a refused client still sends are discarded by uvicorn, not stored.
- Pixels are counted from the image header, before anything is decoded; PIL's own bomb check
  (``Image.DecompressionBombError``) is caught as well.
- Only common raster formats are opened: PIL can also open EPS by running Ghostscript, which no
  web upload should be able to trigger.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

# Phone photos in MPO (multi-picture JPEG) open through the JPEG plugin.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "ICO")


@dataclass(frozen=True)
class Limits:
    """What one request may send: bytes in the body, images in it, pixels per image, read time."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_images: int = 32
    max_pixels: int = 40_000_000  # 40 MP: a large phone photo; 120 MB once decoded to RGB
    read_timeout_s: float = 30.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BadInput(Exception):
    """A request the server refuses: ``status`` (4xx), a short ``code`` and a sentence for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.3g} MB"


def check_declared_size(content_length: str | None, limits: Limits) -> None:
    """Refuse at once a body whose ``Content-Length`` is over the limit (nothing read yet)."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limits.max_upload_bytes:
        raise BadInput(413, "upload_too_large",
                       f"the upload is {_mb(int(content_length))}, over the server's limit of "
                       f"{_mb(limits.max_upload_bytes)} (--max-upload-mb); send fewer or smaller images")


async def bounded(stream: AsyncIterator[bytes], limits: Limits) -> AsyncIterator[bytes]:
    """Pass the body's chunks through, raising 413 as soon as their total passes the limit."""
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limits.max_upload_bytes:
            raise BadInput(413, "upload_too_large",
                           f"the upload passed the server's limit of {_mb(limits.max_upload_bytes)} "
                           f"(--max-upload-mb) while being read; send fewer or smaller images")
        yield chunk


async def read_images(request: Any, limits: Limits) -> list[tuple[str, bytes]]:
    """The uploaded files of a Starlette request as ``(name, bytes)``, within ``limits``.

    ``multipart/form-data`` gives every file part (field names do not matter, order is kept);
    any other body is one image. Raises :class:`BadInput` (400, 408 or 413) and lets Starlette's
    ``ClientDisconnect`` through when the client goes away mid-upload.
    """
    check_declared_size(request.headers.get("content-length"), limits)
    try:
        return await asyncio.wait_for(_read(request, limits), limits.read_timeout_s)
    except asyncio.TimeoutError:
        raise BadInput(408, "upload_too_slow",
                       f"the upload was not complete after {limits.read_timeout_s:g} s") from None


async def _read(request: Any, limits: Limits) -> list[tuple[str, bytes]]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    body = bounded(request.stream(), limits)
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("application/x-www-form-urlencoded"):
        raise BadInput(415, "not_an_image", "the body is a form without files (application/x-www-form-urlencoded);"
                                            " send the image as the raw body or as multipart/form-data file parts")
    if not ctype.startswith("multipart/form-data"):
        return [("body", b"".join([chunk async for chunk in body]))]
    parser = MultiPartParser(request.headers, body, max_files=limits.max_images, max_fields=16,
                             max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if str(e).startswith("Too many files"):  # the parser stops at the first file over the limit
            raise BadInput(413, "too_many_images", f"more than {limits.max_images} images in one request "
                                                   f"(--max-images); send them in several requests") from None
        raise BadInput(400, "bad_multipart", f"the multipart body could not be read: {e}") from None
    try:
        files = [(f.filename or key, await f.read()) for key, f in form.multi_items() if isinstance(f, UploadFile)]
    finally:
        await form.close()
    if not files:
        raise BadInput(400, "no_image", "the multipart body holds no file; send images as file parts "
                                        "(curl -F file=@photo.jpg)")
    return files


def decode_image(data: bytes, name: str, limits: Limits) -> Any:
    """Decode one uploaded file to an 8-bit RGB PIL image (EXIF orientation applied), safely.

    Raises :class:`BadInput`: 400 for an empty file, 415 for something that is not an image,
    413 for too many pixels, 422 for a truncated or corrupt image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError  # here: `headstart --help` needs no PIL

    from ..data import to_rgb  # headstart's one conversion of every PIL mode to RGB

    if not data:
        raise BadInput(400, "empty_file", f"{name} is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise _too_many_pixels(name, str(e)) from None
    except UnidentifiedImageError:
        raise BadInput(415, "not_an_image", f"{name} is not an image in a format this server reads "
                                            f"({', '.join(FORMATS)})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for malformed headers
        raise _corrupt(name, e) from None
    with im:
        w, h = im.size
        if w * h > limits.max_pixels:
            raise _too_many_pixels(name, f"{w}x{h} = {w * h:,} pixels, over the server's limit of "
                                         f"{limits.max_pixels:,} (--max-pixels)")
        try:
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
        except Image.DecompressionBombError as e:
            raise _too_many_pixels(name, str(e)) from None
        except Exception as e:  # noqa: BLE001 - truncated data shows up as OSError, EOFError, SyntaxError...
            raise _corrupt(name, e) from None


def _too_many_pixels(name: str, why: str) -> BadInput:
    return BadInput(413, "too_many_pixels", f"{name} is too large to decode: {why}")


def _corrupt(name: str, e: Exception) -> BadInput:
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return BadInput(422, "corrupt_image", f"{name} could not be decoded ({reason}): truncated or corrupt file")


__all__ = ["FORMATS", "BadInput", "Limits", "bounded", "check_declared_size", "decode_image", "read_images"]
