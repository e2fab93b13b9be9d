"""The training and evaluation loaders over a prepared store.

Workers produce whole batches (one `__getitem__` per batch, no per-sample collation): read the
records (one pread each), decode them (libjpeg-turbo) or view the raw pixels, and cut the crops
into a uint8 batch allocated directly in shared memory, so handing it over copies nothing. The
float work (mean subtraction, lighting, scale) is done where the batch is used: on the GPU as
batched tensor ops on the uint8 crops (4x fewer bytes to copy than float), on the CPU image by
image in the consumer's process into recycled buffers (~0.1 ms per image; a float batch made in
a worker would cost more in shared-memory page faults than the arithmetic itself).

Sharding (DDP): the global batch b of an epoch is positions [b*B*W, (b+1)*B*W) of the epoch's
permutation (B = batch_size per rank, W = world_size); rank r takes the contiguous slice
[b*B*W + r*B, b*B*W + (r+1)*B). So N ranks see exactly the global batches that one rank with
batch_size B*N sees, and the views (a function of seed, epoch, image) are the same too.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from alexnet.config import DataConfig
from alexnet.data.store import Store
from alexnet.data.views import ViewSpec, epoch_permutation
from alexnet.devices import available_cpus
from alexnet.errors import BadInput, UserError


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


def _read_crops(store: Store, split: str, spec: ViewSpec, idx, ys, xs, flips, out) -> None:
    """uint8 crops (n, C, c, c) of images idx into `out` (a corrupt record: BadInput naming
    the store, split and index)."""
    for k, planar in enumerate(store.planars(split, idx)):
        spec.cut(planar, int(ys[k]), int(xs[k]), bool(flips[k]), out[k])


class _TrainBatches(Dataset):
    """Item j is global batch start_batch + j (this rank's shard of it), fully determined by
    (seed, epoch, batch): the same whichever worker makes it."""

    def __init__(
        self,
        store,
        split,
        spec,
        batch_size,
        seed,
        epoch,
        start_batch,
        rank,
        world,
        num_batches: int,
    ):
        self.store, self.split, self.spec = store, split, spec
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.start_batch, self.rank, self.world = start_batch, rank, world
        self.num_batches = num_batches
        self._perm = None

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def positions(self, b: int) -> np.ndarray:
        g = self.batch_size * self.world
        start = b * g + self.rank * self.batch_size
        return np.arange(start, start + self.batch_size)

    def __getitem__(self, j: int):
        if self._perm is None:
            self._perm = epoch_permutation(self.store.size(self.split), self.seed, self.epoch)
        pos = self.positions(self.start_batch + j)
        idx = self._perm[pos]
        labels = torch.from_numpy(self.store.labels(self.split)[idx].astype(np.int64))
        ys, xs, flips, offsets = self.spec.train_params(self.seed, self.epoch, idx, pos)
        c = self.spec.crop
        u8 = _shared_empty((len(idx), self.store.channels, c, c), torch.uint8)
        _read_crops(self.store, self.split, self.spec, idx, ys, xs, flips, u8.numpy())
        return u8, labels, (ys, xs, flips, offsets)


def spread_indices(size: int, n: int | None) -> np.ndarray:
    """n indices spread evenly over 0..size-1 (all of them for None or n >= size): a
    class-balanced sample even of a store whose images are sorted by class (folder trees are),
    unlike the first n."""
    if n is None or n >= size:
        return np.arange(size)
    if n < 1:
        raise BadInput(f"limit must be at least 1, got {n}")
    return np.unique(np.linspace(0, size - 1, n).round().astype(np.int64))


class _EvalBatches(Dataset):
    """Rank r of W takes the r-th of W contiguous, equal (+-1) blocks of the images (all, or
    `limit` spread evenly over the split), in batches (the last may be short): the ranks share
    the work evenly whatever the batch size."""

    def __init__(self, store, split, spec, batch_size, views, rank, world, limit=None):
        self.store, self.split, self.spec = store, split, spec
        self.batch_size, self.views = batch_size, views
        self.rank, self.world = rank, world
        self.index = spread_indices(store.size(split), limit)
        n = len(self.index)
        self.lo, self.hi = rank * n // world, (rank + 1) * n // world
        self.starts = list(range(self.lo, self.hi, batch_size))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, j: int):
        s = self.starts[j]
        idx = self.index[s : min(self.hi, s + self.batch_size)]
        labels = torch.from_numpy(self.store.labels(self.split)[idx].astype(np.int64))
        pos, fl = self.spec.eval_layout(self.views)
        v, c = len(pos), self.spec.crop
        ys = np.tile([p[0] for p in pos], len(idx))
        xs = np.tile([p[1] for p in pos], len(idx))
        flips = np.tile(fl, len(idx))
        u8t = _shared_empty((len(idx) * v, self.store.channels, c, c), torch.uint8)
        u8 = u8t.numpy()
        st = self.store
        for k, planar in enumerate(st.planars(self.split, idx)):
            for t in range(v):
                r = k * v + t
                self.spec.cut(planar, int(ys[r]), int(xs[r]), bool(flips[r]), u8[r])
        return u8t, labels, (ys, xs, flips, None)


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


def _as_is(batch):
    """The batch exactly as the worker made it (the default would turn arrays into tensors)."""
    return batch


class _Loader:
    """Iterates (images, labels) on `device`, from a batch dataset, in order."""

    def __init__(self, dataset, spec, workers: int, device, views: int | None, length: int):
        self.dataset, self.spec = dataset, spec
        self.workers = workers
        self.device = torch.device(device)
        self.views = views
        self.length = length

    def __len__(self) -> int:
        return self.length

    def _batches(self):
        if self.workers == 0:
            for j in range(len(self.dataset)):
                yield self.dataset[j]
            return
        try:
            yield from DataLoader(
                self.dataset,
                batch_size=None,
                shuffle=False,
                num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=2,
                persistent_workers=False,
                collate_fn=_as_is,
            )
        except UserError as e:
            # DataLoader re-raises a worker's exception with the worker's whole traceback as
            # its message: a user error (a corrupt record) is one line, its own.
            raise type(e)(_worker_message(e)) from None

    def __iter__(self):
        for u8, labels, (ys, xs, flips, offsets) in self._batches():
            # The float work happens where the batch is used: on a GPU as batched tensor ops
            # on the uint8 crops (4x fewer bytes to copy), on the CPU image by image.
            if self.device.type == "cpu":
                out = _buffer((u8.shape[0], 3, *u8.shape[2:]))
                images = self.spec.finish(u8, ys, xs, flips, offsets, out=out)
            else:
                images = self.spec.finish(
                    u8.to(self.device, non_blocking=True), ys, xs, flips, offsets
                )
            labels = labels.to(self.device, non_blocking=True)
            if self.views == 10:
                images = images.view(-1, 10, *images.shape[1:])
            yield images, labels


def _spec(store: Store, data: DataConfig, lighting: bool) -> ViewSpec:
    return ViewSpec.build(data, store.stats, store.image_size, lighting=lighting)


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
):
    """Training batches of one epoch: (float32 (B, 3, c, c) on device, int64 (B,) labels).

    len() is the number of batches in the epoch (drop_last over global batches of
    batch_size * world_size); iteration yields batches start_batch .. len()-1, exactly those an
    uninterrupted epoch would yield there. `lighting=False` turns PCA lighting off (cuda-convnet
    switched colour noise off at epoch 67)."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise BadInput(f"bad batch_size/rank/world_size {batch_size}/{rank}/{world_size}")
    n = store.size(split)
    num_batches = n // (batch_size * world_size)
    if num_batches == 0:
        raise BadInput(
            f"the {split} split has {n} images, fewer than one global batch of "
            f"{batch_size * world_size}"
        )
    if not 0 <= start_batch <= num_batches:
        raise BadInput(f"start_batch {start_batch} outside 0..{num_batches}")
    workers = default_loader_workers() if workers is None else workers
    device = torch.device(device)
    spec = _spec(store, data, lighting)
    ds = _TrainBatches(
        store,
        split,
        spec,
        batch_size,
        seed,
        epoch,
        start_batch,
        rank,
        world_size,
        num_batches=num_batches,
    )
    return _Loader(ds, spec, workers, device, None, num_batches)


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
):
    """Every image of `split` (or `limit` of them spread evenly over it, see spread_indices)
    exactly once, in store order (rank r of W gets the r-th of W contiguous blocks; the last
    batch may be short): images (B, 3, c, c) for views=1 (the centre crop) or (B, 10, 3, c, c)
    for views=10 (ten_crop order), mean subtracted, no lighting."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise BadInput(f"bad batch_size/rank/world_size {batch_size}/{rank}/{world_size}")
    workers = default_loader_workers() if workers is None else workers
    device = torch.device(device)
    spec = _spec(store, data, lighting=False)
    spec.eval_layout(views)  # validates views
    ds = _EvalBatches(store, split, spec, batch_size, views, rank, world_size, limit)
    return _Loader(ds, spec, workers, device, views, len(ds))
