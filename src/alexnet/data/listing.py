"""What every image source lists: the items of each split in store order, their labels, and
how one item is read (`Source`, `Split`), plus the folder-tree helpers the sources share."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet.errors import BadInput
from alexnet.fileio import MAX_FILE_BYTES, read_regular_file

VAL_NAMES = ("val", "validation", "valid")


@dataclass
class Split:
    refs: list  # one reference per item, understood by Source.read
    labels: np.ndarray  # int64


@dataclass
class Source:
    kind: str
    root: Path
    classes: list[str]
    class_names: list[str]
    splits: dict[str, Split]
    gray: bool = False  # every image is grey: the store keeps one channel
    description: str = ""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # for array sources
    files: list[str] = field(default_factory=list)  # source files whose checksum to record
    max_file_bytes: int | None = MAX_FILE_BYTES  # a larger file is not read (not an image)

    def read(self, ref) -> tuple[object, str, bytes | None]:
        """(image source for images.paper_image, a name for reports, the raw bytes or None).
        OSError for a file that is not a regular file (a FIFO, a device: never opened in a way
        that blocks) or larger than max_file_bytes (never read)."""
        if self.kind in ("fashion-mnist", "cifar10"):
            array, i = ref
            img = self.arrays[array][i]
            return img, f"{array}[{i}]", img.tobytes()
        if isinstance(ref, tuple):  # (tar file, offset, size, member name)
            tar, offset, size, member = ref
            if self.max_file_bytes is not None and size > self.max_file_bytes:
                raise OSError(errno.EFBIG, f"{size / 2**20:.1f} MiB, over the limit for one image")
            with open(self.root / tar, "rb") as f:
                f.seek(offset)
                data = f.read(size)
            return data, f"{tar}:{member}", data
        data = read_regular_file(self.root / ref, self.max_file_bytes)
        return data, ref, data

    def listing_digest(self) -> str:
        """sha256 of what is listed: split, item, label (not the contents)."""
        h = hashlib.sha256()
        for name, split in self.splits.items():
            for ref, label in zip(split.refs, split.labels.tolist(), strict=True):
                h.update(f"{name}\t{ref}\t{label}\n".encode())
        return h.hexdigest()


# --- helpers -----------------------------------------------------------------------------------


def image_files(folder: Path) -> list[str]:
    """Every non-hidden regular file under `folder`, recursively (as ImageFolder), sorted, as
    paths relative to `folder`. Non-image files are kept: prepare skips and reports them."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder)
        for fn in filenames:
            if not fn.startswith("."):
                out.append(str(rel / fn) if str(rel) != "." else fn)
    return sorted(out)


# The photo formats prediction looks for in a folder: Pillow also registers names of formats that
# are not photos (".h5", ".grib", ".mpeg": stubs that need a handler) or that it cannot decode
# without outside programs (".eps").
PHOTO_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .webp .avif .bmp .dib .gif .tif .tiff .ppm .pgm .pbm .pnm "
    ".tga .jp2 .j2k .jpx .ico .pcx".split()
)


def readable_image_suffixes() -> frozenset[str]:
    """PHOTO_SUFFIXES that this Pillow opens (".webp" or ".avif" only where it was built with
    them), lower case."""
    Image.init()  # registers every plugin's extensions
    opens = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return PHOTO_SUFFIXES & opens


def image_paths(folder: Path) -> list[Path]:
    """The images under `folder` for prediction: image_files (recursive, hidden files and
    folders skipped, sorted: the same order on every machine), keeping only photo formats
    Pillow opens (a README or a notes.txt beside the photos is not an image)."""
    suffixes = readable_image_suffixes()
    return [folder / f for f in image_files(folder) if Path(f).suffix.lower() in suffixes]


def subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def class_tree(folder: Path, classes: list[str] | None = None) -> tuple[list[str], Split]:
    """An ImageFolder tree: one subfolder per class. Empty class folders are errors."""
    found = subdirs(folder)
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise BadInput(
                f"{folder} has class folders that the training split lacks: {', '.join(extra[:5])}"
            )
    refs, labels = [], []
    for k, c in enumerate(classes):
        if c not in found:
            continue
        files = image_files(folder / c)
        if not files:
            raise BadInput(f"class folder {folder / c} is empty: remove it or add its images")
        base = folder.name + "/" + c
        refs += [f"{base}/{f}" for f in files]
        labels += [k] * len(files)
    return classes, Split(refs, np.asarray(labels, dtype=np.int64))


def _rel(split: Split, prefix: str) -> Split:
    return Split([f"{prefix}/{r}" if prefix else r for r in split.refs], split.labels)


def split_by_fraction(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """A fixed, stratified split: in each class round(n * fraction) images, chosen by a
    permutation seeded with `seed`, go to val; both parts keep store (listing) order."""
    if not 0.0 < fraction < 1.0:
        raise BadInput(f"--val-fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(split.refs), dtype=bool)
    for c in np.unique(split.labels):
        members = np.flatnonzero(split.labels == c)
        n_val = int(round(len(members) * fraction))
        is_val[rng.permutation(members)[:n_val]] = True
    pick = lambda mask: Split(  # noqa: E731
        [r for r, m in zip(split.refs, mask, strict=True) if m], split.labels[mask]
    )
    return pick(~is_val), pick(is_val)


def select_classes(source: Source, wanted: list[str]) -> Source:
    """The source restricted to some of its classes, relabelled 0..k-1 in the order given. A
    class is named by its name or its index (a number)."""
    index = {c: i for i, c in enumerate(source.classes)}
    picks = []
    for w in wanted:
        w = str(w)
        i = index.get(w, int(w) if w.isdigit() else None)
        if i is None or not 0 <= i < len(source.classes):
            raise BadInput(
                f"--classes: {w!r} is not a class of this source ({', '.join(source.classes)})"
            )
        if i in picks:
            raise BadInput(f"--classes: {w!r} is given twice")
        picks.append(i)
    relabel = np.full(len(source.classes), -1, dtype=np.int64)
    relabel[picks] = np.arange(len(picks))
    splits = {}
    for name, sp in source.splits.items():
        keep = relabel[sp.labels] >= 0
        refs = [r for r, k in zip(sp.refs, keep.tolist(), strict=True) if k]
        splits[name] = Split(refs, relabel[sp.labels[keep]])
    kept = [source.classes[i] for i in picks]
    return dataclasses.replace(
        source,
        classes=kept,
        class_names=[source.class_names[i] for i in picks],
        splits=splits,
        description=f"{source.description}; classes {', '.join(kept)}",
    )
