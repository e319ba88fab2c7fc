"""Images a request may carry: local paths, data URLs, raw bytes or PIL images; errors a user can act on."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import RequestError

if TYPE_CHECKING:
    from PIL import Image

ImageSource = Any  # str (path or data URL) | Path | bytes | PIL.Image.Image


def _open_bytes(data: bytes, what: str) -> "Image.Image":
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError as exc:
        raise RequestError(f"{what} is not an image format kiln can read (PNG, JPEG, WebP, GIF, BMP...)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(f"{what} is a corrupt or truncated image: {exc}") from exc
    return image


def _from_data_url(url: str) -> "Image.Image":
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or ";base64" not in header:
        raise RequestError("an image data URL must look like data:image/<type>;base64,<data>")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError("the image data URL does not hold valid base64") from exc
    return _open_bytes(data, "the image data URL")


def load_image(source: ImageSource) -> "Image.Image":
    """An RGB PIL image from a path, a data URL, bytes or a PIL image."""
    from PIL import Image

    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray)):
        image = _open_bytes(bytes(source), "the image bytes")
    elif isinstance(source, str) and source.startswith("data:"):
        image = _from_data_url(source)
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        raise RequestError(f"image {source[:60]!r}: kiln does not download images here; give a local path or data URL")
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise RequestError(f"image file {path} does not exist")
        image = _open_bytes(path.read_bytes(), f"image file {path}")
    else:
        raise RequestError(f"an image must be a path, a data URL, bytes or a PIL image, got {type(source).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_digest(image: "Image.Image") -> str:
    """A content hash of the decoded pixels (the same picture from a file or a data URL hashes the same)."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:32]
