"""The image sources `alexnet prepare` reads, as users actually have them, and auto-detection.

A Source lists, for each split ("train" and "val"), the items in store order and their labels,
and reads one item. Listing never decodes an image; it fails early, before anything is written,
on a source of the wrong kind or an empty class folder.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torchvision.datasets import FashionMNIST

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
WNID = re.compile(r"^n\d{8}$")
VAL_NAMES = ("val", "validation", "valid")
IMAGENET_GT = "ILSVRC2012_validation_ground_truth.txt"


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

    def read(self, ref) -> tuple[object, str, bytes | None]:
        """(image source for images.paper_image, a name for reports, the raw bytes or None)."""
        if self.kind in ("fashion-mnist", "cifar10"):
            array, i = ref
            img = self.arrays[array][i]
            return img, f"{array}[{i}]", img.tobytes()
        if isinstance(ref, tuple):  # (tar file, offset, size, member name)
            tar, offset, size, member = ref
            with open(self.root / tar, "rb") as f:
                f.seek(offset)
                data = f.read(size)
            return data, f"{tar}:{member}", data
        with open(self.root / ref, "rb") as f:
            data = f.read()
        return data, ref, data

    def listing_digest(self) -> str:
        """sha256 of what is listed: split, item, label (not the contents)."""
        h = hashlib.sha256()
        for name, split in self.splits.items():
            for ref, label in zip(split.refs, split.labels.tolist(), strict=True):
                h.update(f"{name}\t{ref}\t{label}\n".encode())
        return h.hexdigest()


# --- helpers -----------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[str]:
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


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _class_tree(folder: Path, classes: list[str] | None = None) -> tuple[list[str], Split]:
    """An ImageFolder tree: one subfolder per class. Empty class folders are errors."""
    found = _subdirs(folder)
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
        files = _image_files(folder / c)
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


# --- folder ------------------------------------------------------------------------------------


def _folder_layout(root: Path) -> tuple[Path, Path | None] | None:
    """(train tree, val tree or None) if root looks like an ImageFolder source."""
    subs = _subdirs(root)
    if "train" in subs and _subdirs(root / "train"):
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
    if layout is None and _subdirs(root):  # --kind folder given: class folders, images deeper
        layout = (root, None)
    if layout is None:
        raise BadInput(
            f"{root} is not an image folder tree: expected one folder per class "
            "(<class>/<image>), or train/<class>/ and val/<class>/"
        )
    train_dir, val_dir = layout
    if train_dir == root:
        classes, whole = _class_tree(root)
        whole = Split([r.split("/", 1)[1] for r in whole.refs], whole.labels)
        train, val = split_by_fraction(whole, 0.1 if val_fraction is None else val_fraction, seed)
        how = f"one tree split by --val-fraction {0.1 if val_fraction is None else val_fraction}"
    else:
        classes, train = _class_tree(train_dir)
        if val_dir is not None and val_fraction is None:
            _, val = _class_tree(val_dir, classes)
            how = f"train/ and {val_dir.name}/"
        else:
            train, val = split_by_fraction(train, val_fraction or 0.1, seed)
            how = f"train/ split by --val-fraction {val_fraction or 0.1}"
    if not classes:
        raise BadInput(f"{root} has no class folders")
    desc = f"image folder ({len(classes)} classes; {how})"
    return Source("folder", root, classes, classes, {"train": train, "val": val}, description=desc)


# --- ImageNet ----------------------------------------------------------------------------------


def _find(root: Path, name: str, depth: int = 3) -> Path | None:
    for dirpath, dirnames, filenames in os.walk(root):
        if name in filenames:
            return Path(dirpath) / name
        if len(Path(dirpath).relative_to(root).parts) >= depth:
            dirnames[:] = []
        skip = ("train", *VAL_NAMES)  # never walk the image folders themselves
        dirnames[:] = [d for d in dirnames if d not in skip and not WNID.match(d)]
    return None


def _devkit(root: Path) -> tuple[list[int] | None, dict[int, tuple[str, str]] | None]:
    """The validation ground truth (ILSVRC2012_IDs, 1-based, in image order) and the devkit's
    meta.mat map ILSVRC2012_ID -> (WNID, words), from the unpacked devkit or its tar.gz."""
    gt_text, meta_bytes = None, None
    gt = _find(root, IMAGENET_GT)
    if gt is not None:
        gt_text = gt.read_text()
        meta = gt.parent / "meta.mat"
        meta_bytes = meta.read_bytes() if meta.exists() else None
    else:
        tgz = _find(root, "ILSVRC2012_devkit_t12.tar.gz", depth=1)
        if tgz is not None:
            with tarfile.open(tgz) as t:
                for m in t.getmembers():
                    if m.name.endswith(IMAGENET_GT):
                        gt_text = t.extractfile(m).read().decode()
                    elif m.name.endswith("data/meta.mat"):
                        meta_bytes = t.extractfile(m).read()
    ids = [int(x) for x in gt_text.split()] if gt_text is not None else None
    meta = None
    if meta_bytes is not None:
        try:
            from scipy.io import loadmat
        except ImportError:  # the [imagenet] extra; scikit-image (the [dev] extra) brings it too
            raise BadInput(
                "reading the ImageNet devkit's meta.mat needs scipy: "
                "pip install 'alexnet[imagenet]'"
            ) from None
        synsets = loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
        meta = {}
        for s in np.atleast_1d(synsets):
            if int(s["num_children"]) == 0:  # the 1000 leaf classes
                meta[int(s["ILSVRC2012_ID"])] = (str(s["WNID"]), str(s["words"]))
    return ids, meta


def _tar_members(path: Path, base: int = 0):
    """(name, absolute data offset, size) of the regular members of an uncompressed tar."""
    with tarfile.open(path, "r:") as t:
        for m in t:
            if m.isfile():
                yield m.name, base + m.offset_data, m.size


def _train_tar(root: Path, tar: Path) -> tuple[list[str], Split]:
    """The official train tar: one <wnid>.tar per class inside ILSVRC2012_img_train.tar."""
    rel = str(tar.relative_to(root))
    per_class: dict[str, list] = {}
    with tarfile.open(tar, "r:") as outer:
        for m in outer:
            name = Path(m.name).name
            if m.isfile() and name.endswith(".tar") and WNID.match(name[:-4]):
                with tarfile.open(fileobj=outer.extractfile(m), mode="r:") as inner:
                    per_class[name[:-4]] = [
                        (rel, m.offset_data + im.offset_data, im.size, f"{name[:-4]}/{im.name}")
                        for im in inner
                        if im.isfile()
                    ]
    classes = sorted(per_class)
    refs, labels = [], []
    for k, c in enumerate(classes):
        if not per_class[c]:
            raise BadInput(f"{rel}: the class tar {c}.tar is empty")
        members = sorted(per_class[c], key=lambda r: r[3])
        refs += members
        labels += [k] * len(members)
    return classes, Split(refs, np.asarray(labels, dtype=np.int64))


def _train_class_tars(root: Path, train: Path) -> tuple[list[str], Split]:
    """train/<wnid>.tar: the outer tar already unpacked."""
    tars = sorted(p for p in train.iterdir() if p.suffix == ".tar" and WNID.match(p.stem))
    classes = [p.stem for p in tars]
    refs, labels = [], []
    for k, p in enumerate(tars):
        rel = str(p.relative_to(root))
        members = sorted(
            ((rel, off, size, f"{p.stem}/{n}") for n, off, size in _tar_members(p)),
            key=lambda r: r[3],
        )
        if not members:
            raise BadInput(f"the class tar {p} is empty")
        refs += members
        labels += [k] * len(members)
    return classes, Split(refs, np.asarray(labels, dtype=np.int64))


def _val_number(name: str) -> int | None:
    m = re.search(r"(\d+)\.[A-Za-z]+$", name)
    return int(m.group(1)) if m else None


def imagenet_source(root: Path, val_fraction: float | None, seed: int) -> Source:
    train_dir = root / "train"
    train_tar = next(
        (
            p
            for p in (root / "ILSVRC2012_img_train.tar", train_dir / "ILSVRC2012_img_train.tar")
            if p.is_file()
        ),
        None,
    )
    notes = []
    if train_dir.is_dir() and any(WNID.match(d) for d in _subdirs(train_dir)):
        classes, train = _class_tree(train_dir)
        if not all(WNID.match(c) for c in classes):
            bad = [c for c in classes if not WNID.match(c)][:3]
            raise BadInput(f"{train_dir} has folders that are not WordNet ids: {bad}")
        notes.append(f"train/: {len(classes)} class folders")
    elif train_dir.is_dir() and any(
        p.suffix == ".tar" and WNID.match(p.stem) for p in train_dir.iterdir()
    ):
        classes, train = _train_class_tars(root, train_dir)
        notes.append(f"train/: {len(classes)} per-class tars")
    elif train_tar is not None:
        classes, train = _train_tar(root, train_tar)
        notes.append(f"{train_tar.name}: {len(classes)} per-class tars")
    else:
        raise BadInput(
            f"{root} does not look like ImageNet: expected train/ with one nXXXXXXXX folder per "
            "class (or per-class tars), or ILSVRC2012_img_train.tar"
        )
    ids, meta = _devkit(root)
    class_names = list(classes)
    if meta is not None:
        words = {w: n for w, n in meta.values()}
        class_names = [words.get(c, c) for c in classes]
    index = {c: k for k, c in enumerate(classes)}

    val_dir = next((root / v for v in VAL_NAMES if (root / v).is_dir()), None)
    val_tar = next((p for p in (root / "ILSVRC2012_img_val.tar",) if p.is_file()), None)
    val = None
    if val_dir is not None and any(WNID.match(d) for d in _subdirs(val_dir)):
        _, val = _class_tree(val_dir, classes)
        notes.append(f"{val_dir.name}/: class folders")
    elif val_dir is not None or val_tar is not None:
        if val_dir is not None:
            names = [f for f in _image_files(val_dir) if "/" not in f]
            refs = [f"{val_dir.name}/{f}" for f in names]
            where = f"{val_dir.name}/"
        else:
            members = sorted(_tar_members(val_tar), key=lambda m: m[0])
            rel = str(val_tar.relative_to(root))
            names = [m[0] for m in members]
            refs = [(rel, off, size, name) for name, off, size in members]
            where = val_tar.name
        if names and val_fraction is None:
            if ids is None or meta is None:
                raise BadInput(
                    f"{where} is a flat folder of validation images: its labels need the devkit "
                    f"({IMAGENET_GT} and meta.mat, or ILSVRC2012_devkit_t12.tar.gz) under {root}"
                )
            labels = []
            for name in names:
                num = _val_number(name)
                if num is None or not 1 <= num <= len(ids):
                    raise BadInput(f"{where}{name}: not an ILSVRC2012_val_NNNNNNNN image name")
                wnid = meta[ids[num - 1]][0]
                if wnid not in index:
                    raise BadInput(f"{where}{name}: its class {wnid} is not among train/'s")
                labels.append(index[wnid])
            val = Split(refs, np.asarray(labels, dtype=np.int64))
            notes.append(f"{where}: {len(names)} flat images labelled by the devkit")
    if val is None:
        train, val = split_by_fraction(train, val_fraction or 0.1, seed)
        notes.append(f"val: {val_fraction or 0.1} of train (--val-fraction)")
    desc = "ImageNet (" + "; ".join(notes) + ")"
    return Source(
        "imagenet", root, classes, class_names, {"train": train, "val": val}, description=desc
    )


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
