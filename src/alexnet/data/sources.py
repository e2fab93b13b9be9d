"""The image sources `alexnet prepare` reads, as users actually have them, and auto-detection:
ImageNet (alexnet.data.imagenet), any ImageFolder tree, Fashion-MNIST's IDX files and CIFAR-10's
python batches.

A Source (alexnet.data.listing) lists, for each split ("train" and "val"), the items in store
order and their labels, and reads one item. Listing never decodes an image; it fails early,
before anything is written, on a source of the wrong kind or an empty class folder.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
from torchvision.datasets import FashionMNIST

from alexnet.data.imagenet import WNID, imagenet_source
from alexnet.data.listing import VAL_NAMES, Source, Split, class_tree, split_by_fraction, subdirs
from alexnet.errors import BadInput, NotFound

KINDS = ("imagenet", "folder", "fashion-mnist", "cifar10")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
# torchvision.datasets.FashionMNIST.classes, in label order
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


# --- folder ------------------------------------------------------------------------------------


def _folder_layout(root: Path) -> tuple[Path, Path | None] | None:
    """(train tree, val tree or None) if root looks like an ImageFolder source."""
    subs = subdirs(root)
    if "train" in subs and subdirs(root / "train"):
        val = next((root / v for v in (*VAL_NAMES, "test") if v in subs), None)
        return root / "train", val
    if subs and any(_image_files_shallow(root / s) for s in subs):
        return root, None
    return None


def _image_files_shallow(folder: Path) -> bool:
    try:
        return any(e.is_file() and not e.name.startswith(".") for e in os.scandir(folder))
    except OSError:
        return False


def folder_source(root: Path, val_fraction: float | None, seed: int) -> Source:
    layout = _folder_layout(root)
    if layout is None and subdirs(root):  # --kind folder given: class folders, images deeper
        layout = (root, None)
    if layout is None:
        raise BadInput(
            f"{root} is not an image folder tree: expected one folder per class "
            "(<class>/<image>), or train/<class>/ and val/<class>/"
        )
    train_dir, val_dir = layout
    if train_dir == root:
        classes, whole = class_tree(root)
        whole = Split([r.split("/", 1)[1] for r in whole.refs], whole.labels)
        train, val = split_by_fraction(whole, 0.1 if val_fraction is None else val_fraction, seed)
        how = f"one tree split by --val-fraction {0.1 if val_fraction is None else val_fraction}"
    else:
        classes, train = class_tree(train_dir)
        if val_dir is not None and val_fraction is None:
            _, val = class_tree(val_dir, classes)
            how = f"train/ and {val_dir.name}/"
        else:
            train, val = split_by_fraction(train, val_fraction or 0.1, seed)
            how = f"train/ split by --val-fraction {val_fraction or 0.1}"
    if not classes:
        raise BadInput(f"{root} has no class folders")
    desc = f"image folder ({len(classes)} classes; {how})"
    return Source("folder", root, classes, classes, {"train": train, "val": val}, description=desc)


# --- Fashion-MNIST -----------------------------------------------------------------------------


def idx_file(root: Path, stem: str) -> Path | None:
    for d in (root, root / "raw", root / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, also Fashion-MNIST's), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise BadInput(f"{path}: not an IDX file")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise BadInput(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise BadInput(f"{path}: truncated IDX file")
    return body.reshape(shape)


def fashion_mnist_source(root: Path) -> Source:
    stems = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
    arrays, splits, files = {}, {}, []
    for split, (img_stem, lab_stem) in stems.items():
        ip, lp = idx_file(root, img_stem), idx_file(root, lab_stem)
        if ip is None or lp is None:
            raise BadInput(
                f"{root} does not hold the Fashion-MNIST IDX files ({img_stem}.gz, "
                f"{lab_stem}.gz, ...): install Debian's dataset-fashion-mnist or pass --download"
            )
        images, labels = read_idx(ip), read_idx(lp).astype(np.int64)
        if images.ndim != 3 or len(images) != len(labels):
            raise BadInput(f"{ip}: expected N x 28 x 28 images matching {lp.name}")
        arrays[split] = images
        splits[split] = Split([(split, i) for i in range(len(images))], labels)
        files += [str(ip), str(lp)]
    desc = f"Fashion-MNIST IDX files ({len(splits['train'].refs)} train, "
    desc += f"{len(splits['val'].refs)} test used as val)"
    return Source(
        "fashion-mnist",
        root,
        list(FASHION_MNIST_CLASSES),
        list(FASHION_MNIST_CLASSES),
        splits,
        gray=True,
        description=desc,
        arrays=arrays,
        files=files,
    )


def download_fashion_mnist(root: Path) -> None:
    """torchvision's downloader (needs the internet); files land in root/FashionMNIST/raw."""
    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)


# --- CIFAR-10 ----------------------------------------------------------------------------------


