"""`alexnet prepare [SRC] OUT`: read an image source once, write a prepared store.

The work is cut into chunks of consecutive items of a split. A worker process turns one chunk
into one shard file (OUT/<split>/shard-NNNNN.bin) plus a small result file in OUT/.prepare/
(record lengths, labels, skipped files, the chunk's exact integer sums for the statistics, and
the shard's sha256), each written atomically (fileio: fsynced, renamed, the folder fsynced), so a
chunk is either wholly done or not at all. A killed prepare therefore resumes at the first
missing chunk; a shard whose bytes no longer match its checksum (a disk that lost them) is made
again. Only when every chunk is done are the index, the statistics and, last of all,
manifest.json written: a store without a manifest is never mistaken for a complete one
(open_store says it is incomplete).

One prepare at a time writes a store (fileio.exclusive_lock on OUT). A worker process that dies
(the OOM killer, a decoder crash) ends the command with WorkerDied, the finished chunks kept.
Files that are not regular files, larger than --max-file-mb or of more than --max-pixels are
skipped and reported, never read whole or decoded.

Why one file of this length: listing, chunked workers, resume and the statistics are the
one writer of a store, and share its on-disk invariants.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from alexnet.data import sources as src_mod
from alexnet.data.images import MAX_PIXELS, UnreadableImage, paper_image
from alexnet.data.listing import select_classes
from alexnet.data.store import (
    FORMAT,
    MANIFEST,
    VERSION,
    WORK_DIR,
    Store,
    decode_record,
    open_store,
    shard_name,
    stats_from_sums,
)
from alexnet.devices import available_cpus
from alexnet.errors import BadInput, WorkerDied
from alexnet.fileio import LOCK_NAME, MAX_FILE_BYTES, exclusive_lock, file_sha256, write_bytes

ENCODINGS = ("jpeg", "raw")
DEFAULT_QUALITY = 90


def default_chunk_size(n: int) -> int:
    """Items per chunk: a function of the split size only (never of the worker count), so a
    resumed prepare cuts the source exactly as the interrupted one did."""
    return int(min(1024, max(32, -(-n // 64))))


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# --- one chunk (runs in a worker process) -------------------------------------------------------

_G: dict = {}  # the source and parameters, inherited by forked workers


def encode_item(data, params: dict) -> tuple[bytes, np.ndarray]:
    """(record bytes, the stored planar pixels) of one item; UnreadableImage if unusable."""
    size, gray = params["size"], params["channels"] == 1
    # Sec. 2: shorter side to S, central S x S
    pic = paper_image(data, size, gray=gray, max_pixels=params.get("max_pixels", MAX_PIXELS))
    if params["encoding"] == "raw":
        planar = np.ascontiguousarray(pic[None] if gray else pic.transpose(2, 0, 1))
        return planar.tobytes(), planar
    buf = io.BytesIO()
    Image.fromarray(pic).save(buf, "JPEG", quality=params["jpeg_quality"])
    rec = buf.getvalue()
    # The statistics are those of the pixels the loader will see: the decoded record.
    return rec, decode_record(rec, "jpeg", params["channels"], size)


_SQUARES = np.arange(256, dtype=np.int64) ** 2


def _pixel_products(stored: np.ndarray) -> np.ndarray:
    """sum over pixels of x x^T for a planar uint8 (C, S, S) image, exactly, in integers.

    Not a float64 matmul: OpenBLAS takes milliseconds for this (C, S*S) shape, more than
    decoding the image. One channel: a histogram of the 256 values.
    """
    c = stored.shape[0]
    if c == 1:
        return np.array([[np.bincount(stored.ravel(), minlength=256) @ _SQUARES]])
    x = stored.reshape(c, -1).astype(np.int64)
    return np.einsum("ij,kj->ik", x, x)


def do_chunk(task: tuple[str, int, int, int]) -> tuple[str, int, int, int]:
    """Items start..end of a split into shard `chunk` and its result file."""
    split, chunk, start, end = task
    source: src_mod.Source = _G["source"]
    params: dict = _G["params"]
    out = Path(_G["out"])
    sp = source.splits[split]
    c, s = params["channels"], params["size"]
    train = split == "train"
    sum_image = np.zeros((c, s, s) if train else 0, dtype=np.uint32)
    sum_xxT = np.zeros((c, c), dtype=np.float64)
    records, lengths, labels, skipped = [], [], [], []
    digest = hashlib.sha256()  # of the source bytes, unreadable files included
    for j in range(start, end):
        ref = sp.refs[j]
        try:
            data, name, raw = source.read(ref)
        except OSError as e:  # vanished, unreadable, an I/O error: skip it, say why
            skipped.append(f"{ref}: cannot read ({e.strerror or e})")
            continue
        digest.update(hashlib.sha256(raw).digest())
        try:
            rec, stored = encode_item(data, params)
        except UnreadableImage as e:
            skipped.append(f"{name}: {e}")
            continue
        except MemoryError:
            raise
        except Exception as e:  # a decoder tripping over a malformed file: skip it too
            skipped.append(f"{name}: {type(e).__name__}: {e}".split("\n")[0])
            continue
        records.append(rec)
        lengths.append(len(rec))
        labels.append(int(sp.labels[j]))
        if train:
            # One streaming pass: exact integer sums (see store.stats_from_sums).
            sum_image += stored
            sum_xxT += _pixel_products(stored)
    shard = b"".join(records)
    write_bytes(out / split / shard_name(chunk), shard)
    write_bytes(
        out / WORK_DIR / f"{split}-{chunk:05d}.npz",
        _npz_bytes(
            shard_sha256=np.asarray(hashlib.sha256(shard).hexdigest()),
            lengths=np.asarray(lengths, dtype=np.int64),
            labels=np.asarray(labels, dtype=np.int64),
            sum_image=sum_image,
            sum_xxT=sum_xxT,
            skipped=np.asarray(json.dumps(skipped)),
            digest=np.asarray(digest.hexdigest()),
        ),
    )
    return split, chunk, end - start, len(skipped)


def _init_worker(source, params, out) -> None:
    _G.update(source=source, params=params, out=out)
    torch.set_num_threads(1)


# --- the whole job -----------------------------------------------------------------------------


def _chunks(source: src_mod.Source, chunk_size: int | None):
    for split, sp in source.splits.items():
        n = len(sp.refs)
        cs = chunk_size or default_chunk_size(n)
        for k, start in enumerate(range(0, n, cs)):
            yield split, k, start, min(n, start + cs)


def _chunk_done(out: Path, split: str, chunk: int) -> bool:
    """The chunk's shard and result file are there, and the shard's bytes are those its
    result recorded (its sha256: the right size is not enough, a disk may zero a file)."""
    res = out / WORK_DIR / f"{split}-{chunk:05d}.npz"
    shard = out / split / shard_name(chunk)
    if not (res.exists() and shard.exists()):
        return False
    try:
        with np.load(res) as z:
            if int(z["lengths"].sum()) != shard.stat().st_size:
                return False
            return str(z["shard_sha256"]) == file_sha256(shard)
    except Exception:  # a damaged (or older, checksum-less) result file: redo the chunk
        return False


def _check_out(out: Path, params: dict) -> str:
    """'new', 'resume' or 'done'; a clear error if OUT holds anything else."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"OUT {out} is a file, not a directory")
    if (out / MANIFEST).exists():
        try:
            old = json.loads((out / MANIFEST).read_text()).get("params")
        except (OSError, json.JSONDecodeError, AttributeError):
            old = None
        if _same_params(old, params):
            return "done"
        raise BadInput(
            f"OUT {out} already holds a prepared store made differently "
            f"({_differences(old, params)}); choose another OUT or delete it first"
        )
    state = out / WORK_DIR / "state.json"
    if state.exists():
        try:
            old = json.loads(state.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if _same_params(old, params):
            return "resume"
        raise BadInput(
            f"OUT {out} holds an interrupted prepare of something else "
            f"({_differences(old, params)}): re-run that command to finish it, or choose "
            "another OUT"
        )
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise BadInput(
            f"OUT {out} is not empty and holds no store: choose an empty or new directory"
        )
    return "new"


def _same_params(old, new: dict) -> bool:
    """Whether a store (or an interrupted prepare) was made with `new`'s parameters. A parameter
    added to prepare since (its key missing from `old`) matches when it has its default, None:
    a store made before `--classes` existed is the same store as one made without it."""
    if not isinstance(old, dict):
        return False
    keys = set(old) | set(new)
    return all(old.get(k) == new.get(k) and (k in old or new[k] is None) for k in keys)


def _differences(old, new: dict) -> str:
    if not isinstance(old, dict):
        return "its parameters are unreadable"
    keys = [k for k in new if old.get(k) != new.get(k)]
    shown = [k for k in keys if k not in ("listing_sha256", "listed")]
    if not shown:
        return "the source's list of images has changed"
    return "differs in " + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in shown[:4])


