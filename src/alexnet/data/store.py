"""The prepared store: reading it (`open_store`) and the record codecs shared with `prepare`.

Layout of a store directory (format version 1; docs/data.md says why):

    manifest.json        written last, by an atomic rename: a store is complete iff it exists
    stats.npz            float64 training-set statistics (mean image, channel mean/std, RGB cov,
                         its eigenvalues and eigenvectors)
    report.json          what was skipped and why
    <split>/shard-NNNNN.bin   the records of one chunk of the source, back to back
    <split>/index.npy    int64 (N, 3): shard number, byte offset, byte length of image i
    <split>/labels.npy   int64 (N,)

A record is one S x S picture, planar (C, S, S) uint8 with C = 1 (grey sources) or 3: either raw
bytes ("raw") or a baseline JPEG of it ("jpeg"). Readers use pread on read-only descriptors: no
locks, no writes, nothing kept resident beyond the index, so any number of processes and hosts
can read one store at once.
"""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alexnet.errors import BadInput, NotFound

try:
    # libjpeg-turbo through torchvision's image extension: faster than Pillow's decoder on
    # 256x256 images. torchvision 0.29 deprecates the Python wrapper decode_jpeg in favour of
    # TorchCodec and warns on every call; the operator under it is called directly. Where it is
    # gone, Pillow decodes (also libjpeg-turbo, a little slower).
    import torchvision.io  # noqa: F401  (loads the extension that registers the operator)
    from torchvision.io import ImageReadMode

    _decode_jpeg_op = torch.ops.image.decode_jpeg
    _GRAY, _RGB = ImageReadMode.GRAY.value, ImageReadMode.RGB.value
except (ImportError, AttributeError, RuntimeError):  # pragma: no cover
    _decode_jpeg_op = None

FORMAT = "alexnet-store"
VERSION = 1
MANIFEST = "manifest.json"
WORK_DIR = ".prepare"  # present while a prepare is unfinished


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:05d}.bin"


def decode_record(buf: bytes | np.ndarray, encoding: str, channels: int, size: int) -> np.ndarray:
    """One record to a planar uint8 (C, S, S) array (a read-only view for raw records)."""
    if encoding == "raw":
        return np.frombuffer(buf, dtype=np.uint8).reshape(channels, size, size)
    if encoding == "jpeg":
        if _decode_jpeg_op is None:
            img = Image.open(io.BytesIO(buf)).convert("L" if channels == 1 else "RGB")
            a = np.asarray(img)
            return a[None] if channels == 1 else np.ascontiguousarray(a.transpose(2, 0, 1))
        data = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
        return _decode_jpeg_op(data, _GRAY if channels == 1 else _RGB, False).numpy()
    raise BadInput(f"unknown record encoding {encoding!r}")


@dataclass(frozen=True)
class Stats:
    """Training-set statistics on the 0-255 pixel scale, all float64 (see stats_from_sums)."""

    mean_image: np.ndarray  # (S, S, 3): Sec. 2's "mean activity over the training set"
    channel_mean: np.ndarray  # (3,)
    channel_std: np.ndarray  # (3,)
    cov: np.ndarray  # (3, 3) covariance of RGB pixel values over all pixels of all images
    eigval: np.ndarray  # (3,) descending
    eigvec: np.ndarray  # (3, 3), eigenvectors as columns (Sec. 4.1: p1, p2, p3)
    count: int  # images

    @classmethod
    def load(cls, path: str | os.PathLike) -> Stats:
        """The statistics of a store's stats.npz; BadInput naming it if it is unreadable."""
        try:
            with np.load(path) as z:
                st = cls(
                    mean_image=z["mean_image"],
                    channel_mean=z["channel_mean"],
                    channel_std=z["channel_std"],
                    cov=z["cov"],
                    eigval=z["eigval"],
                    eigvec=z["eigvec"],
                    count=int(z["count"]),
                )
        except Exception as e:  # not a zip, a member missing or cut short, ...
            raise BadInput(f"{path} is corrupt ({_why(e)}): prepare the store again") from None
        shapes = {"channel_mean": (3,), "channel_std": (3,), "cov": (3, 3), "eigval": (3,),
                  "eigvec": (3, 3)}  # fmt: skip
        bad = [k for k, v in shapes.items() if getattr(st, k).shape != v]
        if st.mean_image.ndim != 3 or st.mean_image.shape[2] != 3:
            bad.append("mean_image")
        bad += [
            f.name
            for f in fields(cls)
            if f.name != "count" and not np.isfinite(getattr(st, f.name)).all()
        ]
        if bad:
            raise BadInput(f"{path} is corrupt ({', '.join(bad)}): prepare the store again")
        return st

    def to_bytes(self) -> bytes:
        """The stats.npz file's content."""
        buf = io.BytesIO()
        np.savez(
            buf,
            mean_image=self.mean_image,
            channel_mean=self.channel_mean,
            channel_std=self.channel_std,
            cov=self.cov,
            eigval=self.eigval,
            eigvec=self.eigvec,
            count=np.int64(self.count),
        )
        return buf.getvalue()


