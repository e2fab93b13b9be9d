"""The loaders: every training image is a crop (maybe reflected) of the mean-subtracted stored
image plus one RGB offset, found by exhaustive search in numpy; the cuda-convnet variants;
determinism across worker counts and resumption; DDP shards; evaluation order and views."""

from __future__ import annotations

import gzip
import itertools
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from alexnet.config import DataConfig
from alexnet.data import (
    make_eval_loader,
    make_train_loader,
    open_store,
    prepare_store,
    spread_indices,
    ten_crop,
)
from alexnet.data.views import ViewSpec

S, C = 32, 24  # small stored images and crops keep the exhaustive search cheap
DATA = DataConfig(image_size=S, crop_size=C)


def noise_tree(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    rng = np.random.default_rng(11)
    for c in range(classes):
        (root / f"k{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (S + 8, S + 4, 3), dtype=np.uint8)  # rescaled by prepare
            Image.fromarray(img).save(root / f"k{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    src = noise_tree(root / "src")
    # 24 images: 6 held out (val-fraction 0.25), 18 for training; the default JPEG records
    return prepare_store(
        src,
        root / "store",
        size=S,
        val_fraction=0.25,
        workers=1,
        progress=False,
        log=lambda *a: None,
    )


def numpy_mean(store) -> np.ndarray:
    imgs = [store.image("train", i).astype(np.float64) for i in range(store.size("train"))]
    return np.mean(imgs, axis=0)  # (S, S, 3), computed here, not taken from the store


def find_view(out: np.ndarray, base: np.ndarray):
    """All (image, y, x, flip, offset) with out == crop(base[image]) + a per-channel constant.
    base: (N, 3, S, S) float64; out: (3, C, C)."""
    hits = []
    for i, b in enumerate(base):
        for flip in (False, True):
            win = sliding_window_view(b, (C, C), axis=(1, 2))  # (3, 9, 9, C, C)
            if flip:
                win = win[..., ::-1]
            d = out[:, None, None] - win  # (3, 9, 9, C, C)
            spread = d.max(axis=(-1, -2)) - d.min(axis=(-1, -2))  # (3, 9, 9)
            ok = np.argwhere((spread < 1e-3).all(axis=0))
            for y, x in ok:
                hits.append((i, int(y), int(x), flip, d[:, y, x, 0, 0]))
    return hits


def test_train_views_are_the_papers(store):
    mean = numpy_mean(store)
    st = store.stats
    base = np.stack([store.image("train", i) - mean for i in range(18)]).transpose(0, 3, 1, 2)
    loader = make_train_loader(store, DATA, batch_size=8, seed=5, epoch=0, workers=0)
    assert len(loader) == 2  # 18 // 8, the last partial batch dropped
    seen, positions, flips = [], set(), set()
    for x, y in loader:
        assert x.shape == (8, 3, C, C) and x.dtype == torch.float32 and y.dtype == torch.int64
        for o, label in zip(x.numpy().astype(np.float64), y.tolist(), strict=True):
            hits = find_view(o, base)
            assert len(hits) == 1
            i, yy, xx, flip, off = hits[0]
            assert store.labels("train")[i] == label
            seen.append(i)
            positions.add((yy, xx))
            flips.add(flip)
            # Sec. 4.1: offset = eigvec @ (alpha * l), l = eigval / 255 (see lighting_basis)
            alpha = np.linalg.solve(st.eigvec, off) / (st.eigval / 255.0)
            assert np.all(np.abs(alpha[:2]) < 0.6) and np.abs(off).max() > 1e-4
    assert len(set(seen)) == 16  # no image twice in an epoch
    assert len(positions) > 8 and flips == {False, True}

    # colour noise off (cuda-convnet from epoch 67): exactly the crop of image - mean
    plain = make_train_loader(store, DATA, 8, seed=5, epoch=0, workers=0, lighting=False)
    x0, _ = next(iter(plain))
    x1, _ = next(iter(loader))
    hits = find_view(x0[0].numpy().astype(np.float64), base)
    assert len(hits) == 1 and np.abs(hits[0][4]).max() < 1e-3
    # the same crop and reflection as with lighting: only the offset differs
    assert hits[0][:4] == find_view(x1[0].numpy().astype(np.float64), base)[0][:4]


def test_cuda_convnet_variants(store):
    mean = numpy_mean(store)
    o = (S - C) // 2
    centre = mean[o : o + C, o : o + C].transpose(2, 0, 1)
    imgs = np.stack([store.image("train", i) for i in range(18)]).astype(np.float64)
    base = imgs.transpose(0, 3, 1, 2)
    cc = DataConfig(image_size=S, crop_size=C, lighting="cuda-convnet", crop_chunk=4, mean="center")
    x, _ = next(iter(make_train_loader(store, cc, 8, seed=1, epoch=2, workers=0)))
    views = []
    for out in x.numpy().astype(np.float64):
        # convdata.py: (crop - centre of the mean + noise) / (1 + 0.1)
        hits = find_view(out * 1.1 + centre, base)
        assert len(hits) == 1
        views.append(hits[0])
    for chunk in (views[:4], views[4:]):  # crops and flips shared by chunks of 4 (here)
        assert len({(v[1], v[2], v[3]) for v in chunk}) == 1
    assert len({tuple(np.round(v[4], 6)) for v in views}) == 8  # lighting: one per image
    x, _ = next(iter(make_train_loader(store, cc, 8, seed=1, epoch=2, workers=0, lighting=False)))
    hits = find_view(x[0].numpy().astype(np.float64) + centre, base)  # no noise, no 1/1.1
    assert len(hits) == 1 and np.abs(hits[0][4]).max() < 1e-3

    tv = DataConfig(image_size=S, crop_size=C, lighting_std=0.0, mean="channel-std")
    x, _ = next(iter(make_train_loader(store, tv, 8, seed=1, epoch=0, workers=0)))
    st = store.stats
    m, s = st.channel_mean[:, None, None], st.channel_std[:, None, None]
    hits = find_view(x[3].numpy().astype(np.float64) * s + m, base)
    assert len(hits) == 1 and np.abs(hits[0][4]).max() < 1e-3


def test_determinism_workers_resume_and_ddp(store):
    def run(**kw):
        args = dict(batch_size=4, seed=3, epoch=1, workers=0) | kw
        return [(x.clone(), y.clone()) for x, y in make_train_loader(store, DATA, **args)]

    ref = run()
    assert len(ref) == 4
    for got in (run(workers=2), run(workers=1)):  # independent of the number of workers
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            for a, b in zip(ref, got, strict=True)
        )
    resumed = run(start_batch=2)  # a resumed epoch sees what the interrupted one would have
    assert len(resumed) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ref[2:], resumed, strict=True))
    assert not torch.equal(run(epoch=2)[0][0], ref[0][0])
    assert not torch.equal(run(seed=4)[0][0], ref[0][0])

    # DDP: two ranks of 4 see exactly the global batches of one rank of 8, split in halves
    whole = run(batch_size=8)
    r0, r1 = run(rank=0, world_size=2), run(rank=1, world_size=2, workers=1)
    assert len(whole) == len(r0) == len(r1) == 2
    for w, a, b in zip(whole, r0, r1, strict=True):
        assert torch.equal(w[0], torch.cat([a[0], b[0]]))
        assert torch.equal(w[1], torch.cat([a[1], b[1]]))


