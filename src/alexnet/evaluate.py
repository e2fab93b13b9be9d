"""Evaluation and prediction with trained weights, and torchvision's weights imported.

Sec. 4.1 of the paper: at test time the network sees five 224x224 patches (four corners and the
centre) and their horizontal reflections, and averages the ten softmax outputs. One view is
the centre crop alone (what most later papers report).

Why one file of this length: evaluation and prediction, of one network or an ensemble,
share the loading, the views and the softmax averaging.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from alexnet import checkpoint
from alexnet.checkpoint import Preprocess
from alexnet.config import Profile, check_profile, get_profile, profile_from_dict
from alexnet.data import make_eval_loader, open_store, preprocess, spread_indices
from alexnet.data.listing import image_paths
from alexnet.errors import BadInput, NotFound
from alexnet.fileio import read_json
from alexnet.model import build_model
from alexnet.speed import FastMode, autocast, default_fast_mode, prepare_model


@dataclass
class RunInfo:
    """What a weights file says of its network: `load_model(...).run_info`."""

    profile: Profile
    classes: list[str]
    stats: Preprocess
    path: Path


def weights_path(run_or_weights: str | Path) -> Path:
    p = Path(run_or_weights)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise NotFound(f"{p}: no such weights file (give a run folder or a .safetensors)")
    return p


def load_model(run_or_weights: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A run folder or a weights file (safetensors: never runs code) -> the network (the plain
    form, alexnet.model), eval mode, with what the file says of it on `.run_info` (RunInfo:
    profile, classes, preprocessing statistics, path)."""
    path = weights_path(run_or_weights)
    tensors, meta = checkpoint.load_weights(path)  # checksum and finiteness verified
    try:
        profile = profile_from_dict(json.loads(meta["config"]))
        classes = json.loads(meta["classes"])
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: weights without this program's metadata ({e})") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise BadInput(f"{path}: its metadata's classes are not a list of class names")
    try:  # the values the views and the network are built from, before they are used
        check_profile(profile)
    except BadInput as e:
        raise BadInput(f"{path}: its metadata holds {e}") from None
    state, stats = checkpoint.split_weights(path, tensors)
    checkpoint.check_preprocessing(path, profile, stats)
    model = build_model(profile, num_classes=len(classes), devices=[device])
    described = f"its metadata describes (profile {profile.name}, {len(classes)} classes)"
    checkpoint.load_into(model, state, path, described)
    model.run_info = RunInfo(profile, classes, stats, path)
    return model.eval()


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    loader,
    views: int = 1,
    mode=None,
    device: str | torch.device = "cpu",
    dist=None,
    progress: bool = False,
    total: int | None = None,
    num_classes: int | None = None,
    keep_probs: bool = False,
) -> dict[str, Any]:
    """Top-1/top-5 error and loss over a loader of (images, labels).

    views=10: images are (B, 10, 3, S, S); the ten softmax outputs are averaged (Sec. 4.1) and
    the loss is the negative log of the averaged probability of the true class.
    With `num_classes`, also per-class top-1 errors. `total`: the images expected, for the
    progress bar (a subset is the loader's business: make_eval_loader's `limit`).
    keep_probs: also "probs", float32 (N, classes), each image's softmax averaged over its
    views, and "labels" (N,), in the loader's order (what an ensemble averages, Sec. 6).
    """
    mode = mode or FastMode()
    was_training = model.training
    model.eval()
    device = torch.device(device)
    n, top1, top5, loss_sum = 0, 0, 0, 0.0
    per_class_n = per_class_wrong = None
    if num_classes:
        per_class_n = torch.zeros(num_classes, dtype=torch.long)
        per_class_wrong = torch.zeros(num_classes, dtype=torch.long)
    bar = None
    if progress:
        bar = tqdm(total=total, unit="img", desc="evaluate", dynamic_ncols=True)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        b = x.shape[0]
        if views > 1:
            x = x.flatten(0, 1)  # (B*10, 3, S, S), ten views of each image in a row
        if mode.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(mode, device):
            logits = model(x)
        logits = logits.float()
        if views > 1:
            probs = logits.softmax(1).view(b, views, -1).mean(1)  # Sec. 4.1: average softmax
            loss_sum += float(-torch.log(probs.gather(1, y[:, None]).clamp_min(1e-12)).sum())
            scores = probs
        else:
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            scores = logits
        k = min(5, scores.shape[1])
        topk = scores.topk(k, 1).indices
        hit1 = topk[:, 0] == y
        top1 += int(hit1.sum())
        top5 += int((topk == y[:, None]).any(1).sum())
        if per_class_n is not None:
            per_class_n += torch.bincount(y.cpu(), minlength=num_classes)
            per_class_wrong += torch.bincount(y[~hit1].cpu(), minlength=num_classes)
        n += b
        if keep_probs:
            p = probs if views > 1 else logits.softmax(1)
            kept.append((p.cpu(), y.cpu()))
        if bar is not None:
            bar.update(b)
    if bar is not None:
        bar.close()
    totals = torch.tensor([n, top1, top5, loss_sum], dtype=torch.float64)
    if dist is not None and dist.world_size > 1:
        totals = dist.all_reduce_sum(totals)
    n, top1, top5, loss_sum = totals.tolist()
    model.train(was_training)
    if n == 0:
        raise BadInput("no images to evaluate")
    out = {
        "images": int(n),
        "views": views,
        "top1_error": 1 - top1 / n,
        "top5_error": 1 - top5 / n,
        "loss": loss_sum / n,
    }
    if keep_probs:
        out["probs"] = torch.cat([p for p, _ in kept])
        out["labels"] = torch.cat([y for _, y in kept])
    if per_class_n is not None:
        out["per_class_top1_error"] = (per_class_wrong / per_class_n.clamp_min(1)).tolist()
        out["per_class_images"] = per_class_n.tolist()
    return out


