"""`alexnet neighbors RUN --data STORE`: Figure 4 of the paper.

Figure 4 (right): "Five ILSVRC-2010 test images in the first column. The remaining columns show
the six training images that produce feature vectors in the last hidden layer with the smallest
Euclidean distance from the feature vector for the test image." Sec. 6.1: the feature vector is
the 4096-dimensional activity of the last hidden layer (fc7, after its ReLU).
Figure 4 (left): the eight test images with the model's five most probable labels (`--top5`).

Each image is seen through the evaluation view (the centre 224x224 patch, mean subtracted,
Sec. 4.1). The training split's fc7 features are computed once and cached in OUT as
fc7-<weights sha256>-<store key>-<split>-<n>.npy (float32, store order) with a .json beside it,
so a second call with other query images costs only the queries. Distances are exact Euclidean
distances in float64; ties are broken by the lower training index.

Cost: one forward pass per training image (the paper net: about 724M multiply-adds each, about
50-100 images/s on a 2-core CPU); --train-limit N searches only the first N training images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.data import make_eval_loader, open_store, preprocess
from alexnet.errors import BadInput
from alexnet.evaluate import load_model
from alexnet.experiments.common import markdown_table, progress
from alexnet.fileio import file_sha256, read_json, write_json, write_text
from alexnet.plots import plt, save_figure


def store_key(store) -> str:
    """Identifies a store's content: its path and its manifest (written once, when complete)."""
    h = hashlib.sha256(str(Path(store.path).resolve()).encode())
    h.update((Path(store.path) / "manifest.json").read_bytes())
    return h.hexdigest()[:12]


@torch.no_grad()
def train_features(
    loaded,
    store,
    out: Path,
    split: str = "train",
    limit: int | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    device="cpu",
) -> tuple[np.ndarray, Path]:
    """fc7 features (N, 4096) of the first `limit` images of `split` (all: None), cached."""
    n = store.size(split) if limit is None else min(limit, store.size(split))
    wsha = file_sha256(loaded.run_info.path)
    path = out / f"fc7-{wsha[:16]}-{store_key(store)}-{split}-{n}.npy"
    meta_path = path.with_suffix(".json")
    meta = {
        "weights": str(loaded.run_info.path),
        "weights_sha256": wsha,
        "store": str(store.path),
        "store_key": store_key(store),
        "split": split,
        "images": n,
        "layer": "fc7",
        "view": "centre crop (Sec. 4.1)",
    }
    if path.exists() and read_json(meta_path) == meta:
        feats = np.load(path, mmap_mode="r")
        if feats.shape[0] == n:
            return np.asarray(feats), path
    loader = make_eval_loader(
        store,
        loaded.run_info.profile.data,
        batch_size=batch_size,
        views=1,
        split=split,
        workers=workers,
        device=device,
    )
    feats = None
    done = 0
    bar = progress(n, f"fc7 features of {split}", unit="img")
    model = loaded.eval()
    try:
        for x, _ in loader:
            if done >= n:
                break
            x = x[: n - done]
            f = model.feature_vector(x.to(device), "fc7").float().cpu().numpy()
            if feats is None:
                feats = np.empty((n, f.shape[1]), np.float32)
            feats[done : done + len(f)] = f
            done += len(f)
            bar.update(len(f))
    finally:
        loader.close()
        bar.close()
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, feats)
    tmp.replace(path)
    write_json(meta_path, meta)
    return feats, path


@torch.no_grad()
def query_features(loaded, store, split: str, indices: list[int], device="cpu"):
    """(fc7 features (Q, 4096), softmax probabilities (Q, classes)) of chosen images."""
    x = torch.stack(
        [
            preprocess(store.image(split, i), loaded.run_info.profile.data, store.stats, views=1)
            for i in indices
        ]
    ).to(device)
    model = loaded.eval()
    feats = model.feature_vector(x, "fc7").float().cpu().numpy()
    probs = model(x).float().softmax(1).cpu().numpy()
    return feats, probs