def test_eval_loader_order_views_and_shards(store):
    mean = numpy_mean(store)
    n = store.size("val")
    o = (S - C) // 2
    diffs = [(store.image("val", i) - mean).transpose(2, 0, 1) for i in range(n)]
    loader = make_eval_loader(store, DATA, batch_size=4, workers=0)
    got = list(loader)
    assert len(loader) == 2 and [len(y) for _, y in got] == [4, 2]  # the last one short
    x = torch.cat([g[0] for g in got]).numpy()
    assert torch.equal(torch.cat([g[1] for g in got]), torch.from_numpy(store.labels("val")))
    for i in range(n):  # the centre crop of image - mean, in store order
        np.testing.assert_allclose(x[i], diffs[i][:, o : o + C, o : o + C], atol=1e-3)
    ten = list(make_eval_loader(store, DATA, batch_size=4, views=10, workers=0))
    assert ten[0][0].shape == (4, 10, 3, C, C)
    for i in (0, 5):
        expect = ten_crop(torch.from_numpy(diffs[i]), C).numpy()
        np.testing.assert_allclose(ten[i // 4][0][i % 4].numpy(), expect, atol=1e-3)
    # ranks: rank r takes the r-th contiguous block; together every image exactly once, in order
    parts = [
        list(make_eval_loader(store, DATA, 2, rank=r, world_size=2, workers=w))
        for r, w in ((0, 0), (1, 2))
    ]
    assert [len(y) for p in parts for _, y in p] == [2, 1, 2, 1]  # 3 images each
    joined = torch.cat([xb for p in parts for xb, _ in p]).numpy()
    np.testing.assert_array_equal(joined, x)
    # limit: 5 of the 6 images (2 per class), class-balanced (1, 2 and 2 of the 3 classes: the
    # counts differ by at most one), in store order, shared out among the ranks
    lim = [list(make_eval_loader(store, DATA, 8, rank=r, world_size=2, limit=5, workers=0))
           for r in (0, 1)]  # fmt: skip
    assert [len(y) for p in lim for _, y in p] == [2, 3]
    got = torch.cat([xb for p in lim for xb, _ in p]).numpy()
    which = [next(i for i in range(n) if np.array_equal(g, x[i])) for g in got]
    assert which == sorted(set(which)) and len(which) == 5
    counts = np.bincount(store.labels("val")[which], minlength=3)
    assert sorted(counts.tolist()) == [1, 2, 2]


def test_spread_indices_sample_every_class_of_a_sorted_store():
    labels = np.repeat(np.arange(4), 25)  # a folder store: sorted by class
    idx = spread_indices(len(labels), 8)
    assert len(idx) == 8 and sorted(set(labels[idx].tolist())) == [0, 1, 2, 3]
    assert idx[0] == 0 and idx[-1] == 99
    assert spread_indices(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert spread_indices(5, None).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="at least 1"):
        spread_indices(5, 0)


def test_finish_on_a_gpu_is_the_same_arithmetic(store):
    """The batched tensor path (used on GPUs) against the per-image CPU path, run on the CPU."""
    for data in (
        DATA,
        DataConfig(image_size=S, crop_size=C, lighting="cuda-convnet", mean="center"),
        DataConfig(image_size=S, crop_size=C, mean="channel-std"),
    ):
        spec = ViewSpec.build(data, store.stats, S)
        idx = np.arange(8)
        ys, xs, fl, off = spec.train_params(0, 0, idx, idx)
        u8 = np.empty((8, 3, C, C), np.uint8)
        for k in idx:
            spec.cut(store.planar("train", int(k)), ys[k], xs[k], fl[k], u8[k])
        a = spec.finish(torch.from_numpy(u8), ys, xs, fl, off)
        b = spec.finish_torch(torch.from_numpy(u8), ys, xs, fl, off)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    if torch.cuda.is_available():
        c = spec.finish(torch.from_numpy(u8).cuda(), ys, xs, fl, off)
        torch.testing.assert_close(a, c.cpu(), rtol=0, atol=1e-3)


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_grey_store_feeds_rgb_and_errors(tmp_path):
    """An IDX source (Fashion-MNIST's format) is stored with one channel, fed as RGB."""
    rng = np.random.default_rng(0)
    src = tmp_path / "idx"
    src.mkdir()
    for split, n in (("train", 12), ("t10k", 4)):
        write_idx(src / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(src / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    st = prepare_store(
        src, tmp_path / "s", size=S, encoding="raw", workers=1, progress=False, log=lambda *a: None
    )
    assert st.manifest["kind"] == "fashion-mnist" and st.channels == 1
    assert st.manifest["bytes_per_image"] == S * S  # one channel stored
    x, _ = next(iter(make_train_loader(st, DATA, 4, seed=0, epoch=0, workers=0, lighting=False)))
    assert x.shape == (4, 3, C, C)
    # grey replicated to R = G = B, and the mean image of a grey set has R = G = B too
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert x.abs().max() > 1

    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_train_loader(st, DATA, 8, seed=0, epoch=0, world_size=2)
    with pytest.raises(ValueError, match="DataConfig.image_size"):
        make_train_loader(st, DataConfig(image_size=48, crop_size=C), 4, seed=0, epoch=0)
    with pytest.raises(ValueError, match="no split"):
        make_eval_loader(st, DATA, 4, split="test")
    with pytest.raises(ValueError, match="views"):
        make_eval_loader(st, DATA, 4, views=5)
    assert open_store(tmp_path / "s").labels("val").dtype == np.int64


def test_workers_live_across_epochs_and_batches_do_not_change(store):
    """One TrainLoader serves every epoch from the same worker processes (forked once), and
    each epoch's batches are those a fresh loader without workers makes."""
    from alexnet.data import TrainLoader

    loader = TrainLoader(store, DATA, 4, seed=3, workers=2)
    pids = []
    for epoch in range(3):
        got = [(x.clone(), y.clone()) for x, y in loader.epoch(epoch, lighting=epoch != 1)]
        pids.append(loader.worker_pids())
        fresh = make_train_loader(store, DATA, 4, seed=3, epoch=epoch, workers=0,
                                  lighting=epoch != 1)  # fmt: skip
        assert len(got) == len(fresh) == 4
        for (a, ya), (b, yb) in zip(got, fresh, strict=True):
            assert torch.equal(a, b) and torch.equal(ya, yb)
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]
    # a pass cut short (max_steps, an interrupt) leaves nothing behind for the next one
    it = iter(loader.epoch(0, start_batch=1))
    next(it)
    del it
    again = [y.clone() for _, y in itertools.islice(loader.epoch(0, start_batch=1), 2)]
    assert len(again) == 2 and torch.equal(again[0], fresh_labels(store, 0, 1))
    loader.close()
    assert loader.worker_pids() == []


def fresh_labels(store, epoch, batch):
    loader = make_train_loader(store, DATA, 4, seed=3, epoch=epoch, start_batch=batch, workers=0)
    return next(iter(loader))[1]


def test_loaders_leave_the_global_random_state_alone(store):
    """Making and iterating loaders with workers draws nothing from torch's global generator,
    which the dropout masks use: the masks do not depend on the number of workers or passes."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for _ in make_train_loader(store, DATA, 4, seed=0, epoch=0, workers=1):
        pass
    for _ in make_eval_loader(store, DATA, 4, workers=1):
        pass
    assert torch.equal(before, torch.get_rng_state())


def test_decoding_where_the_batch_is_used_equals_decoding_in_the_workers(store):
    """decode="gpu" (records to the device, decoded and cut there) runs the same path on a CPU
    with libjpeg-turbo: the same images as the workers' path, training and ten-view eval."""
    cc = DataConfig(image_size=S, crop_size=C, lighting="cuda-convnet", crop_chunk=4, mean="center")
    for data in (DATA, cc):
        for workers in (0, 1):
            a = make_train_loader(store, data, 8, seed=2, epoch=1, workers=workers, decode="cpu")
            b = make_train_loader(store, data, 8, seed=2, epoch=1, workers=workers, decode="gpu")
            assert (a.decode, b.decode) == ("cpu", "gpu")
            for (xa, ya), (xb, yb) in zip(a, b, strict=True):
                torch.testing.assert_close(xb, xa, rtol=0, atol=1e-3)
                assert torch.equal(ya, yb)
    for views in (1, 10):
        a = list(make_eval_loader(store, DATA, 4, views=views, workers=0, decode="cpu"))
        b = list(make_eval_loader(store, DATA, 4, views=views, workers=1, decode="gpu"))
        assert len(a) == len(b) == 2
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert xa.shape == xb.shape
            torch.testing.assert_close(xb, xa, rtol=0, atol=1e-3)
            assert torch.equal(ya, yb)


def test_a_batch_carries_its_view_parameters_as_tensors(store):
    """What a worker returns: every per-image parameter a tensor (pinned with the batch on a
    GPU, then copied without waiting), and the parameters those of the views."""
    from alexnet.data import TrainLoader

    loader = TrainLoader(store, DATA, 4, seed=1, workers=0, decode="cpu")
    payload, lengths, labels, pos, offsets = loader._workers.dataset[(0, 1, True)]
    assert lengths is None and payload.dtype == torch.uint8 and payload.shape == (4, 3, C, C)
    assert pos.dtype == torch.int64 and pos.shape == (4, 3)
    assert offsets.dtype == torch.float32 and offsets.shape == (4, 3)
    spec = loader.specs[True]
    idx = np.asarray(loader._workers.dataset._perm(0)[4:8])
    ys, xs, flips, off = spec.train_params(1, 0, idx, np.arange(4, 8))
    assert pos[:, 0].tolist() == ys.tolist() and pos[:, 1].tolist() == xs.tolist()
    assert pos[:, 2].tolist() == flips.astype(int).tolist()
    assert torch.equal(offsets, torch.from_numpy(off))
    gpu = TrainLoader(store, DATA, 4, seed=1, workers=0, decode="gpu")
    blob, lengths, labels2, pos2, _ = gpu._workers.dataset[(0, 1, True)]
    assert torch.equal(pos2, pos) and torch.equal(labels2, labels)
    assert int(lengths.sum()) == blob.numel()  # the records back to back
    recs = store.records("train", idx)
    assert bytes(blob[: lengths[0]].numpy()) == recs[0]


def test_cut_torch_equals_cut(store):
    spec = ViewSpec.build(DATA, store.stats, S)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (3, 3, S, S), dtype=np.uint8))
    ys, xs = rng.integers(0, S - C + 1, 6), rng.integers(0, S - C + 1, 6)
    flips = np.array([0, 1, 1, 0, 1, 0])
    got = spec.cut_torch(images, torch.from_numpy(ys), torch.from_numpy(xs),
                         torch.from_numpy(flips), per_image=2)  # fmt: skip
    for r in range(6):
        want = np.empty((3, C, C), np.uint8)
        spec.cut(images[r // 2].numpy(), int(ys[r]), int(xs[r]), bool(flips[r]), want)
        assert torch.equal(got[r], torch.from_numpy(want)), r


def test_decode_choice(store, monkeypatch):
    from alexnet.data import loader as L

    assert L.resolve_decode("auto", store, "cpu", 4) == "cpu"  # a CPU: the workers decode
    assert L.resolve_decode("gpu", store, "cpu", 4) == "gpu"
    with pytest.raises(ValueError, match="unknown decode"):
        L.resolve_decode("nvjpeg", store, "cpu", 4)
    m = L.measure_decode(store, "cpu", workers=3, images=8)
    assert m["images"] == 8 and m["workers"] == 3 and m["decode"] in ("cpu", "gpu")
    assert m["gpu_images_per_s"] > 0 and m["cpu_images_per_s"] > 0
    assert L.measure_decode(store, "cpu", workers=3) is m  # measured once per process


def test_default_workers_use_the_cores_shared_among_local_ranks(monkeypatch):
    from alexnet.data import loader as L

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(L, "available_cpus", lambda: 16)
    assert L.default_loader_workers() == 15  # one core for the training process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert L.default_loader_workers() == 7  # torchrun: two training processes on this node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert L.default_loader_workers() == 1
    monkeypatch.setattr(L, "available_cpus", lambda: 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert L.default_loader_workers() == 1


def test_an_epoch_longer_than_the_split_cycles_it_each_pass_in_its_own_order(store):
    """train.min_steps on a small folder: an epoch of 10 batches of 4 over 18 images is three
    passes, each a permutation of the split (pass 0 the epoch's usual order), so every image is
    seen once per pass; the batches are still a function of (seed, epoch, batch)."""
    from alexnet.data import TrainLoader, epoch_permutation

    n = store.size("train")
    loader = TrainLoader(store, DATA, 4, seed=1, workers=0, decode="cpu", epoch_batches=10)
    assert len(loader) == 10 > n // 4
    perm = loader._workers.dataset._perm(0)
    passes = [perm[p * n : (p + 1) * n] for p in range(3)]
    assert np.array_equal(passes[0], epoch_permutation(n, 1, 0))
    for p in passes:
        assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(passes[0], passes[1])
    ys = torch.cat([y for _, y in loader.epoch(0)]).numpy()
    assert len(ys) == 40
    want = np.bincount(store.labels("train"), minlength=3) * 2  # two whole passes
    assert np.array_equal(np.bincount(ys[: 2 * n], minlength=3), want)
    again = torch.cat([y for _, y in loader.epoch(0, start_batch=5)]).numpy()
    assert np.array_equal(again, ys[20:])  # a resumed epoch: the same batches
    loader.close()
