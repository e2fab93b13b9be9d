"""Checkpoint files that survive crashes and never run code when loaded.

- Every write is atomic (fileio.atomic_write): a crash at any moment leaves either the old file
  or the new one, never a torn file.
- Every file carries a checksum (sha256 of its tensors' bytes and of everything else it holds:
  `content_digest`), which loading verifies: a file damaged after it was written (a flipped
  bit, bytes overwritten) is refused in one line naming it, as is any NaN or infinite
  floating-point tensor (named). Files written before checksums existed load unchecked.
- Weights (`save_weights` / `load_weights`): safetensors, with string metadata; the format key
  "format": "alexnet-weights/1" tells our files from any other safetensors file. A weights file
  of this program also carries the profile, the class names (`weights_metadata`) and the
  preprocessing statistics of its training store (`Preprocess`, `stats_tensors`).
- Training state (`save_state` / `load_state`): torch.save, loaded with weights_only=True, so
  only tensors and plain containers/numbers/strings come back. `capture_rng_state` /
  `restore_rng_state` put every random generator's state into those types.

A file that is empty, truncated, corrupt, damaged or someone else's raises ValueError with one
line naming the file and what is wrong (FileNotFoundError for a missing one).

Why one file of this length: the weights and the training state share what makes a file read
from disk trustworthy (atomic writes, checksums, finite values, one-line errors), and the
weights' metadata and statistics belong with the tensors they describe.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import struct
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save
from torch import nn

from alexnet.errors import BadInput
from alexnet.fileio import atomic_write, file_sha256

WEIGHTS_FORMAT = "alexnet-weights/1"
STATE_FORMAT = "alexnet-state/1"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
# The metadata key (weights) and the wrapper key (state) of the checksum.
CHECKSUM_KEY = "sha256"
# The largest image side a weights file's preprocessing may ask for (data.image_size,
# model.input_size): the paper's is 256 (224 crops); 12000 would resize every image to 2.4 GB.
MAX_IMAGE_SIDE = 1024


# --- checksums and finiteness ------------------------------------------------------------------
def _digest(h, obj: Any) -> None:
    # A canonical walk: the same content gives the same bytes, whatever the file's layout.
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _digest(h, k)
            _digest(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for v in obj:
            _digest(h, v)
    else:  # numbers, strings, None, bytes, dtypes: their repr is exact
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def content_digest(obj: Any) -> str:
    """sha256 of a structure of tensors (dtype, shape, bytes), containers and plain values."""
    h = hashlib.sha256()
    _digest(h, obj)
    return h.hexdigest()


def _weights_digest(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> str:
    return content_digest(
        {
            "metadata": sorted((k, v) for k, v in meta.items() if k != CHECKSUM_KEY),
            "tensors": [(k, tensors[k]) for k in sorted(tensors)],
        }
    )


def _tensors_in(obj: Any, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors_in(v, f"{prefix}{k}" if not prefix else f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors_in(v, f"{prefix}/{i}" if prefix else str(i))


def check_finite(path: str | os.PathLike, obj: Any) -> None:
    """BadInput naming `path` and the first floating-point tensor in `obj` (a state_dict or any
    structure of them) that holds a NaN or an infinity: such weights give nan for every image."""
    for name, t in _tensors_in(obj):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "infinite values"
            raise BadInput(f"{path}: {name} holds {what}: the weights are broken, not usable")


# --- weights: safetensors ----------------------------------------------------------------------
def _cpu_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state_dict entry {k!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (views of one buffer): copy those.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        out[k] = t
    return out


def save_weights(
    path: str | os.PathLike,
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the weights as a safetensors file, atomically. `metadata` values must be strings
    (JSON-encode lists and dicts); "format" defaults to WEIGHTS_FORMAT."""
    state = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    meta = {"format": WEIGHTS_FORMAT}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"weights metadata must map str to str; {k!r} is {type(v).__name__}")
        meta[k] = v
    tensors = _cpu_tensors(state)
    meta[CHECKSUM_KEY] = _weights_digest(tensors, meta)
    data = st_save(tensors, metadata=meta)
    return atomic_write(path, lambda f: f.write(data))