def nearest(train: np.ndarray, queries: np.ndarray, k: int, chunk: int = 8192):
    """(indices (Q, k), distances (Q, k)): the k training rows nearest each query in Euclidean
    distance, computed in float64, ascending, ties to the lower index."""
    q = np.asarray(queries, dtype=np.float64)
    k = min(k, len(train))
    d2 = np.empty((len(q), len(train)))
    qq = (q**2).sum(1)[:, None]
    for s in range(0, len(train), chunk):
        t = np.asarray(train[s : s + chunk], dtype=np.float64)
        d2[:, s : s + chunk] = qq + (t**2).sum(1)[None, :] - 2 * q @ t.T
    np.maximum(d2, 0, out=d2)
    idx = np.empty((len(q), k), np.int64)
    dist = np.empty((len(q), k))
    for r in range(len(q)):
        # The k + 32 smallest by the expansion, then their distances again directly (no
        # cancellation), ordered by distance and then index.
        m = min(len(train), k + 32)
        cand = np.argpartition(d2[r], m - 1)[:m] if m < len(train) else np.arange(len(train))
        exact = np.sqrt(((np.asarray(train[cand], np.float64) - q[r]) ** 2).sum(1))
        order = np.lexsort((cand, exact))[:k]
        idx[r], dist[r] = cand[order], exact[order]
    return idx, dist


def choose_queries(store, split: str, n: int | None, index: str | None, seed: int) -> list[int]:
    size = store.size(split)
    if index:
        try:
            picks = [int(v) for v in index.split(",") if v.strip()]
        except ValueError:
            raise BadInput(f"--index expects comma-separated integers, got {index!r}") from None
        bad = [i for i in picks if not 0 <= i < size]
        if bad:
            raise BadInput(f"--index {bad}: the {split} split has images 0..{size - 1}")
        return picks
    n = min(n or 5, size)
    return sorted(np.random.default_rng(seed).choice(size, n, replace=False).tolist())


