"""Reading any image the paper's way: one function from a file (or PIL image) to the stored
S x S uint8 picture, shared by `alexnet prepare` and `alexnet.data.preprocess`, so that a
prediction sees exactly the pixels training saw.

Sec. 2 of the paper: "we down-sampled the images to a fixed resolution of 256 x 256: given a
rectangular image, we first rescaled the image such that the shorter side was of length 256, and
then cropped out the central 256 x 256 patch". The paper does not name the interpolation; we use
bilinear (antialiased when shrinking, Pillow's behaviour), as torchvision's Resize does.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from alexnet.errors import BadInput

RESAMPLE = Image.Resampling.BILINEAR


class UnreadableImage(BadInput):
    """A file that is not a readable image (corrupt, truncated, not an image at all)."""


def open_image(source, size: int | None = None) -> Image.Image:
    """A fully decoded PIL image from a path, bytes or PIL image; UnreadableImage otherwise.

    `size`, when given, lets JPEG decoding shrink by 1/2, 1/4 or 1/8 in the DCT domain while both
    sides stay >= size (Pillow's draft mode); the later rescale to `size` then starts from fewer
    pixels. This is what makes preparing a 1.28M-image set take minutes rather than hours."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):  # an array source (Fashion-MNIST, CIFAR-10)
        return Image.fromarray(source)
    in_memory = isinstance(source, bytes | bytearray)
    prefix = "" if in_memory else f"{source}: "  # the caller names in-memory sources
    try:
        fp = io.BytesIO(source) if in_memory else open(source, "rb")
    except OSError as e:
        raise UnreadableImage(f"{prefix}cannot open ({e.strerror or e})") from None
    try:
        with fp:
            img = Image.open(fp)
            if size is not None and img.format == "JPEG":
                img.draft(img.mode, (size, size))
            img.load()  # decode now, inside the try: truncated files fail here
            return img
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"{prefix}{e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.UnidentifiedImageError) as e:
        msg = str(e).split("\n")[0] or type(e).__name__
        if isinstance(e, Image.UnidentifiedImageError):
            msg = "not an image file Pillow can read"
        if not in_memory and isinstance(e, OSError) and e.filename:
            msg = e.strerror or msg
        raise UnreadableImage(f"{prefix}{msg}") from None


def _sixteen_bit_to_uint8(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer grey (modes I;16*, I) and float grey (F) to 8-bit grey by
    scaling the full range, not by clipping (Pillow's convert("L") clips at 255)."""
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float64)
        peak = 1.0 if np.nanmax(a, initial=0.0) <= 1.0 else 255.0
        a = np.nan_to_num(a) * (255.0 / peak)
    else:
        a = a.astype(np.float64)
        if a.max(initial=0) > 255:  # 16-bit data: 65535 maps to 255
            a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, gray: bool = False) -> Image.Image:
    """EXIF orientation applied, then RGB (or L with gray=True): grey replicated, alpha dropped,
    palette expanded, CMYK/YCbCr/LAB converted, 16-bit scaled to 8 bits."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block: the pixels are still fine, keep them as stored
        pass
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _sixteen_bit_to_uint8(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns when dropping palette transparency directly
    target = "L" if gray else "RGB"
    if img.mode != target:
        img = img.convert(target)  # RGBA/LA: alpha dropped; L: grey replicated; CMYK converted
    return img


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Sec. 2: shorter side rescaled to `size`, then the central size x size patch.

    Done as one resample of the central square of the source (Pillow's `box`): the same
    pixels as rescaling the whole image and then cropping, with the crop exactly centred
    (no rounding of the offset), and about a third faster."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    short = min(w, h)
    left, top = (w - short) / 2, (h - short) / 2
    return img.resize((size, size), RESAMPLE, box=(left, top, left + short, top + short))


def paper_image(source, size: int = 256, gray: bool = False) -> np.ndarray:
    """The stored picture of any image source: uint8 (size, size, 3), or (size, size) if gray."""
    img = open_image(source, size)
    try:
        img = resize_center_crop(to_rgb(img, gray), size)
        return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError) as e:  # e.g. an unusual mode Pillow cannot convert
        raise UnreadableImage(f"cannot convert to RGB ({e})") from None


def is_hidden(path: str | Path) -> bool:
    return Path(path).name.startswith(".")