def evaluate_store(
    loaded: torch.nn.Module,
    data: str | Path,
    split: str = "val",
    views: int = 1,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    per_class: bool = False,
    fast: bool = True,
    progress: bool = False,
    keep_probs: bool = False,
    ignore_class_names: bool = False,
) -> dict[str, Any]:
    """`evaluate_model` of a loaded model on a split of a prepared store, with the model's own
    preprocessing (its profile's views, the statistics saved with its weights' store). The
    weights' classes must be the store's, by name (check_classes).
    batch_size: images per batch (default 128 for one view, 12 with ten: about 128 crops per
    forward pass, as larger passes spend their time in page faults on a CPU)."""
    device = torch.device(device)
    store = open_store(data)
    if split not in store.splits:
        raise BadInput(f"{data} has no split {split!r}; it has {store.splits}")
    check_classes(loaded, store, ignore_class_names)
    loader = make_eval_loader(
        store,
        loaded.run_info.profile.data,
        batch_size=batch_size or max(1, 128 // views),
        views=views,
        split=split,
        workers=workers,
        device=device,
        limit=limit,
    )
    # As training validates: bf16 autocast and channels_last where faster (speed.py).
    mode = default_fast_mode(device) if fast else FastMode()
    mode = dataclasses.replace(mode, compile=False)
    model = prepare_model(loaded, mode)
    try:
        r = evaluate_model(
            model,
            loader,
            views=views,
            mode=mode,
            device=device,
            progress=progress,
            total=len(spread_indices(store.size(split), limit, store.labels(split))),
            num_classes=len(loaded.run_info.classes) if per_class else None,
            keep_probs=keep_probs,
        )
    finally:
        loader.close()  # its worker processes, now, whether or not the evaluation failed
    r.update(
        {
            "weights": str(loaded.run_info.path),
            "data": str(data),
            "split": split,
            "mode": mode.label,
        }
    )
    return r


def check_classes(loaded: torch.nn.Module, store, ignore_class_names: bool = False) -> None:
    """BadInput unless the weights were trained on the store's classes, in its order: the same
    number of classes is not enough (a 10-class Fashion-MNIST net on CIFAR-10 would report a
    meaningless error). `ignore_class_names`: the same number suffices (a store whose classes
    were renamed)."""
    same_classes(
        loaded.run_info.classes,
        loaded.run_info.path,
        store,
        ignore_class_names=ignore_class_names,
        remedy="--ignore-class-names evaluates anyway, matching classes by number",
    )


def same_classes(
    classes: list[str], source, store, *, ignore_class_names: bool = False, remedy: str = ""
) -> None:
    """BadInput unless `classes` (those `source`, a weights file or a run, was trained on) are
    the store's, in its order (by number alone with `ignore_class_names`); `remedy`: what the
    user may do instead, said at the end of the line."""
    mine, theirs = list(classes), list(store.classes)
    if len(mine) != len(theirs):
        raise BadInput(
            f"{source} has {len(mine)} classes, the store {store.path} {len(theirs)}: "
            "the weights were trained on another dataset"
        )
    if mine != theirs and not ignore_class_names:
        k = next(i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b)
        raise BadInput(
            f"{source} was trained on other classes than the store {store.path} holds "
            f"(class {k}: {mine[k]!r} in the weights, {theirs[k]!r} in the store)"
            + (f"; {remedy}" if remedy else "")
        )


def recorded_store(run_or_weights: str | Path) -> Path:
    """The store a run was trained on (its config.json records it), for `evaluate RUN` without
    --data; a clear error when it is not recorded or no longer there."""
    run = Path(run_or_weights)
    cfg = read_json(run / "config.json") if run.is_dir() else None
    if cfg is None:
        raise BadInput(
            f"{run}: no run folder with a config.json that records its store: give --data STORE"
        )
    store = (cfg.get("derived") or {}).get("store") or (cfg.get("run") or {}).get("data")
    if not store or not (Path(store) / "manifest.json").exists():
        raise NotFound(
            f"{run} was trained on the store {store}, which is no longer there: give --data STORE"
        )
    return Path(store)


def read_classes(run_or_weights: str | Path) -> list[str]:
    """The class names a weights file (or a run's) carries, read from its header alone."""
    path = weights_path(run_or_weights)
    meta = checkpoint.read_metadata(path)
    try:
        return list(json.loads(meta["classes"]))
    except (KeyError, TypeError, json.JSONDecodeError):
        raise BadInput(f"{path}: weights without this program's class names") from None


def check_same_classes(members: list[str | Path]) -> list[str]:
    """The class names all members share; BadInput naming the first that differs."""
    first = read_classes(members[0])
    for m in members[1:]:
        other = read_classes(m)
        if other != first:
            diff = next(
                (i for i, (a, b) in enumerate(zip(first, other, strict=False)) if a != b), None
            )
            why = (
                f"{len(other)} classes against {len(first)}"
                if len(other) != len(first)
                else f"class {diff} is {other[diff]!r} there, {first[diff]!r} in {members[0]}"
            )
            raise BadInput(f"{m}: an ensemble's networks must share their classes ({why})")
    return first


def _metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1/top-5 error and loss (-log p of the true class) of averaged probabilities."""
    k = min(5, probs.shape[1])
    topk = probs.topk(k, 1).indices
    n = len(labels)
    p_true = probs.gather(1, labels[:, None]).clamp_min(1e-12).double()
    return {
        "images": n,
        "top1_error": 1 - int((topk[:, 0] == labels).sum()) / n,
        "top5_error": 1 - int((topk == labels[:, None]).any(1).sum()) / n,
        "loss": float(-p_true.log().sum()) / n,
    }


def evaluate_networks(
    members: list[str | Path],
    data: str | Path | None = None,
    split: str = "val",
    views: int = 1,
    **kw: Any,
) -> dict[str, Any]:
    """One network or an ensemble (Sec. 6: "averaging the predictions of five similar CNNs") on a
    split of a store: each network sees the images through its own preprocessing (its profile's
    views and the statistics saved with its weights) and its softmax is averaged over the views;
    the ensemble's prediction is then the mean over the networks. The networks must share their
    class names. One network is resident at a time (each is loaded, run over the split, and
    released; its probabilities are kept: images x classes floats).

    Returns "members" (each network's result, as evaluate_store's), "ensemble" (top1_error,
    top5_error, loss, images) and the ensemble's figures at the top level as well (one
    network: its whole result at the top level). `data`:
    None evaluates on the store the first network was trained on. Keywords go to
    evaluate_store (batch_size, workers, device, limit, per_class, fast, progress)."""
    if not members:
        raise BadInput("no networks to evaluate")
    check_same_classes(members)
    data = data if data is not None else recorded_store(members[0])
    device = kw.pop("device", "cpu")
    results, total, labels = [], None, None
    for i, m in enumerate(members):
        loaded = load_model(m, device)
        r = evaluate_store(loaded, data, split, views, device=device, keep_probs=True, **kw)
        probs, y = r.pop("probs"), r.pop("labels")
        check_outputs(loaded.run_info.path, probs, i, len(members))
        del loaded
        total = probs.double() if total is None else total + probs.double()
        if labels is not None and not torch.equal(labels, y):  # each member's loader: same order
            raise RuntimeError("the members' evaluation loaders disagree on the images")
        labels = y
        results.append(r)
    if len(members) == 1:  # the network's own figures (cross-entropy of its logits, ...)
        ensemble = {k: results[0][k] for k in ("images", "top1_error", "top5_error", "loss")}
    else:
        ensemble = _metrics((total / len(members)).float(), labels)
    ensemble["networks"] = len(members)
    out = {
        "data": str(data),
        "split": split,
        "views": views,
        "memory": "one network resident at a time",
        "members": results,
        "ensemble": ensemble,
    }
    if len(members) == 1:  # one network: its own result, as `alexnet evaluate RUN` gave it
        out.update({k: v for k, v in results[0].items() if k not in out})
    out.update({k: ensemble[k] for k in ("images", "top1_error", "top5_error", "loss")})
    return out


def check_outputs(path: Path, probs: torch.Tensor, member: int = 0, of: int = 1) -> None:
    """BadInput naming the network (`member` of `of`, an ensemble's) whose softmax outputs are
    not finite (weights that overflow): averaged in, they would turn the whole result to nan."""
    bad = int((~torch.isfinite(probs)).flatten(1).any(1).sum()) if probs.numel() else 0
    if bad:
        which = f"network {member + 1} of the ensemble's {of}, " if of > 1 else ""
        raise BadInput(
            f"{path}: {which}its outputs are NaN or infinite for {bad} of {len(probs)} images: "
            "its weights are broken (they overflow)"
        )


def is_network(path: str | Path) -> bool:
    """Whether a path given to predict names a network: a .safetensors file, or a run folder
    (one with model.safetensors or config.json; a run without weights yet is then an error
    naming its missing weights). Any other folder is a folder of images."""
    p = Path(path)
    if p.is_dir():
        return (p / "model.safetensors").exists() or (p / "config.json").exists()
    return p.suffix == ".safetensors"


def expand_images(paths: list[str | Path]) -> list[str]:
    """The image files to predict: each folder replaced by the images under it (recursively,
    photo formats only, in a stable order: data.listing.image_paths), files kept as given. A
    folder holding no image stays itself, so that its result says so."""
    out: list[str] = []
    for path in paths:
        found = image_paths(Path(path)) if Path(path).is_dir() else []
        out += [str(f) for f in found] if found else [str(path)]
    return out


def image_probabilities(
    loaded: torch.nn.Module, paths: list[str], views: int = 1, device="cpu"
) -> list[torch.Tensor | str]:
    """Per image file: the network's softmax averaged over the views (Sec. 4.1), or the reason
    the file cannot be read (a string), in the order given."""
    out: list[torch.Tensor | str] = []
    for path in paths:
        try:
            if not Path(path).exists():
                raise ValueError("no such file")
            if Path(path).is_dir():  # what expand_images left: a folder without images
                raise ValueError("a folder without image files (JPEG, PNG, WebP, ...) under it")
            x = preprocess(path, loaded.run_info.profile.data, loaded.run_info.stats, views=views)
        except (ValueError, OSError) as e:
            msg = str(e).splitlines()[0]
            # The reason alone: the result (and the printed line) name the path already.
            out.append(msg.removeprefix(f"{path}: "))
            continue
        x = x.reshape(-1, *x.shape[-3:]).to(device)
        with torch.no_grad():
            out.append(loaded(x).float().softmax(1).mean(0).cpu())
    return out


def _top(probs: torch.Tensor, classes: list[str], topk: int) -> list[dict[str, Any]]:
    p, idx = probs.topk(min(topk, len(classes)))
    return [
        {"class": classes[i], "probability": float(q)}
        for q, i in zip(p.tolist(), idx.tolist(), strict=True)
    ]


def predict_images(
    loaded: torch.nn.Module, paths: list[str], topk: int = 5, views: int = 1, device="cpu"
):
    """[{path, predictions: [{class, probability}]} or {path, error}] in the order given."""
    results = []
    for path, r in zip(paths, image_probabilities(loaded, paths, views, device), strict=True):
        if isinstance(r, str):
            results.append({"path": path, "error": r})
        else:
            results.append({"path": path, "predictions": _top(r, loaded.run_info.classes, topk)})
    return results


def predict_networks(
    members: list[str | Path], paths: list[str], topk: int = 5, views: int = 1, device="cpu"
):
    """predict_images with one network or an ensemble: each network's softmax averaged over the
    views, then over the networks (Sec. 6). One network resident at a time. With several
    networks each result also holds "members": each network's own top-k. A folder among
    `paths` stands for the images under it (expand_images): one result per image file."""
    classes = check_same_classes(members)
    paths = expand_images(paths)
    per_member = []
    for i, m in enumerate(members):
        loaded = load_model(m, device)
        probs = image_probabilities(loaded, paths, views, device)
        read = [p for p in probs if not isinstance(p, str)]
        if read:
            check_outputs(loaded.run_info.path, torch.stack(read), i, len(members))
        per_member.append((str(loaded.run_info.path), probs))
        del loaded
    results = []
    for i, path in enumerate(paths):
        probs = [r[i] for _, r in per_member]
        if isinstance(probs[0], str):
            results.append({"path": path, "error": probs[0]})
            continue
        r = {"path": path, "predictions": _top(torch.stack(probs).mean(0), classes, topk)}
        if len(members) > 1:
            r["members"] = [
                {"weights": w, "predictions": _top(p[i], classes, topk)} for w, p in per_member
            ]
        results.append(r)
    return results


# ImageNet statistics torchvision's weights expect (transforms.Normalize), on the 0-255 scale.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255


def import_torchvision(state_dict_file: str | Path, out: str | Path) -> Path:
    """torchvision's published AlexNet state_dict -> a weights file `predict`/`evaluate` load."""
    src = Path(state_dict_file)
    if not src.exists():
        raise NotFound(f"{src}: no such file")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds code
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(f"{src}: not a loadable torchvision state_dict ({why})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "classifier.6.weight" not in state:
        raise BadInput(f"{src}: not an AlexNet state_dict (no classifier.6.weight)")
    num_classes = state["classifier.6.weight"].shape[0]
    profile = get_profile("torchvision")
    model = build_model(profile, num_classes=num_classes)
    model.load_state_dict(state, strict=True)  # torchvision's exact keys
    if num_classes == 1000:
        classes = list(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.meta["categories"])
    else:
        classes = [f"class_{i}" for i in range(num_classes)]
    stats = Preprocess(
        mean_image=np.broadcast_to(IMAGENET_MEAN, (256, 256, 3)).copy(),
        channel_mean=IMAGENET_MEAN,
        channel_std=IMAGENET_STD,
        eigval=np.zeros(3),
        eigvec=np.eye(3),
    )
    tensors = dict(model.state_dict())
    tensors.update(checkpoint.stats_tensors(stats))
    meta = checkpoint.weights_metadata(
        profile, classes, {"source": f"torchvision state_dict {src.name}"}
    )
    out = Path(out)
    if out.suffix != ".safetensors":
        out.mkdir(parents=True, exist_ok=True)
        out = out / "model.safetensors"
    checkpoint.save_weights(out, tensors, meta)
    return out