def _bad(path: Path, what: str) -> BadInput:
    return BadInput(f"{path}: {what}")


def _torch_save_error(path: Path, head: bytes) -> BadInput | None:
    """The error for a file torch.save wrote (a `.pth`/`.pt`: a zip archive since torch 1.6,
    a bare pickle before) where a safetensors file is expected, None for any other start.
    Such a file is what torchvision publishes; told only "not a safetensors file", a user
    would not know it converts with `alexnet import-torchvision`."""
    is_zip = head.startswith(b"PK\x03\x04")
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO 2-5
    if not (is_zip or is_pickle):
        return None
    return _bad(
        path,
        "a PyTorch file (torch.save), not a safetensors weights file: torchvision's AlexNet "
        f"weights convert with `alexnet import-torchvision {path} OUT`",
    )


def torch_save_error(path: str | os.PathLike) -> BadInput | None:
    """_torch_save_error for a file on disk (its first bytes), None when it cannot be read:
    for the callers that must tell a PyTorch file from the other paths they are given."""
    try:
        with Path(path).open("rb") as f:
            return _torch_save_error(Path(path), f.read(8))
    except OSError:
        return None


def _read_weights_header(path: Path) -> dict[str, Any]:
    # safetensors layout: 8-byte little-endian header length, JSON header, tensor bytes.
    size = path.stat().st_size  # FileNotFoundError for a missing file
    if size == 0:
        raise _bad(path, "empty file, not an alexnet weights file (safetensors)")
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _torch_save_error(path, head) or _bad(
                path, f"truncated or not a safetensors file ({size} bytes)"
            )
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            # Only a file that is no safetensors file is asked whether torch.save wrote it:
            # a valid header's length may begin with the bytes a pickle begins with.
            raise _torch_save_error(path, head) or _bad(
                path, "not a safetensors file, or truncated (header longer than the file)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise _bad(path, "not a safetensors file (its header is not a JSON object)")
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (TypeError, KeyError, IndexError, ValueError):
        raise _bad(path, "not a safetensors file (malformed tensor entries)") from None
    if 8 + n + end > size:
        raise _bad(path, f"truncated: {size} bytes, its header describes {8 + n + end}")
    return header


def _header_metadata(path: Path) -> dict[str, str]:
    meta = _read_weights_header(path).get("__metadata__") or {}
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt is None:
        raise _bad(path, 'a file without a "format" metadata key: not alexnet weights')
    if fmt != WEIGHTS_FORMAT:
        raise _bad(path, f"unsupported format {fmt!r} (expected {WEIGHTS_FORMAT!r})")
    return dict(meta)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a weights file written by save_weights, read from its header alone
    (unverified: load_weights checks the file whole)."""
    meta = _header_metadata(Path(path))
    meta.pop(CHECKSUM_KEY, None)
    return meta


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict on the CPU, metadata) of a file written by save_weights. Never runs code.
    The checksum is verified and every floating-point tensor must be finite (BadInput naming
    the file, and the tensor)."""
    path = Path(path)
    meta = _header_metadata(path)
    try:
        state = st_load_file(path, device="cpu")
    except Exception as e:  # safetensors' own checks (bad offsets, dtypes, ...)
        raise _bad(path, f"corrupt safetensors file ({str(e).splitlines()[0]})") from None
    saved = meta.pop(CHECKSUM_KEY, None)
    if saved is not None and saved != _weights_digest(state, meta):
        raise _bad(path, _DAMAGED)
    check_finite(path, state)
    return state, meta


_DAMAGED = (
    "damaged: its contents no longer match the checksum written with it (changed or corrupted "
    "since); use another copy"
)


@dataclass
class Preprocess:
    """The training store's statistics that the views need (data.views, Sec. 2 and 4.1),
    saved in every weights file so that prediction sees what training saw."""

    mean_image: np.ndarray  # (S, S, 3) float64, 0-255 scale
    channel_mean: np.ndarray  # (3,)
    channel_std: np.ndarray  # (3,)
    eigval: np.ndarray  # (3,)
    eigvec: np.ndarray  # (3, 3), eigenvectors as columns

    @classmethod
    def of(cls, stats) -> Preprocess:
        """The fields of any statistics object (a store's data.store.Stats, say)."""
        return cls(**{f.name: np.asarray(getattr(stats, f.name)) for f in fields(cls)})


PREPROCESS_PREFIX = "preprocess."


def stats_tensors(stats) -> dict[str, torch.Tensor]:
    """The statistics as float32 tensors "preprocess.<field>", stored beside the weights."""
    return {
        PREPROCESS_PREFIX + f.name: torch.as_tensor(
            np.ascontiguousarray(getattr(stats, f.name)), dtype=torch.float32
        )
        for f in fields(Preprocess)
    }


def split_weights(
    path: Path, tensors: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], Preprocess]:
    """(the model's state_dict, the Preprocess statistics) of a weights file's tensors."""
    pre = {
        k[len(PREPROCESS_PREFIX) :]: v
        for k, v in tensors.items()
        if k.startswith(PREPROCESS_PREFIX)
    }
    missing = [f.name for f in fields(Preprocess) if f.name not in pre]
    if missing:
        raise BadInput(
            f"{path}: weights without the preprocessing statistics ({', '.join(missing)} "
            "missing): not a weights file written by alexnet train or import-torchvision"
        )
    stats = Preprocess(
        **{f.name: pre[f.name].numpy().astype(np.float64) for f in fields(Preprocess)}
    )
    state = {k: v for k, v in tensors.items() if not k.startswith(PREPROCESS_PREFIX)}
    return state, stats