def run_neighbors(
    run: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    images: int | None = 5,
    index: str | None = None,
    split: str = "val",
    k: int = 6,
    top5: bool = False,
    train_limit: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Writes neighbors.png, neighbors.json, neighbors.md (and the feature cache) into OUT."""
    loaded = load_model(run, device)
    store = open_store(data)
    if split not in store.splits:
        raise BadInput(f"{data}: no split {split!r} (it has {store.splits})")
    if "train" not in store.splits:
        raise BadInput(f"{data}: no 'train' split to search")
    if store.num_classes != len(loaded.run_info.classes):
        raise BadInput(
            f"the weights have {len(loaded.run_info.classes)} classes, "
            f"the store {store.num_classes}"
        )
    if k < 1:
        raise BadInput("--k must be at least 1")
    out = Path(out) if out else (Path(run) if Path(run).is_dir() else Path(run).parent)
    out.mkdir(parents=True, exist_ok=True)
    qidx = choose_queries(store, split, images, index, seed)
    train, cache = train_features(
        loaded, store, out, "train", train_limit, batch_size, workers, device
    )
    qfeat, probs = query_features(loaded, store, split, qidx, device)
    np.save(out / "neighbors_query_features.npy", qfeat)
    nn_idx, nn_dist = nearest(train, qfeat, k)
    tl, ql = store.labels("train"), store.labels(split)
    classes = store.classes
    queries = []
    for r, i in enumerate(qidx):
        top = np.argsort(-probs[r], kind="stable")[: min(5, len(classes))]
        queries.append(
            {
                "index": int(i),
                "label": int(ql[i]),
                "class": classes[int(ql[i])],
                "neighbors": [
                    {
                        "train_index": int(j),
                        "label": int(tl[j]),
                        "class": classes[int(tl[j])],
                        "distance": float(d),
                    }
                    for j, d in zip(nn_idx[r], nn_dist[r], strict=True)
                ],
                "top5": [
                    {"class": classes[int(c)], "probability": float(probs[r, c])} for c in top
                ],
            }
        )
    same = [nb["label"] == q["label"] for q in queries for nb in q["neighbors"]]
    result = {
        "figure": "Figure 4 (Krizhevsky et al. 2012): fc7 nearest neighbours"
        + (" and top-5 predictions" if top5 else ""),
        "weights": str(loaded.run_info.path),
        "store": str(store.path),
        "split": split,
        "k": int(nn_idx.shape[1]),
        "train_images_searched": int(len(train)),
        "feature": "fc7 after ReLU (4096-d), centre view; Euclidean distance",
        "feature_cache": str(cache),
        "query_features": str(out / "neighbors_query_features.npy"),
        "same_class_fraction": float(np.mean(same)) if same else None,
        "queries": queries,
    }
    write_json(out / "neighbors.json", result)
    write_text(out / "neighbors.md", neighbors_markdown(result))
    plot_neighbors(result, store, split, out / "neighbors.png", top5)
    return result


def neighbors_markdown(result: dict[str, Any]) -> str:
    rows = [
        [
            f"{q['index']} ({q['class']})",
            ", ".join(f"{n['class']} ({n['distance']:.3g})" for n in q["neighbors"]),
            ", ".join(f"{t['class']} {100 * t['probability']:.0f}%" for t in q["top5"]),
        ]
        for q in result["queries"]
    ]
    text = (
        f"Figure 4: for each {result['split']} image, the {result['k']} training images nearest "
        f"in fc7 (4096-d, Euclidean) among {result['train_images_searched']}; "
        f"{100 * (result['same_class_fraction'] or 0):.0f}% of the neighbours share the query's "
        "class.\n\n"
    )
    return text + markdown_table(
        ["query (class)", "neighbours (class, distance)", "top-5 predictions"], rows
    )


def plot_neighbors(result, store, split, path, top5: bool) -> Path:
    qs = result["queries"]
    k = result["k"]
    extra = 1 if top5 else 0
    cols = 1 + extra + k
    fig, axes = plt.subplots(
        len(qs), cols, figsize=(1.45 * cols + 0.8 * extra, 1.7 * len(qs) + 0.6), squeeze=False
    )
    for r, q in enumerate(qs):
        ax = axes[r, 0]
        ax.imshow(store.image(split, q["index"]))
        ax.set_title(f"{split} {q['index']}\n{q['class'][:18]}", fontsize=7)
        for s in ax.spines.values():
            s.set_edgecolor("red")
            s.set_linewidth(2)
        ax.set_xticks([])
        ax.set_yticks([])
        if top5:  # Figure 4 left: the five most probable labels as bars
            ax = axes[r, 1]
            t = q["top5"][::-1]
            colours = ["tab:red" if x["class"] == q["class"] else "tab:blue" for x in t]
            ax.barh(range(len(t)), [x["probability"] for x in t], color=colours)
            ax.set_yticks(range(len(t)), [x["class"][:14] for x in t], fontsize=6)
            ax.set_xlim(0, 1)
            ax.tick_params(axis="x", labelsize=6)
            ax.set_title("top-5 (red: true)", fontsize=7)
        for c, nb in enumerate(q["neighbors"]):
            ax = axes[r, 1 + extra + c]
            ax.imshow(store.image("train", nb["train_index"]))
            ax.set_title(
                f"{nb['class'][:18]}\nd={nb['distance']:.3g}",
                fontsize=7,
                color="black" if nb["label"] == q["label"] else "grey",
            )
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"Figure 4: {split} images (red frame) and their {k} nearest training images in fc7 "
        f"space ({result['train_images_searched']} searched); "
        f"{Path(result['weights']).parent.name}",
        fontsize=8,
    )
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
