"""ImageNet as users have it: train/ in class folders, in per-class tars or as the official
ILSVRC2012_img_train.tar; val/ in class folders or flat (labelled by the devkit's ground truth and
meta.mat), or split off train/ (--val-fraction)."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from alexnet.data.listing import (
    VAL_NAMES,
    Source,
    Split,
    class_tree,
    image_files,
    split_by_fraction,
    subdirs,
)
from alexnet.errors import BadInput

WNID = re.compile(r"^n\d{8}$")
IMAGENET_GT = "ILSVRC2012_validation_ground_truth.txt"


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
    if train_dir.is_dir() and any(WNID.match(d) for d in subdirs(train_dir)):
        classes, train = class_tree(train_dir)
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
    if val_dir is not None and any(WNID.match(d) for d in subdirs(val_dir)):
        _, val = class_tree(val_dir, classes)
        notes.append(f"{val_dir.name}/: class folders")
    elif val_dir is not None or val_tar is not None:
        if val_dir is not None:
            names = [f for f in image_files(val_dir) if "/" not in f]
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