def _why(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0] or type(e).__name__


def stats_from_sums(sum_image: np.ndarray, sum_xxT: np.ndarray, count: int) -> Stats:
    """Statistics from the one-pass sums over `count` images.

    sum_image is the per-position sum (C, S, S) and sum_xxT the sum over every pixel of every
    image of x x^T (C x C), x the pixel's channel values. Both are sums of integers below 2^53,
    hence exact in float64, so E[x x^T] - mu mu^T loses nothing to cancellation that matters.
    A grey store (C = 1) has R = G = B: its statistics are those of the replicated picture.
    """
    if count == 0:
        raise BadInput("no training images: cannot compute the statistics")
    sum_image = np.asarray(sum_image, dtype=np.float64)
    sum_xxT = np.asarray(sum_xxT, dtype=np.float64)
    if sum_image.shape[0] == 1:
        sum_image = np.repeat(sum_image, 3, axis=0)
        sum_xxT = np.full((3, 3), sum_xxT[0, 0])
    c, s, _ = sum_image.shape
    pixels = count * s * s
    mean_image = (sum_image / count).transpose(1, 2, 0)
    mu = sum_image.reshape(c, -1).sum(axis=1) / pixels
    cov = sum_xxT / pixels - np.outer(mu, mu)
    cov = (cov + cov.T) / 2
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    w, v = np.clip(w[order], 0.0, None), v[:, order]
    v = v * np.where(v.sum(axis=0) < 0, -1.0, 1.0)  # a fixed sign: the largest sums positive
    return Stats(
        mean_image=mean_image,
        channel_mean=mu,
        channel_std=np.sqrt(np.clip(np.diag(cov), 0.0, None)),
        cov=cov,
        eigval=w,
        eigvec=v,
        count=int(count),
    )


class _Fds:
    """A small per-process cache of read-only descriptors (a store may have thousands of
    shards; the process limit on open files is often 1024)."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.fds: OrderedDict[str, int] = OrderedDict()

    def get(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self.fds[path] = fd
            if len(self.fds) > self.limit:
                os.close(self.fds.popitem(last=False)[1])
        else:
            self.fds.move_to_end(path)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class Store:
    """A complete prepared store, opened read-only. Safe to pickle into worker processes:
    descriptors and arrays are reopened lazily in each process."""

    def __init__(self, path: str | os.PathLike, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.classes: list[str] = list(manifest["classes"])
        self.num_classes = len(self.classes)
        self.splits: list[str] = list(manifest["splits"])
        self.image_size: int = int(manifest["image_size"])
        self.channels: int = int(manifest["channels"])
        self.encoding: str = manifest["encoding"]
        self._index: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._stats: Stats | None = None
        self._fds = _Fds()
        self._pid = os.getpid()

    def __getstate__(self):
        return {"path": self.path, "manifest": self.manifest}

    def __setstate__(self, state):
        self.__init__(state["path"], state["manifest"])

    def __del__(self):
        fds = getattr(self, "_fds", None)
        if fds is not None and getattr(self, "_pid", None) == os.getpid():
            fds.close()

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.size(s)}" for s in self.splits)
        return f"Store({str(self.path)!r}, {self.manifest['kind']}, {counts})"

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise BadInput(f"store {self.path} has no split {split!r} (it has {self.splits})")

    def size(self, split: str) -> int:
        self._check_split(split)
        return int(self.manifest["counts"][split])

    def _array(self, split: str, name: str, shape: tuple, mmap: bool) -> np.ndarray:
        """<split>/<name>, an int64 array of `shape`; BadInput naming it otherwise."""
        path = self.path / split / name
        try:
            a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except Exception as e:  # a torn or foreign file: not the store's array
            raise BadInput(f"{path} is corrupt ({_why(e)}): prepare the store again") from None
        if a.shape != shape or a.dtype != np.int64:
            raise BadInput(
                f"{path} is corrupt (a {a.dtype} array of shape {a.shape}, the manifest says "
                f"int64 {shape}): prepare the store again"
            )
        return a

    def index(self, split: str) -> np.ndarray:
        """(N, 3) int64 [shard, offset, length], memory-mapped read-only (page cache, shared)."""
        if split not in self._index:
            self._check_split(split)
            self._index[split] = self._array(split, "index.npy", (self.size(split), 3), True)
        return self._index[split]

    def labels(self, split: str) -> np.ndarray:
        if split not in self._labels:
            self._check_split(split)
            a = self._array(split, "labels.npy", (self.size(split),), False)
            if len(a) and not (0 <= a.min() and a.max() < self.num_classes):
                raise BadInput(
                    f"{self.path / split / 'labels.npy'} is corrupt (labels outside 0.."
                    f"{self.num_classes - 1}): prepare the store again"
                )
            self._labels[split] = a
        return self._labels[split]

    @property
    def stats(self) -> Stats:
        if self._stats is None:
            self._stats = Stats.load(self.path / "stats.npz")
        return self._stats

    def record(self, split: str, i: int) -> bytes:
        """The stored bytes of image i (one pread)."""
        return self.records(split, [i])[0]

    def records(self, split: str, idx) -> list[bytes]:
        """The stored bytes of images idx (one pread each)."""
        if os.getpid() != self._pid:  # forked: descriptors belong to the parent
            self._fds, self._pid = _Fds(), os.getpid()
        rows = np.asarray(self.index(split)[np.asarray(idx, dtype=np.int64)]).tolist()
        out = []
        for shard, offset, length in rows:
            fd = self._fds.get(str(self.path / split / shard_name(shard)))
            buf = os.pread(fd, length, offset)
            if len(buf) != length:
                raise BadInput(
                    f"store {self.path}: {split} shard {shard} is shorter than its index"
                )
            out.append(buf)
        return out

    def planars(self, split: str, idx) -> list[np.ndarray]:
        """Images idx as stored, decoded: uint8 (C, S, S) each. A record that does not decode
        to one is BadInput naming the store, the split and the record's index."""
        out = []
        shape = (self.channels, self.image_size, self.image_size)
        for i, buf in zip(np.asarray(idx).tolist(), self.records(split, idx), strict=True):
            try:
                a = decode_record(buf, self.encoding, self.channels, self.image_size)
                if a.shape != shape:
                    raise ValueError(f"decodes to {a.shape}, not {shape}")
            except BadInput:
                raise
            except Exception as e:  # libjpeg's, Pillow's or numpy's own complaint
                raise BadInput(
                    f"store {self.path}: {split} record {i} is corrupt ({_why(e)}): prepare the "
                    "store again"
                ) from None
            out.append(a)
        return out

    def planar(self, split: str, i: int) -> np.ndarray:
        """Image i as stored: uint8 (C, S, S), C = 1 for grey stores."""
        n = self.size(split)
        if not -n <= i < n:
            raise IndexError(f"image {i} out of range for split {split!r} of {n} images")
        return self.planars(split, [i % n])[0]

    def image(self, split: str, i: int) -> np.ndarray:
        """Image i as uint8 (S, S, 3) RGB (grey replicated)."""
        p = self.planar(split, i)
        if p.shape[0] == 1:
            p = np.repeat(p, 3, axis=0)
        return np.ascontiguousarray(p.transpose(1, 2, 0))


