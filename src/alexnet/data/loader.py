"""The training and evaluation loaders over a prepared store.

Workers produce whole batches (one `__getitem__` per batch, no per-sample collation): read the
records (one pread each), decode them (libjpeg-turbo) or view the raw pixels, and cut the crops
into a uint8 batch allocated directly in shared memory, so handing it over copies nothing. The
float work (mean subtraction, lighting, scale) is done where the batch is used: on the GPU as
batched tensor ops on the uint8 crops (4x fewer bytes to copy than float), on the CPU image by
image in the consumer's process into recycled buffers (a float batch made in a worker would
cost more in shared-memory page faults than the arithmetic itself).

Every batch travels with its per-image parameters as tensors: pos (n, 3) int64 = crop top,
left and reflection, and the lighting offsets (n, 3) float32. On a GPU they are pinned with the
batch and copied without waiting (non_blocking): a copy from ordinary host memory would make the
host wait until every kernel queued before it has run, four times a batch.

Decoding on the GPU (`decode="gpu"`, JPEG stores): the workers only read the records, and the
training process decodes a whole batch at once with torchvision's nvJPEG decoder (the hardware
JPEG engines of A100/H100-class GPUs), then cuts the crops there; a background thread does it
one batch ahead, because the decoder returns only when its batch is decoded. `decode="auto"`
(the default) chooses it on CUDA when a short measurement at the start says the GPU decodes
faster than the workers would (`measure_decode`); on a CPU the workers decode.

Workers live as long as the loader (persistent): a training run forks them once, not once an
epoch, since a batch is named by (epoch, batch) and the views are a function of (seed, epoch,
image). `TrainLoader.epoch(e)` hands out the batches of epoch e from the same workers.

Sharding (DDP): the global batch b of an epoch is positions [b*B*W, (b+1)*B*W) of the epoch's
permutation (B = batch_size per rank, W = world_size); rank r takes the contiguous slice
[b*B*W + r*B, b*B*W + (r+1)*B). So N ranks see exactly the global batches that one rank with
batch_size B*N sees, and the views (a function of seed, epoch, image) are the same too.

Why one file of this length: the training loader, its persistent workers and their shared
buffers, and the evaluation loader are one data path with one set of invariants.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  (its exit handler registered before ours)
import os
import queue
import signal
import sys
import threading
import time
import warnings
import weakref

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from alexnet.config import DataConfig
from alexnet.data.store import Store, decode_record
from alexnet.data.views import ViewSpec, epoch_permutation
from alexnet.devices import available_cpus, select_device
from alexnet.errors import BadInput, UserError

DECODES = ("auto", "cpu", "gpu")

try:
    # torchvision's batched nvJPEG decoder (torchvision >= 0.19), called as an operator: 0.29's
    # Python wrapper warns of its deprecation on every call.
    import torchvision.io  # noqa: F401  (registers the image operators)
    from torchvision.io import ImageReadMode

    _CUDA_JPEG = torch.ops.image.decode_jpegs_cuda
    _GRAY, _RGB = ImageReadMode.GRAY.value, ImageReadMode.RGB.value
except (ImportError, AttributeError, RuntimeError):  # pragma: no cover
    _CUDA_JPEG = None


def default_loader_workers() -> int:
    """Loader worker processes: this node's cores less the one the training process needs,
    shared among the training processes of the node (torchrun's LOCAL_WORLD_SIZE)."""
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, (available_cpus() - 1) // local_ranks)


def _shared_empty(shape, dtype) -> torch.Tensor:
    """A tensor in shared memory when in a worker, so sending it to the main process is free
    (the same allocation torch's default_collate makes)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    try:
        numel = int(np.prod(shape))
        storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
        return torch.empty(0, dtype=dtype).new(storage).view(shape)
    except (AttributeError, RuntimeError):  # a torch without this private allocator
        return torch.empty(shape, dtype=dtype).share_memory_()


# --- decoding a batch where it is used (decode="gpu") ------------------------------------------


def gpu_decode_available() -> bool:
    return torch.cuda.is_available() and _CUDA_JPEG is not None


def decode_batch(blob: torch.Tensor, lengths: torch.Tensor, store: Store, device) -> torch.Tensor:
    """uint8 (n, C, S, S) on `device` from n records packed back to back in `blob` (uint8,
    on the host). JPEG on CUDA: one batched nvJPEG call; on a CPU: libjpeg-turbo image by image
    (the same path, for tests and machines without a GPU); raw records: a reshape."""
    device = torch.device(device)
    n, c, s = len(lengths), store.channels, store.image_size
    if store.encoding == "raw":
        return blob.view(n, c, s, s).to(device, non_blocking=True)
    parts = list(blob.split(lengths.tolist()))
    if device.type == "cuda":
        return torch.stack(_CUDA_JPEG(parts, _GRAY if c == 1 else _RGB, device))
    out = torch.empty((n, c, s, s), dtype=torch.uint8)
    for k, part in enumerate(parts):
        out[k] = torch.from_numpy(decode_record(part.numpy(), store.encoding, c, s))
    return out


def _pack_records(bufs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """Records back to back in one uint8 tensor (shared memory in a worker) and their lengths."""
    lengths = np.fromiter((len(b) for b in bufs), dtype=np.int64, count=len(bufs))
    blob = _shared_empty((int(lengths.sum()),), torch.uint8)
    blob.numpy()[:] = np.frombuffer(b"".join(bufs), dtype=np.uint8)
    return blob, torch.from_numpy(lengths)


_MEASURED: dict = {}  # (store, device, workers) -> measure_decode's result, once per process


def measure_decode(store: Store, device, workers: int, split: str = "train", images: int = 256):
    """Which decodes a batch faster here: the GPU (nvJPEG, one batched call), or `workers`
    worker processes (libjpeg-turbo, timed on one core of this process and multiplied by the
    workers: an upper bound for the workers, so the GPU is chosen only when it clearly wins;
    nvJPEG's software path, for JPEGs its hardware engines do not take, decodes on the host in
    this process and is measured as such). Returns {"decode": "gpu" | "cpu", "gpu_images_per_s",
    "cpu_images_per_s", "workers", "images"}; measured once per process and store."""
    device = torch.device(device)
    key = (str(store.path), str(device), workers)
    if key in _MEASURED:
        return _MEASURED[key]
    n = min(images, store.size(split))
    bufs = store.records(split, np.arange(n))
    c, s = store.channels, store.image_size
    crop = np.empty((c, s, s), np.uint8)
    t0 = time.perf_counter()
    for b in bufs:
        crop[...] = decode_record(b, store.encoding, c, s)
    cpu_rate = n * max(1, workers) / (time.perf_counter() - t0)
    blob, lengths = _pack_records(bufs)
    if device.type == "cuda":
        blob = blob.pin_memory()
    decode_batch(blob, lengths, store, device)  # the decoder's set-up, first call only
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        decode_batch(blob, lengths, store, device)
    _sync(device)
    gpu_rate = 3 * n / (time.perf_counter() - t0)
    result = {
        "decode": "gpu" if gpu_rate > cpu_rate else "cpu",
        "gpu_images_per_s": round(gpu_rate, 1),
        "cpu_images_per_s": round(cpu_rate, 1),
        "workers": workers,
        "images": n,
    }
    _MEASURED[key] = result
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_decode(decode: str, store: Store, device, workers: int, split: str = "train") -> str:
    """ "cpu" (the workers decode) or "gpu" (the batch's device decodes) for a loader option."""
    if decode not in DECODES:
        raise BadInput(f"unknown decode {decode!r}; valid: {', '.join(DECODES)}")
    device = torch.device(device)
    cuda_jpeg = device.type == "cuda" and store.encoding == "jpeg"
    if decode == "gpu" and cuda_jpeg and _CUDA_JPEG is None:
        raise BadInput("decode=gpu: this torchvision has no CUDA JPEG decoder (nvJPEG)")
    if decode != "auto":
        return decode
    if not cuda_jpeg or _CUDA_JPEG is None:
        return "cpu"
    try:
        return measure_decode(store, device, workers, split)["decode"]
    except RuntimeError as e:  # an nvJPEG failure: the workers decode, as everywhere else
        warnings.warn(f"GPU JPEG decoding failed ({e}); the loader workers decode", stacklevel=2)
        return "cpu"


# --- the batches the workers make --------------------------------------------------------------


class _Batches(Dataset):
    """What a worker returns for a batch: (payload, lengths, labels, pos, offsets).

    payload: the uint8 crops (n, C, c, c), cut in the worker (decode "cpu"), or the records
    back to back (decode "gpu"; `lengths` then gives their sizes, else None). pos: int64 (n, 3)
    crop top, left, reflection; offsets: float32 (n, 3) lighting offsets or None. With
    `per_image` views of each image (evaluation), row r of pos is a view of image r // per_image.
    """

    def __init__(self, store: Store, split: str, gpu_decode: bool):
        self.store, self.split, self.gpu_decode = store, split, gpu_decode

    def _make(self, spec: ViewSpec, idx, ys, xs, flips, offsets, per_image: int = 1):
        labels = torch.from_numpy(self.store.labels(self.split)[idx].astype(np.int64))
        pos = torch.from_numpy(np.stack([ys, xs, flips], 1).astype(np.int64))
        off = None if offsets is None else torch.from_numpy(np.asarray(offsets, np.float32))
        st = self.store
        if self.gpu_decode:
            blob, lengths = _pack_records(st.records(self.split, idx))
            return blob, lengths, labels, pos, off
        c = spec.crop
        u8t = _shared_empty((len(ys), st.channels, c, c), torch.uint8)
        u8 = u8t.numpy()
        # A corrupt record is BadInput naming the store, the split and the index (Store.planars).
        for k, planar in enumerate(st.planars(self.split, idx)):
            for t in range(per_image):
                r = k * per_image + t
                spec.cut(planar, int(ys[r]), int(xs[r]), bool(flips[r]), u8[r])
        return u8t, None, labels, pos, off


class _TrainBatches(_Batches):
    """Item (epoch, b, lighting) is global batch b of that epoch (this rank's shard of it),
    fully determined by (seed, epoch, b): the same whichever worker makes it, whenever."""

    def __init__(self, store, split, specs, batch_size, seed, rank, world, gpu_decode: bool):
        super().__init__(store, split, gpu_decode)
        self.specs = specs  # {lighting on: ViewSpec, off: ViewSpec}
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world = rank, world
        self.positions_per_epoch = 0  # set by TrainLoader: global batches x their size
        self._perms: dict[int, np.ndarray] = {}

    def positions(self, b: int) -> np.ndarray:
        g = self.batch_size * self.world
        start = b * g + self.rank * self.batch_size
        return np.arange(start, start + self.batch_size)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # the epoch ending and the one starting
                self._perms.pop(min(self._perms))
            n = self.store.size(self.split)
            # An epoch longer than the split (train.min_steps) cycles it: pass p in its own
            # order, a function of (seed, epoch, p); pass 0 is the epoch's usual order.
            passes = max(1, -(-self.positions_per_epoch // n))
            self._perms[epoch] = np.concatenate(
                [epoch_permutation(n, self.seed, epoch, p) for p in range(passes)]
            )
        return self._perms[epoch]

    def __getitem__(self, key):
        epoch, b, lighting = key
        spec = self.specs[bool(lighting)]
        pos = self.positions(b)
        idx = self._perm(epoch)[pos]
        ys, xs, flips, offsets = spec.train_params(self.seed, epoch, idx, pos)
        return self._make(spec, idx, ys, xs, flips, offsets)


def spread_indices(size: int, n: int | None, labels: np.ndarray | None = None) -> np.ndarray:
    """n indices of 0..size-1, sorted (all of them for None or n >= size). With `labels` (one
    per image) a class-balanced sample: every class gets n // classes images, or all it has
    when it has fewer, the rest shared out one each (so the counts differ by at most one
    where the classes allow), each class's spread evenly over its images. Without, n spread
    evenly over the split: balanced only where the store is sorted by class (folder trees;
    Fashion-MNIST's test set is not: 500 of its images spread so gave 37-63 per class)."""
    if n is None or n >= size:
        return np.arange(size)
    if n < 1:
        raise BadInput(f"limit must be at least 1, got {n}")
    if labels is None:
        return np.unique(np.linspace(0, size - 1, n).round().astype(np.int64))
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    quota, left = [0] * len(members), n
    # Smallest classes first: one that cannot fill its equal share leaves the rest to others.
    order = sorted(range(len(members)), key=lambda c: len(members[c]))
    for j, c in enumerate(order):
        quota[c] = min(len(members[c]), left // (len(order) - j))
        left -= quota[c]
    for c in range(len(members)):  # the remainder, one more to each class with room, in order
        if left and quota[c] < len(members[c]):
            quota[c], left = quota[c] + 1, left - 1
    picked = [m[np.arange(q) * len(m) // q] for m, q in zip(members, quota, strict=True) if q]
    return np.sort(np.concatenate(picked))


class _EvalBatches(_Batches):
    """Rank r of W takes the r-th of W contiguous, equal (+-1) blocks of the images (all, or
    `limit` spread evenly over the split), in batches (the last may be short): the ranks share
    the work evenly whatever the batch size."""

    def __init__(self, store, split, spec, batch_size, views, rank, world, limit, gpu_decode):
        super().__init__(store, split, gpu_decode)
        self.spec, self.batch_size, self.views = spec, batch_size, views
        self.index = spread_indices(store.size(split), limit, store.labels(split))
        n = len(self.index)
        self.lo, self.hi = rank * n // world, (rank + 1) * n // world
        self.starts = list(range(self.lo, self.hi, batch_size))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, j: int):
        s = self.starts[j]
        idx = self.index[s : min(self.hi, s + self.batch_size)]
        pos, fl = self.spec.eval_layout(self.views)
        ys = np.tile([p[0] for p in pos], len(idx))
        xs = np.tile([p[1] for p in pos], len(idx))
        flips = np.tile(fl, len(idx))
        return self._make(self.spec, idx, ys, xs, flips, None, per_image=self.views)


_POOL: list[np.ndarray] = []  # output arrays of the CPU path, shared by the loaders of a process


def _buffer(shape) -> np.ndarray:
    """A float32 output array, recycled once the consumer has dropped every tensor made from
    it (its reference count says so), else new: no page faults in steady state, and at most
    three batches' worth kept (one in use, one being made, one spare)."""
    for a in _POOL:
        if a.shape == shape and sys.getrefcount(a) <= 3:  # _POOL, `a`, getrefcount's argument
            return a
    a = np.empty(shape, np.float32)
    _POOL.append(a)
    if len(_POOL) > 3:
        _POOL.pop(0)
    return a


def _worker_message(e: BaseException) -> str:
    """The message of the exception a DataLoader worker raised, from the text DataLoader
    re-raises it with ("Caught X in DataLoader worker ... Original Traceback ... X: msg")."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    head = f"{type(e).__module__}.{type(e).__qualname__}: "
    return last[len(head) :] if last.startswith(head) else last


def _worker_init(worker_id: int) -> None:
    """A loader worker ignores SIGINT and SIGTERM: they are the training process's to act on.
    Ctrl-C and Slurm's scancel (systemd too) signal the whole process group; a worker that
    died of it first made the trainer fail ("DataLoader worker ... killed by signal") before
    its own handler could save a checkpoint, and one that inherited that handler printed the
    interrupt line once more. The trainer stops its workers itself (close), and a worker
    whose parent is gone exits (DataLoader's watchdog)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _as_is(batch):
    """The batch exactly as the worker made it (the default would turn arrays into tensors)."""
    return batch


class _Keys(Sampler):
    """The items of the next pass (set before each): one persistent DataLoader serves them all."""

    def __init__(self):
        self.keys: list = []

    def __iter__(self):
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


class _Workers:
    """Worker processes making a dataset's batches, started at the first pass and kept until
    close(): one fork per loader, not one per epoch (16 workers forked from a process holding
    a CUDA context cost about a second)."""

    def __init__(self, dataset: _Batches, workers: int, device: torch.device):
        self.dataset, self.workers, self.device = dataset, workers, device
        self._keys = _Keys()
        self._dl: DataLoader | None = None
        _LIVE.add(self)

    def batches(self, keys):
        """The workers' batches for `keys`, in order."""
        if self.workers == 0:
            for k in keys:
                yield self.dataset[k]
            return
        if self._dl is None:
            self._dl = DataLoader(
                self.dataset,
                batch_size=None,
                sampler=self._keys,
                num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=2,
                persistent_workers=True,
                collate_fn=_as_is,
                worker_init_fn=_worker_init,
                # Its own generator: creating an iterator draws a seed, which from torch's global
                # generator would shift the dropout masks with the number of workers and passes
                # (the views are hashed and need no seed).
                generator=torch.Generator().manual_seed(0),
            )
        self._keys.keys = list(keys)
        try:
            yield from self._dl
        except UserError as e:
            # DataLoader re-raises a worker's exception with the worker's whole traceback as
            # its message: a user error (a corrupt record) is one line, its own.
            raise type(e)(_worker_message(e)) from None

    def worker_pids(self) -> list[int]:
        it = getattr(self._dl, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", [])]

    def close(self) -> None:
        """Stop the workers (they also stop with the process)."""
        _stop_workers(self._dl)
        self._dl = None


# The workers ignore SIGTERM (_worker_init), so multiprocessing's exit handler, which
# terminates daemonic children with SIGTERM and then joins them, would wait forever for the
# workers of a loader nobody closed (one kept alive by a traceback, say): the process never
# exits. Every loader still open is closed first, at exit: atexit runs its handlers last
# registered first, and multiprocessing.util (imported above, with torch) registered its own
# before this module's.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    for w in list(_LIVE):
        w.close()


def _stop_workers(dl: DataLoader | None) -> None:
    """Ask a DataLoader's persistent workers to exit and join them (a no-op once done)."""
    it = getattr(dl, "_iterator", None)
    if it is not None:
        it._shutdown_workers()


def _ahead(items, fn, device: torch.device, depth: int = 2):
    """fn(item) for every item, computed by a background thread up to `depth` items ahead (the
    nvJPEG call returns only when its batch is decoded; meanwhile the training thread queues
    the next step). Stops the thread when the consumer stops."""
    out: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            select_device(device)  # the current CUDA device is per thread
            for item in items:
                if not put(("batch", fn(item))):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, raised there
            put(("error", e))
        finally:
            items.close()

    thread = threading.Thread(target=work, name="alexnet-decode", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = out.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


class _Loader:
    """Iterates (images, labels) on `device` over one pass of keys (an epoch of training
    batches, or the evaluation batches). Iterating it again reuses the same workers."""

    def __init__(self, workers: _Workers, keys, spec: ViewSpec, device, views: int, length: int):
        self.workers = workers
        self.keys = list(keys)
        self.spec = spec
        self.device = torch.device(device)
        self.views = views
        self.length = length

    def __len__(self) -> int:
        return self.length

    @property
    def decode(self) -> str:
        return "gpu" if self.workers.dataset.gpu_decode else "cpu"

    def close(self) -> None:
        self.workers.close()

    def _deliver(self, batch):
        payload, lengths, labels, pos, offsets = batch
        dev, spec = self.device, self.spec
        if lengths is None and dev.type == "cpu":
            # The CPU path: the float work image by image with numpy, into a recycled buffer.
            p = pos.numpy()
            out = _buffer((payload.shape[0], 3, *payload.shape[2:]))
            off = None if offsets is None else offsets.numpy()
            images = spec.finish(payload, p[:, 0], p[:, 1], p[:, 2] != 0, off, out=out)
        else:
            # The parameters come with the batch, pinned: copies that do not wait for the GPU.
            pos = pos.to(dev, non_blocking=True)
            if offsets is not None:
                offsets = offsets.to(dev, non_blocking=True)
            ys, xs, flips = pos[:, 0], pos[:, 1], pos[:, 2]
            if lengths is None:
                u8 = payload.to(dev, non_blocking=True)
            else:
                whole = decode_batch(payload, lengths, self.workers.dataset.store, dev)
                u8 = spec.cut_torch(whole, ys, xs, flips, per_image=self.views)
            images = spec.finish_torch(u8, ys, xs, flips, offsets)
        labels = labels.to(dev, non_blocking=True)
        if self.views == 10:
            images = images.view(-1, 10, *images.shape[1:])
        return images, labels

    def __iter__(self):
        batches = self.workers.batches(self.keys)
        if self.workers.dataset.gpu_decode:
            yield from _ahead(batches, self._deliver, self.device)
        else:
            for batch in batches:
                yield self._deliver(batch)


def _spec(store: Store, data: DataConfig, lighting: bool, stats=None) -> ViewSpec:
    # stats: the store's own statistics unless given (fine-tuning may keep the pre-trained's)
    stats = store.stats if stats is None else stats
    return ViewSpec.build(data, stats, store.image_size, lighting=lighting)


class TrainLoader:
    """Training batches epoch after epoch from one set of worker processes:
    `loader.epoch(e, start_batch)` iterates (float32 (B, 3, c, c) on device, int64 (B,) labels)
    of epoch e. len() is the number of batches in an epoch (drop_last over global batches of
    batch_size * world_size). `close()` stops the workers."""

    def __init__(
        self,
        store: Store,
        data: DataConfig,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
        device="cpu",
        split: str = "train",
        decode: str = "auto",
        stats=None,  # the store's own statistics unless given (fine-tuning: --init-stats init)
        # Batches per epoch (the trainer's epoch length, config.RunSpec.steps_per_epoch): the
        # first N of each epoch's order, or more than the split holds, which then cycles (each
        # pass in its own order); default every whole global batch of the split.
        epoch_batches: int | None = None,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise BadInput(f"bad batch_size/rank/world_size {batch_size}/{rank}/{world_size}")
        n = store.size(split)
        self.num_batches = n // (batch_size * world_size)
        if epoch_batches is not None:  # fewer (a budget), or more: the split cycled
            self.num_batches = epoch_batches if n >= batch_size * world_size else 0
        if self.num_batches == 0:
            raise BadInput(
                f"the {split} split has {n} images, fewer than one global batch of "
                f"{batch_size * world_size}"
            )
        self.workers = default_loader_workers() if workers is None else workers
        self.device = torch.device(device)
        self.specs = {on: _spec(store, data, on, stats) for on in (True, False)}
        self.decode = resolve_decode(decode, store, self.device, self.workers, split)
        ds = _TrainBatches(
            store, split, self.specs, batch_size, seed, rank, world_size, self.decode == "gpu"
        )
        ds.positions_per_epoch = self.num_batches * batch_size * world_size
        self._workers = _Workers(ds, self.workers, self.device)

    def __len__(self) -> int:
        return self.num_batches

    def epoch(self, epoch: int, start_batch: int = 0, lighting: bool = True) -> _Loader:
        """Batches start_batch .. len()-1 of epoch `epoch`, exactly those an uninterrupted epoch
        yields there. `lighting=False` turns PCA lighting off (cuda-convnet switched colour
        noise off at epoch 67)."""
        if not 0 <= start_batch <= self.num_batches:
            raise BadInput(f"start_batch {start_batch} outside 0..{self.num_batches}")
        keys = [(epoch, b, bool(lighting)) for b in range(start_batch, self.num_batches)]
        spec = self.specs[bool(lighting)]
        return _Loader(self._workers, keys, spec, self.device, 1, self.num_batches)

    def worker_pids(self) -> list[int]:
        return self._workers.worker_pids()

    def close(self) -> None:
        self._workers.close()


def make_train_loader(
    store: Store,
    data: DataConfig,
    batch_size: int,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int | None = None,
    device="cpu",
    lighting: bool = True,
    split: str = "train",
    decode: str = "auto",
    stats=None,
):
    """Training batches of one epoch: (float32 (B, 3, c, c) on device, int64 (B,) labels).

    len() is the number of batches in the epoch (drop_last over global batches of
    batch_size * world_size); iteration yields batches start_batch .. len()-1, exactly those an
    uninterrupted epoch would yield there. `lighting=False` turns PCA lighting off (cuda-convnet
    switched colour noise off at epoch 67). For many epochs, TrainLoader keeps its workers."""
    loader = TrainLoader(store, data, batch_size, seed, rank, world_size, workers, device, split,
                         decode, stats)  # fmt: skip
    return loader.epoch(epoch, start_batch, lighting=lighting)


def make_eval_loader(
    store: Store,
    data: DataConfig,
    batch_size: int,
    views: int = 1,
    split: str = "val",
    workers: int | None = None,
    device="cpu",
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    decode: str = "auto",
    stats=None,
):
    """Every image of `split` (or `limit` of them spread evenly over it, see spread_indices)
    exactly once, in store order (rank r of W gets the r-th of W contiguous blocks; the last
    batch may be short): images (B, 3, c, c) for views=1 (the centre crop) or (B, 10, 3, c, c)
    for views=10 (ten_crop order), mean subtracted, no lighting. Iterating it again (every
    epoch's validation) reuses its workers; close() stops them."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise BadInput(f"bad batch_size/rank/world_size {batch_size}/{rank}/{world_size}")
    workers = default_loader_workers() if workers is None else workers
    device = torch.device(device)
    spec = _spec(store, data, lighting=False, stats=stats)
    spec.eval_layout(views)  # validates views
    gpu = resolve_decode(decode, store, device, workers, split) == "gpu"
    ds = _EvalBatches(store, split, spec, batch_size, views, rank, world_size, limit, gpu)
    return _Loader(_Workers(ds, workers, device), range(len(ds)), spec, device, views, len(ds))