def check_preprocessing(path: str | os.PathLike, profile, stats: Preprocess) -> None:
    """BadInput naming `path` unless a weights file's preprocessing is one prediction can use
    as it is: image sides of at most MAX_IMAGE_SIDE pixels (a metadata that asks for 12000
    would resize every image to 12000x12000), a mean image of data.image_size pixels, three
    colour channels with positive standard deviations. (Finite values: load_weights.)"""
    size, side = profile.data.image_size, profile.model.input_size
    for key, v in (("data.image_size", size), ("model.input_size", side)):
        if v > MAX_IMAGE_SIDE:
            raise _bad(path, f"its metadata asks for {key}={v}, over the {MAX_IMAGE_SIDE} allowed")
    shapes = {
        "mean_image": (size, size, 3),
        "channel_mean": (3,),
        "channel_std": (3,),
        "eigval": (3,),
        "eigvec": (3, 3),
    }
    for name, shape in shapes.items():
        got = tuple(np.shape(getattr(stats, name)))
        if got != shape:
            raise _bad(
                path,
                f"{PREPROCESS_PREFIX}{name} is {got}, where data.image_size={size} needs {shape}",
            )
    if not bool((np.asarray(stats.channel_std) > 0).all()):
        raise _bad(
            path, f"{PREPROCESS_PREFIX}channel_std must be positive, got {stats.channel_std}"
        )


def load_into(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike, what: str = ""
) -> None:
    """model.load_state_dict(state), or BadInput in one line naming `path` and the first
    mismatches (load_state_dict's own error is a paragraph). `what`: the network as the file
    describes it (its profile and classes)."""
    own = model.state_dict()
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if shapes:
        k = shapes[0]
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        problems.append(
            f"{k} is {tuple(state[k].shape)} where the network has {tuple(own[k].shape)}{more}"
        )
    if missing:
        problems.append(f"{len(missing)} tensors missing ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({', '.join(unexpected[:3])})")
    if problems:
        raise BadInput(
            f"{path}: the tensors do not fit the network{' ' + what if what else ''}: "
            + "; ".join(problems)
        )
    model.load_state_dict(state)


def weights_metadata(profile, classes: list[str], extra: Mapping[str, str] | None = None) -> dict:
    """The metadata of a weights file: format, profile name and full config, class names."""
    meta = {
        "format": WEIGHTS_FORMAT,
        "profile": profile.name,
        "config": json.dumps(profile.to_dict()),
        "classes": json.dumps(list(classes)),
    }
    meta.update(extra or {})
    return meta


