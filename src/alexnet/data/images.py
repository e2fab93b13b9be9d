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
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from alexnet.errors import BadInput
from alexnet.fileio import MAX_FILE_BYTES, read_regular_file

RESAMPLE = Image.Resampling.BILINEAR
# The most pixels one image may have (`alexnet prepare --max-pixels`): Pillow's own
# decompression-bomb limit (89,478,485, about 9459 x 9459). A worker holds the decoded picture
# and an 8-bit copy, so 16 workers stay within a few GB whatever the files claim to be.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


class UnreadableImage(BadInput):
    """A file that is not a readable image (corrupt, truncated, not an image at all)."""


def open_image(
    source,
    size: int | None = None,
    max_pixels: int | None = MAX_PIXELS,
    max_bytes: int | None = MAX_FILE_BYTES,
) -> Image.Image:
    """A fully decoded PIL image from a path, bytes or PIL image; UnreadableImage otherwise.

    `size`, when given, lets JPEG decoding shrink by 1/2, 1/4 or 1/8 in the DCT domain while both
    sides stay >= size (Pillow's draft mode); the later rescale to `size` then starts from fewer
    pixels. This is what makes preparing a 1.28M-image set take minutes rather than hours.
    A path must be a regular file of at most `max_bytes` (a FIFO would block, a huge file fill
    the memory); an image of more than `max_pixels` pixels (after draft mode) is refused before
    it is decoded."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):  # an array source (Fashion-MNIST, CIFAR-10)
        return Image.fromarray(source)
    in_memory = isinstance(source, bytes | bytearray)
    prefix = "" if in_memory else f"{source}: "  # the caller names in-memory sources
    if not in_memory:
        try:
            source = read_regular_file(source, max_bytes)
        except OSError as e:
            raise UnreadableImage(f"{prefix}cannot open ({e.strerror or e})") from None
    try:
        with io.BytesIO(source) as fp, warnings.catch_warnings():
            # Pillow warns between its limit and twice it; max_pixels decides (below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
            if size is not None and img.format == "JPEG":
                img.draft(img.mode, (size, size))
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise UnreadableImage(
                    f"{prefix}{w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                    "pixels per image"
                )
            img.load()  # decode now, inside the try: truncated files fail here
            return img
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"{prefix}{e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.UnidentifiedImageError) as e:
        if isinstance(e, UnreadableImage):
            raise
        msg = str(e).split("\n")[0] or type(e).__name__
        if isinstance(e, Image.UnidentifiedImageError):
            msg = "not an image file Pillow can read"
        raise UnreadableImage(f"{prefix}{msg}") from None


_ROWS = 256  # rows converted at a time: temporaries of a few MB, whatever the image's size


def _strips(img: Image.Image):
    """The picture as numpy arrays of _ROWS rows each: np.asarray of the whole would copy it
    (twice over, through Image.tobytes)."""
    w, h = img.size
    for r in range(0, h, _ROWS):
        yield r, np.asarray(img.crop((0, r, w, min(h, r + _ROWS))))


def _gray_to_uint8(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer grey (modes I;16*, I) and float grey (F) to 8-bit L by scaling
    the full range, not by clipping (Pillow's convert("L") clips at 255): 16-bit data maps 65535
    to 255 (round(v / 257), in integers), floats in [0, 1] map 1 to 255. A strip of rows at a
    time into one uint8 array: a 9000 x 9000 16-bit picture needs 81 MB beside itself, where a
    float64 conversion of the whole needed gigabytes."""
    is_float = img.mode == "F"
    top = max((np.nanmax(a, initial=0) for _, a in _strips(img)), default=0)
    out = np.empty((img.height, img.width), np.uint8)
    for r, a in _strips(img):
        if is_float:
            b = np.rint(np.nan_to_num(a.astype(np.float64)) * (255.0 if top <= 1.0 else 1.0))
        else:
            b = np.clip(a, 0, None).astype(np.int64)
            if top > 255:  # 16-bit data (else 8-bit values in a wider type)
                b = (b + 128) // 257  # = round(v / 257): v / 257 is never exactly k + 1/2
        np.clip(b, 0, 255, out=out[r : r + len(a)], casting="unsafe")
    return Image.fromarray(out, mode="L")


_GREY_MODES = ("1", "L", "LA", "La", "I", "F")


def to_8bit(img: Image.Image, gray: bool = False, in_place: bool = False) -> Image.Image:
    """EXIF orientation applied, then 8 bits per channel: RGB, or L for a grey picture (and
    always with gray=True). Alpha dropped, palette expanded, CMYK/YCbCr/LAB converted, 16-bit
    scaled to 8 bits. Grey stays one channel: replicating it into RGB commutes with the rescale,
    so paper_image replicates after rescaling, on S x S pixels instead of the whole picture.
    `in_place`: the orientation may be applied to `img` itself (no copy of the picture)."""
    try:
        if in_place:
            ImageOps.exif_transpose(img, in_place=True)
        else:
            img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block: the pixels are still fine, keep them as stored
        pass
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _gray_to_uint8(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns when dropping palette transparency directly
    target = "L" if gray or img.mode in _GREY_MODES else "RGB"
    if img.mode != target:
        img = img.convert(target)  # RGBA/LA: alpha dropped; CMYK converted; 1 to 0/255
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


def paper_image(
    source,
    size: int = 256,
    gray: bool = False,
    max_pixels: int | None = MAX_PIXELS,
    max_bytes: int | None = MAX_FILE_BYTES,
) -> np.ndarray:
    """The stored picture of any image source: uint8 (size, size, 3), or (size, size) if gray.
    UnreadableImage for a file that is not an image, or over the limits (see open_image)."""
    img = open_image(source, size, max_pixels, max_bytes)
    try:
        # The decoded picture is ours (unless a PIL image was given): orient it in place, and
        # let it go once converted.
        img = to_8bit(img, gray, in_place=not isinstance(source, Image.Image))
        img = resize_center_crop(img, size)
        if not gray and img.mode == "L":
            img = img.convert("RGB")  # grey replicated
        return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError) as e:  # e.g. an unusual mode Pillow cannot convert
        raise UnreadableImage(f"cannot convert to RGB ({e})") from None


def is_hidden(path: str | Path) -> bool:
    return Path(path).name.startswith(".")