def _check_manifest(path: Path, m: dict) -> None:
    """BadInput naming the manifest unless it has every key a reader needs, of the right type
    (a hand-edited or foreign manifest would otherwise fail later with a KeyError)."""

    def strings(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)

    checks = {
        "classes": strings,
        "splits": strings,
        "counts": lambda v: (
            isinstance(v, dict)
            and all(isinstance(v.get(s), int) and v[s] >= 0 for s in m.get("splits") or [])
        ),
        "image_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "channels": lambda v: v in (1, 3),
        "encoding": lambda v: v in ("jpeg", "raw"),
        "kind": lambda v: isinstance(v, str),
    }
    bad = [k for k, ok in checks.items() if k not in m or not ok(m[k])]
    if bad:
        what = ", ".join(f"{k!r}" for k in bad)
        raise BadInput(f"{path} lacks or garbles {what}: not a complete store manifest")


def open_store(path: str | os.PathLike) -> Store:
    """Open a complete store; FileNotFoundError / ValueError with the reason otherwise."""
    p = Path(path)
    if not p.exists():
        raise NotFound(f"no store at {p}")
    if not p.is_dir():
        raise BadInput(f"{p} is not a store (a store is a directory made by `alexnet prepare`)")
    mpath = p / MANIFEST
    if not mpath.exists():
        if (p / WORK_DIR).exists():
            raise BadInput(
                f"{p} is an incomplete store (an interrupted `alexnet prepare`): run the same "
                "prepare command again to finish it"
            )
        raise BadInput(
            f"{p} is not a store: it has no {MANIFEST} (make one with `alexnet prepare`)"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{mpath} is not a readable store manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadInput(f"{p} is not a store: {MANIFEST} is not an {FORMAT} manifest")
    version = manifest.get("version")
    if version != VERSION:
        raise BadInput(
            f"{p} has store format version {version}; this alexnet reads version {VERSION}: "
            "prepare the store again with this version"
        )
    _check_manifest(mpath, manifest)
    for split in manifest["splits"]:
        for name in ("index.npy", "labels.npy"):
            if not (p / split / name).exists():
                raise BadInput(f"store {p} is damaged: {split}/{name} is missing")
    if not (p / "stats.npz").exists():
        raise BadInput(f"store {p} is damaged: stats.npz is missing")
    return Store(p, manifest)