def prepare_store(
    src,
    out,
    kind: str | None = None,
    size: int = 256,
    workers: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    encoding: str = "jpeg",
    jpeg_quality: int = DEFAULT_QUALITY,
    limit: int | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    log=print,
    classes: list[str] | None = None,
    max_pixels: int = MAX_PIXELS,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> Store:
    """Prepare (or resume, or recognise as done) the store OUT from the source SRC.

    `classes`: only these classes (names or indices), relabelled in the order given.
    `max_pixels` and `max_file_bytes` bound what one image may cost a worker (files over them
    are skipped and reported); they decide only which files are skipped, so they are not part
    of what identifies the store."""
    if not 1 <= max_pixels <= MAX_PIXELS:
        raise BadInput(f"--max-pixels must be 1..{MAX_PIXELS} (Pillow's limit), got {max_pixels}")
    if max_file_bytes < 1:
        raise BadInput(f"--max-file-mb must be positive, got {max_file_bytes / 2**20:g}")
    if encoding not in ENCODINGS:
        raise BadInput(f"unknown --encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    if size < 1:
        raise BadInput(f"--size must be positive, got {size}")
    if not 1 <= jpeg_quality <= 100:
        raise BadInput(f"--jpeg-quality must be 1..100, got {jpeg_quality}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"OUT {out} is a file, not a directory")
    t0 = time.time()
    source = src_mod.open_source(src, kind, val_fraction, seed)
    source.max_file_bytes = max_file_bytes
    if source.kind in ("folder", "imagenet") and out.resolve().is_relative_to(
        Path(src).resolve()
    ):  # its files would become part of the source's listing
        raise BadInput(f"OUT {out} is inside SRC {src}: choose a directory outside the source")
    if classes is not None:
        source = select_classes(source, list(classes))
    log(f"{'detected' if kind is None else 'source'}: {source.description}")
    if limit is not None:
        for sp in source.splits.values():
            sp.refs, sp.labels = sp.refs[:limit], sp.labels[:limit]
    if not source.splits["train"].refs:
        raise BadInput(f"{src} has no training images")
    _warn_unheld_classes(source, log)
    params = {
        "format": FORMAT,
        "version": VERSION,
        "source": str(Path(src).resolve()),
        "kind": source.kind,
        "size": int(size),
        "channels": 1 if source.gray else 3,
        "encoding": encoding,
        "jpeg_quality": int(jpeg_quality) if encoding == "jpeg" else None,
        "val_fraction": val_fraction,
        "seed": int(seed),
        "limit": limit,
        "classes": None if classes is None else [str(c) for c in classes],
        "chunk_size": chunk_size,
        "listing_sha256": source.listing_digest(),
        "listed": {k: len(v.refs) for k, v in source.splits.items()},
    }
    if _check_out(out, params) != "done":
        out.mkdir(parents=True, exist_ok=True)
        # One writer at a time: a second prepare into OUT stops here (InUse) at once.
        with exclusive_lock(out):
            state = _check_out(out, params)  # again, now that no one else can change OUT
            if state != "done":
                work_params = dict(params, max_pixels=int(max_pixels))
                run = (chunk_size, workers, progress, log, t0)
                return _prepare(source, params, work_params, out, state, *run)
    log(f"{out} already holds this store, complete: nothing to do")
    return open_store(out)


def _prepare(
    source, params, work_params, out, state, chunk_size, workers, progress, log, t0
) -> Store:
    """The work of prepare_store, OUT locked: every chunk not done yet, then the store's files.
    `work_params`: the store's parameters and what the workers need beside them."""
    encoding, size = params["encoding"], params["size"]
    work = out / WORK_DIR
    for split in source.splits:
        (out / split).mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if state == "new":
        write_bytes(work / "state.json", json.dumps(params, indent=1).encode())
    for d in [work, *(out / s for s in source.splits)]:  # leftovers of a killed write
        for tmp in d.glob("*.tmp"):
            tmp.unlink()

    tasks = list(_chunks(source, chunk_size))
    todo = [t for t in tasks if not _chunk_done(out, t[0], t[1])]
    total = sum(t[3] - t[2] for t in tasks)
    done_items = total - sum(t[3] - t[2] for t in todo)
    if state == "resume":
        log(f"resuming: {len(tasks) - len(todo)} of {len(tasks)} chunks already prepared")
    workers = max(1, min(workers or available_cpus(), len(todo) or 1))
    log(f"preparing {total} images into {out} ({encoding}, {size}x{size}) with {workers} workers")
    _run_chunks(source, work_params, out, todo, workers, total, done_items, progress)
    return _finish(source, params, out, tasks, time.time() - t0, log)


def _run_chunks(source, params, out, todo, workers, total, done_items, progress) -> None:
    bar = tqdm(
        total=total,
        initial=done_items,
        unit="img",
        disable=not progress,
        smoothing=0.1,
        file=sys.stderr,
        desc="prepare",
    )
    skipped = 0
    try:
        if workers == 1:
            # In this process: the worker set-up limits torch to one thread; give the caller
            # (a training run in the same process, say) its threads back afterwards.
            threads = torch.get_num_threads()
            try:
                _init_worker(source, params, str(out))
                for _split, _chunk, n, k in map(do_chunk, todo):
                    skipped += k
                    bar.update(n)
                    bar.set_postfix(skipped=skipped, refresh=False)
            finally:
                torch.set_num_threads(threads)
        else:
            for _split, _chunk, n, k in _pool_map(source, params, out, todo, workers):
                skipped += k
                bar.update(n)
                bar.set_postfix(skipped=skipped, refresh=False)
    finally:
        bar.close()
        _G.clear()


def _pool_map(source, params, out: Path, todo, workers: int):
    """do_chunk over `todo` in `workers` forked processes, results as they come. A worker that
    dies (SIGKILL from the OOM killer, a segfault in a decoder) is WorkerDied at once: a
    multiprocessing.Pool would wait forever for the task it lost. The chunks already finished
    are on disk; so a rerun resumes."""
    ex = ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("fork"),
        initializer=_init_worker,
        initargs=(source, params, str(out)),
    )
    ok = False
    try:
        pending = {ex.submit(do_chunk, t) for t in todo}
        finished = 0
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    raise WorkerDied(
                        f"a prepare worker process died (killed: out of memory, or a crash "
                        f"decoding an image) while preparing {out}; the {finished} chunks "
                        f"finished in this run are kept: run the same command again to resume "
                        f"(with fewer --workers if memory is short)"
                    ) from None
                finished += 1
                yield result
        ok = True
    finally:
        if not ok:  # an error or Ctrl-C: no waiting for the other workers' chunks (redone later)
            # (no public way to stop the workers before Python 3.14's kill_workers)
            for proc in list((getattr(ex, "_processes", None) or {}).values()):
                proc.kill()
        ex.shutdown(wait=ok, cancel_futures=True)


def _finish(source, params, out: Path, tasks, elapsed: float, log) -> Store:
    work = out / WORK_DIR
    counts, skipped_counts, content, total_bytes = {}, {}, {}, {}
    report: dict = {"skipped": {}, "empty_classes": {}}
    sum_image = sum_xxT = None
    for split in source.splits:
        rows, labels, skipped = [], [], []
        digest = hashlib.sha256()
        for s, chunk, _a, _b in tasks:
            if s != split:
                continue
            with np.load(work / f"{split}-{chunk:05d}.npz") as z:
                lengths = z["lengths"]
                offsets = np.concatenate([[0], np.cumsum(lengths)])[:-1].astype(np.int64)
                rows.append(np.stack([np.full_like(lengths, chunk), offsets, lengths], axis=1))
                labels.append(z["labels"])
                skipped += json.loads(str(z["skipped"]))
                digest.update(bytes.fromhex(str(z["digest"])))
                if split == "train":
                    si, sx = z["sum_image"].astype(np.float64), z["sum_xxT"]
                    sum_image = si if sum_image is None else sum_image + si
                    sum_xxT = sx if sum_xxT is None else sum_xxT + sx
        index = np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)
        lab = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        write_bytes(out / split / "index.npy", _npy_bytes(index.astype(np.int64)))
        write_bytes(out / split / "labels.npy", _npy_bytes(lab.astype(np.int64)))
        counts[split] = len(lab)
        skipped_counts[split] = len(skipped)
        total_bytes[split] = int(index[:, 2].sum())
        content[split] = digest.hexdigest()
        report["skipped"][split] = skipped
        present = np.bincount(lab, minlength=len(source.classes))
        listed = np.bincount(source.splits[split].labels, minlength=len(source.classes))
        report["empty_classes"][split] = [
            source.classes[k] for k in range(len(source.classes)) if listed[k] and not present[k]
        ]
    if counts["train"] == 0:
        raise BadInput(
            f"every training image of {params['source']} was unreadable "
            f"(see {out / WORK_DIR}); nothing to prepare"
        )
    stats = stats_from_sums(sum_image, sum_xxT, counts["train"])
    write_bytes(out / "stats.npz", stats.to_bytes())
    write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
    n_all = sum(counts.values())
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "kind": source.kind,
        "classes": source.classes,
        "class_names": source.class_names,
        "splits": list(source.splits),
        "counts": counts,
        "skipped": skipped_counts,
        "image_size": params["size"],
        "channels": params["channels"],
        "encoding": params["encoding"],
        "jpeg_quality": params["jpeg_quality"],
        "layout": "records: planar uint8 (C, S, S); <split>/index.npy: shard, offset, length",
        "preprocessing": (
            "EXIF orientation; RGB (grey replicated on load, alpha dropped, CMYK and 16-bit "
            f"converted); shorter side rescaled to {params['size']} (bilinear), central "
            f"{params['size']}x{params['size']} crop (Sec. 2)"
        ),
        "source": {
            "path": params["source"],
            "description": source.description,
            "listing_sha256": params["listing_sha256"],
            "content_sha256": content,
            "files_sha256": {Path(f).name: file_sha256(f) for f in source.files},
        },
        "stats": {
            "images": stats.count,
            "channel_mean": stats.channel_mean.tolist(),
            "channel_std": stats.channel_std.tolist(),
            "eigval": stats.eigval.tolist(),
            "eigvec": stats.eigvec.tolist(),
        },
        "bytes": total_bytes,
        "bytes_per_image": sum(total_bytes.values()) / max(1, n_all),
        "params": params,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # The manifest last, atomically: from here on the store is complete.
    write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    shutil.rmtree(work, ignore_errors=True)
    n_skip = sum(skipped_counts.values())
    log(
        f"prepared {out}: "
        + ", ".join(f"{s} {counts[s]}" for s in source.splits)
        + f" images, {manifest['bytes_per_image'] / 1024:.1f} KiB/image, {elapsed:.1f} s"
    )
    if n_skip:
        log(f"skipped {n_skip} unreadable files; they are listed in {out / 'report.json'}")
    for split, names in report["empty_classes"].items():
        if names:
            log(f"warning: no readable {split} image in classes {', '.join(names[:10])}")
    return open_store(out)


def _warn_unheld_classes(source, log) -> None:
    """A warning line when a class has training images but none in val (a small class split by
    --val-fraction: 10% of 5 rounds to 0): nothing would measure the error on that class."""
    if "val" not in source.splits:
        return
    train = np.bincount(source.splits["train"].labels, minlength=len(source.classes))
    val = np.bincount(source.splits["val"].labels, minlength=len(source.classes))
    missing = [str(c) for c, t, v in zip(source.classes, train, val, strict=True) if t and not v]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        smallest = int(min(train[train > 0]))
        fix = f"--val-fraction {math.ceil(100 / smallest) / 100:.2f} holds out one of each, or "
        log(
            f"warning: no val image of {len(missing)} of {len(source.classes)} classes ({shown}): "
            f"their error is not measured; with {smallest} images in a class, "
            + (fix if smallest >= 2 else "")
            + "give val/<class>/ folders"
        )


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()