def cifar10_dir(root: str | Path) -> Path | None:
    """The folder holding the CIFAR-10 python batches: root or root/cifar-10-batches-py."""
    root = Path(root)
    for d in (root, root / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file():
            return d
    return None


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 python batch holds: dicts, lists, bytes, str, ints and
    numpy arrays (numpy's array reconstruction, ndarray, dtype). Any other global, the only way
    a pickle runs code, is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol 2
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if module.startswith("numpy.core."):  # numpy 2 keeps these in numpy._core
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path, keys: tuple[bytes, ...] = (b"data", b"labels")) -> dict:
    """One pickled CIFAR-10 file (a data batch, or batches.meta with keys=(b"label_names",)),
    read without running any code; BadInput "not a CIFAR-10 batch: ..." for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as e:  # refused globals, truncation, garbage
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(f"{path}: not a CIFAR-10 batch: {why}") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: not a CIFAR-10 batch: a pickled {type(obj).__name__}, not a dict")
    missing = [k.decode() for k in keys if k not in obj]
    if missing:
        raise BadInput(f"{path}: not a CIFAR-10 batch: no {', '.join(missing)}")
    if b"data" in keys:
        data, labels = obj[b"data"], obj[b"labels"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise BadInput(f"{path}: not a CIFAR-10 batch: data is not a 2-D uint8 array")
        if data.shape[1] != 3072:
            raise BadInput(f"{path}: not a CIFAR-10 batch: rows of {data.shape[1]}, not 3072")
        if not isinstance(labels, list) or len(labels) != len(data):
            raise BadInput(f"{path}: not a CIFAR-10 batch: {len(data)} images, labels do not match")
        if not all(isinstance(v, int) and 0 <= v < 10 for v in labels):
            raise BadInput(f"{path}: not a CIFAR-10 batch: labels outside 0..9")
    if b"label_names" in keys:
        names = obj[b"label_names"]
        if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
            raise BadInput(f"{path}: not a CIFAR-10 batches.meta: label_names is not a list")
    return obj


CIFAR_SPLITS = {"train": [f"data_batch_{k}" for k in range(1, 6)], "val": ["test_batch"]}


def load_cifar10(root: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's training (data_batch_1..5) or test (test_batch) images as uint8
    (N, 3, 32, 32) and int64 labels, from the python batches (read by read_cifar_batch)."""
    d = cifar10_dir(root)
    if d is None:
        raise NotFound(
            f"{root}: no CIFAR-10 python batches (data_batch_1..5, test_batch, batches.meta, "
            "as in cifar-10-python.tar.gz)"
        )
    images, labels = [], []
    for name in CIFAR_SPLITS[split]:
        if not (d / name).is_file():
            raise NotFound(f"{d}: the CIFAR-10 batch {name} is missing")
        b = read_cifar_batch(d / name)
        # Each row: 1024 red, then 1024 green, then 1024 blue values, row-major 32x32.
        images.append(b[b"data"].reshape(-1, 3, 32, 32))
        labels.append(np.asarray(b[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def cifar10_source(root: Path) -> Source:
    d = cifar10_dir(root)
    if d is None or not (d / "test_batch").is_file():
        raise BadInput(
            f"{root} does not hold the CIFAR-10 python batches (data_batch_1..5, test_batch, "
            "batches.meta, as in cifar-10-python.tar.gz)"
        )
    arrays, splits, files = {}, {}, []
    for split, names in CIFAR_SPLITS.items():
        images, labels = load_cifar10(d, split)
        arrays[split] = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
        splits[split] = Split([(split, i) for i in range(len(labels))], labels)
        files += [str(d / name) for name in names]
    names = [f"class{k}" for k in range(10)]
    if (d / "batches.meta").is_file():
        meta = read_cifar_batch(d / "batches.meta", keys=(b"label_names",))
        names = [n.decode() if isinstance(n, bytes) else n for n in meta[b"label_names"]]
    desc = f"CIFAR-10 python batches ({len(splits['train'].refs)} train, "
    desc += f"{len(splits['val'].refs)} test used as val)"
    return Source(
        "cifar10", root, names, names, splits, description=desc, arrays=arrays, files=files
    )


# --- detection ---------------------------------------------------------------------------------


def detect_kind(root: Path) -> str:
    if idx_file(root, "train-images-idx3-ubyte") is not None:
        return "fashion-mnist"
    if cifar10_dir(root) is not None and (cifar10_dir(root) / "test_batch").is_file():
        return "cifar10"
    train = root / "train"
    if (root / "ILSVRC2012_img_train.tar").is_file() or (
        train.is_dir() and any(WNID.match(Path(e).stem) for e in os.listdir(train))
    ):
        return "imagenet"
    if _folder_layout(root) is not None:
        return "folder"
    raise BadInput(
        f"cannot tell what {root} holds: expected ImageNet (train/<wnid>/), an image folder tree "
        "(<class>/<image>), the Fashion-MNIST IDX files or the CIFAR-10 python batches; "
        "pass --kind"
    )


def open_source(
    root: str | os.PathLike, kind: str | None, val_fraction: float | None = None, seed: int = 0
) -> Source:
    root = Path(root)
    if not root.exists():
        raise NotFound(f"source {root} does not exist")
    if not root.is_dir():
        raise BadInput(f"source {root} is not a directory")
    if kind is None:
        kind = detect_kind(root)
    if kind == "imagenet":
        return imagenet_source(root, val_fraction, seed)
    if kind == "folder":
        return folder_source(root, val_fraction, seed)
    if kind == "fashion-mnist":
        return fashion_mnist_source(root)
    if kind == "cifar10":
        return cifar10_source(root)
    raise BadInput(f"unknown --kind {kind!r}; valid: {', '.join(KINDS)}")
