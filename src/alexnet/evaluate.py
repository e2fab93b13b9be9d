"""Evaluation and prediction: `alexnet evaluate`, `alexnet predict`, `alexnet import-torchvision`.

Sec. 4.1 of the paper: at test time the network sees five 224x224 patches (four corners and the
centre) and their horizontal reflections, and averages the ten softmax outputs. `--views 1` is
the centre crop alone (what most later papers report).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from alexnet import checkpoint
from alexnet.config import Profile, get_profile, profile_from_dict
from alexnet.model import build_model


@dataclass
class Preprocess:
    """The statistics the views need (a trained run carries its store's)."""

    mean_image: np.ndarray
    channel_mean: np.ndarray
    channel_std: np.ndarray
    eigval: np.ndarray
    eigvec: np.ndarray


@dataclass
class LoadedModel:
    model: torch.nn.Module
    profile: Profile
    classes: list[str]
    stats: Preprocess
    path: Path


def weights_path(run_or_weights: str | Path) -> Path:
    p = Path(run_or_weights)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such weights file (give a run folder or a .safetensors)")
    return p


def load_model(run_or_weights: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A run folder or a weights file (safetensors: never runs code) -> the model, eval mode."""
    path = weights_path(run_or_weights)
    tensors, meta = checkpoint.load_weights(path)
    try:
        profile = profile_from_dict(json.loads(meta["config"]))
        classes = json.loads(meta["classes"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: weights without this program's metadata ({e})") from None
    pre = {
        k[len("preprocess.") :]: v.numpy()
        for k, v in tensors.items()
        if k.startswith("preprocess.")
    }
    state = {k: v for k, v in tensors.items() if not k.startswith("preprocess.")}
    model = build_model(profile, num_classes=len(classes), devices=[device])
    model.load_state_dict(state)
    stats = Preprocess(**{k: pre[k].astype(np.float64) for k in Preprocess.__dataclass_fields__})
    return LoadedModel(model.eval(), profile, classes, stats, path)


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
) -> dict[str, Any]:
    """Top-1/top-5 error and loss over a loader of (images, labels).

    views=10: images are (B, 10, 3, S, S); the ten softmax outputs are averaged (Sec. 4.1) and
    the loss is the negative log of the averaged probability of the true class.
    With `num_classes`, also per-class top-1 errors. `total`: the images expected, for the
    progress bar (a subset is the loader's business: make_eval_loader's `limit`).
    """
    from alexnet.speed import FastMode, autocast

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
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="evaluate", dynamic_ncols=True)
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
        raise ValueError("no images to evaluate")
    out = {
        "images": int(n),
        "views": views,
        "top1_error": 1 - top1 / n,
        "top5_error": 1 - top5 / n,
        "loss": loss_sum / n,
    }
    if per_class_n is not None:
        out["per_class_top1_error"] = (per_class_wrong / per_class_n.clamp_min(1)).tolist()
        out["per_class_images"] = per_class_n.tolist()
    return out


def cmd_evaluate(args) -> int:
    from alexnet.data import make_eval_loader, open_store, spread_indices
    from alexnet.train import resolve_device

    device = resolve_device(args.device)
    loaded = load_model(args.weights, device)
    store = open_store(args.data)
    if args.split not in store.splits:
        raise ValueError(f"{args.data} has no split {args.split!r}; it has {store.splits}")
    if store.num_classes != len(loaded.classes):
        raise ValueError(
            f"the weights have {len(loaded.classes)} classes, the store {store.num_classes}"
        )
    loader = make_eval_loader(
        store,
        loaded.profile.data,
        batch_size=args.batch_size or max(1, 128 // args.views),
        views=args.views,
        split=args.split,
        workers=args.workers,
        device=device,
        limit=args.limit,
    )
    from alexnet.speed import FastMode, default_fast_mode, prepare_model

    # As training validates: bf16 autocast and channels_last where faster (speed.py).
    mode = FastMode() if args.no_fast else default_fast_mode(device)
    mode = dataclasses.replace(mode, compile=False)
    model = prepare_model(loaded.model, mode)
    r = evaluate_model(
        model,
        loader,
        views=args.views,
        mode=mode,
        device=device,
        progress=sys.stderr.isatty() and not args.json,
        total=len(spread_indices(store.size(args.split), args.limit)),
        num_classes=len(loaded.classes) if args.per_class else None,
    )
    r.update(
        {"weights": str(loaded.path), "data": str(args.data), "split": args.split,
         "mode": mode.label}
    )  # fmt: skip
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(
        f"{r['images']} images of {args.split}, {args.views} view(s): top-1 error "
        f"{r['top1_error']:.2%}, top-5 error {r['top5_error']:.2%}, loss {r['loss']:.4f}"
    )
    if args.per_class:
        print(f"\n{'class':<30} {'images':>7} {'top-1 error':>12}")
        for name, count, err in zip(
            loaded.classes, r["per_class_images"], r["per_class_top1_error"], strict=True
        ):
            print(f"{name[:30]:<30} {count:>7} {err:>12.2%}")
    return 0


def predict_images(
    loaded: LoadedModel, paths: list[str], topk: int = 5, views: int = 1, device="cpu"
):
    """[{path, predictions: [{class, probability}]} or {path, error}] in the order given."""
    from alexnet.data import preprocess

    results = []
    k = min(topk, len(loaded.classes))
    for path in paths:
        try:
            if not Path(path).exists():
                raise ValueError("no such file")
            x = preprocess(path, loaded.profile.data, loaded.stats, views=views)
        except (ValueError, OSError) as e:
            msg = str(e).splitlines()[0]
            # The reason alone: the result (and the printed line) name the path already.
            msg = msg.removeprefix(f"{path}: ")
            results.append({"path": path, "error": msg})
            continue
        x = x.reshape(-1, *x.shape[-3:]).to(device)
        with torch.no_grad():
            probs = loaded.model(x).float().softmax(1).mean(0)  # Sec. 4.1: average softmax
        p, idx = probs.topk(k)
        results.append(
            {
                "path": path,
                "predictions": [
                    {"class": loaded.classes[i], "probability": float(q)}
                    for q, i in zip(p.tolist(), idx.tolist(), strict=True)
                ],
            }
        )
    return results


def cmd_predict(args) -> int:
    from alexnet.train import resolve_device

    device = resolve_device(args.device)
    loaded = load_model(args.weights, device)
    results = predict_images(loaded, args.images, args.topk, args.views, device)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: error: {r['error']}", file=sys.stderr)
                continue
            print(r["path"])
            for p in r["predictions"]:
                print(f"  {p['probability']:7.2%}  {p['class']}")
    return 1 if any("error" in r for r in results) else 0


# ImageNet statistics torchvision's weights expect (transforms.Normalize), on the 0-255 scale.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255


def import_torchvision(state_dict_file: str | Path, out: str | Path) -> Path:
    """torchvision's published AlexNet state_dict -> a weights file `predict`/`evaluate` load."""
    import torchvision

    from alexnet.train import weights_metadata

    src = Path(state_dict_file)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds code
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{src}: not a loadable torchvision state_dict ({why})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "classifier.6.weight" not in state:
        raise ValueError(f"{src}: not an AlexNet state_dict (no classifier.6.weight)")
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
    for k, v in stats.__dict__.items():
        tensors[f"preprocess.{k}"] = torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float32)
    meta = weights_metadata(profile, classes, {"source": f"torchvision state_dict {src.name}"})
    out = Path(out)
    if out.suffix != ".safetensors":
        out.mkdir(parents=True, exist_ok=True)
        out = out / "model.safetensors"
    checkpoint.save_weights(out, tensors, meta)
    return out


def cmd_import_torchvision(args) -> int:
    out = import_torchvision(args.state_dict, args.out)
    print(f"wrote {out}; try: alexnet predict {out} IMAGE.jpg")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1/top-5 error of trained weights on a store")
    p.add_argument("weights", metavar="RUN_OR_WEIGHTS")
    p.add_argument("--data", required=True, help="a prepared store")
    p.add_argument("--split", default="val")
    p.add_argument("--views", type=int, choices=(1, 10), default=1, help="1: centre; 10: Sec. 4.1")
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per batch (default 128; 12 with --views 10: about 128 crops per forward "
        "pass, as larger passes spend their time in page faults on a CPU)",
    )
    p.add_argument("--workers", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--limit", type=int, help="N images spread evenly over the split (a class-balanced sample)"
    )
    p.add_argument("--per-class", action="store_true", help="a per-class top-1 error table")
    p.add_argument(
        "--no-fast",
        action="store_true",
        help="float32 (default: bfloat16 autocast and channels_last where faster, as training)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k classes of images (JPEG, PNG, WebP, any size)")
    p.add_argument("weights", metavar="RUN_OR_WEIGHTS")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--views", type=int, choices=(1, 10), default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "import-torchvision",
        help="convert torchvision's AlexNet weights (a downloaded state_dict) for predict/evaluate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The file is the one torchvision downloads for alexnet(weights=...), e.g.\n"
        "alexnet-owt-7be5be79.pth; it is loaded with torch.load(weights_only=True).",
    )
    p.add_argument("state_dict", metavar="STATE_DICT_FILE")
    p.add_argument("out", metavar="OUT", help="a .safetensors file or a folder")
    p.set_defaults(func=cmd_import_torchvision)
