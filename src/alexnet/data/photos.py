"""A small folder of real photos in ImageFolder form, for the own-photos path's tests and its
measurements (docs/finetune-photos.md), made offline from the photographs that scikit-image's
wheel ships.

Each class is one photograph of a material (brick, grass, gravel: 512x512 grey photos) and its
images are crops of it at random places and sizes. The training crops come from the top three
quarters of the photo and the held-out ones from the bottom quarter, so no held-out pixel was
ever seen in training: the classes must be told apart by texture, not by memorised pixels.
The crops are saved as JPEG (what a user's camera gives) in `ROOT/train/<class>/` and
`ROOT/val/<class>/`, which `alexnet prepare ROOT OUT` reads as one ImageFolder tree with its
own `val/` split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from alexnet.errors import BadInput

CLASSES = ("brick", "grass", "gravel")  # skimage.data's 512x512 photographs of materials
SPLIT_ROW = 384  # training crops above this row, held-out crops below it
MIN_SIDE, MAX_SIDE = 64, 128  # crop sides in pixels: prepare scales each to 256 (Sec. 2)


def _photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError:
        raise BadInput(
            "the sample photos come from scikit-image: pip install 'alexnet[bench]'"
        ) from None
    return np.asarray(getattr(skimage.data, name)())


def _crops(photo: np.ndarray, rows: tuple[int, int], n: int, rng) -> list[Image.Image]:
    out = []
    top, bottom = rows
    for _ in range(n):
        side = int(rng.integers(MIN_SIDE, min(MAX_SIDE, bottom - top) + 1))
        y = int(rng.integers(top, bottom - side + 1))
        x = int(rng.integers(0, photo.shape[1] - side + 1))
        out.append(Image.fromarray(photo[y : y + side, x : x + side]).convert("RGB"))
    return out


def make_photo_folder(
    root: str | Path,
    per_class: int = 60,
    val_per_class: int = 20,
    classes: tuple[str, ...] = CLASSES,
    seed: int = 0,
) -> Path:
    """Write per_class training and val_per_class held-out JPEG crops of each class's photo
    under root/train/<class>/ and root/val/<class>/; returns root. Deterministic in seed."""
    if per_class < 1 or val_per_class < 1:
        raise ValueError("per_class and val_per_class must be at least 1")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for name in classes:
        photo = _photo(name)
        for split, rows, n in (
            ("train", (0, SPLIT_ROW), per_class),
            ("val", (SPLIT_ROW, photo.shape[0]), val_per_class),
        ):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(_crops(photo, rows, n, rng)):
                im.save(folder / f"{name}-{i:04d}.jpg", quality=90)
    return root