def init_from(model: nn.Module, path: str | os.PathLike, classes: list[str]) -> dict[str, Any]:
    """Fine-tuning's start (`train --init`): copy into `model` every tensor of the weights file
    `path` whose key and shape match, bit for bit; the classifier (model.output_layer) only when
    the file's class names are `classes`, else it keeps the model's own initialisation (the
    profile's). Weights of the other layout (two towers / torchvision) are refused. Returns what
    was loaded and what was not (recorded in the run's config.json)."""
    path = Path(path)
    tensors, meta = load_weights(path)
    try:
        saved = json.loads(meta["config"])
        layout, their_classes = saved["model"]["layout"], json.loads(meta["classes"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise _bad(path, "weights without this program's metadata (config, classes)") from None
    mine = model.config.layout
    if layout != mine:
        raise _bad(
            path,
            f"weights of the {layout} layout cannot initialise a {mine} network: choose a "
            f"profile of the {layout} layout (--profile)",
        )
    same_classes = their_classes == list(classes)
    state = model.state_dict()
    loaded, not_loaded = [], {}
    for key, target in state.items():
        source = tensors.get(key)
        if source is None:
            not_loaded[key] = "not in the file"
        elif key.startswith(model.output_layer + ".") and not same_classes:
            not_loaded[key] = (
                f"the classifier: {len(their_classes)} classes there, {len(classes)} here"
                if len(their_classes) != len(classes)
                else "the classifier: other class names"
            )
        elif source.shape != target.shape:
            not_loaded[key] = f"shape {tuple(source.shape)} there, {tuple(target.shape)} here"
        else:
            state[key] = source
            loaded.append(key)
    model.load_state_dict(state)
    return {
        "source": str(path),
        "sha256": file_sha256(path),
        "profile": saved.get("name"),
        "classes_match": same_classes,
        "loaded": loaded,
        "not_loaded": not_loaded,
    }


# --- training state: torch.save, loaded with weights_only=True ---------------------------------
def save_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """torch.save `state` atomically, wrapped with the format key STATE_FORMAT. Keep it to
    tensors, numbers, strings, None, lists, tuples and dicts (weights_only loading)."""
    state = dict(state)
    wrapped = {"format": STATE_FORMAT, "state": state, CHECKSUM_KEY: content_digest(state)}
    return atomic_write(path, lambda f: torch.save(wrapped, f))


def load_state(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The dict given to save_state. torch.load(weights_only=True): never runs code. The
    checksum is verified and every floating-point tensor must be finite (BadInput naming the
    file, and the tensor)."""
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError for a missing file
    if size == 0:
        raise _bad(path, "empty file, not an alexnet training state")
    try:
        with warnings.catch_warnings():
            # A plain pickle (protocol 4) warns before being refused: the ValueError says it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _bad(
            path, f"refused or corrupt pickle, not an alexnet training state ({first})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _bad(path, f"truncated or corrupt, not a readable training state ({first})") from None
    if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT or "state" not in obj:
        fmt = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise _bad(
            path, f"not an alexnet training state (format {fmt!r}, expected {STATE_FORMAT!r})"
        )
    saved = obj.get(CHECKSUM_KEY)
    if saved is not None and saved != content_digest(obj["state"]):
        raise _bad(path, _DAMAGED)
    check_finite(path, obj["state"])
    return obj["state"]


# --- random generators -------------------------------------------------------------------------
def capture_rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """Every global generator's state (Python, NumPy's legacy global, torch CPU and CUDA) and
    those of `generators`, as types that weights_only loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], *generators: torch.Generator) -> None:
    """Inverse of capture_rng_state (same generators in the same order)."""
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    saved = state.get("generators", [])
    if len(saved) != len(generators):
        raise ValueError(f"RNG state holds {len(saved)} generators, {len(generators)} given")
    for g, s in zip(generators, saved, strict=True):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    # random.setstate wants tuples (a JSON round trip would give lists).
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
