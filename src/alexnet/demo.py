"""`alexnet demo` (what `make demo` runs): the main job on the embedded default dataset.

Prepares Fashion-MNIST (Debian's dataset-fashion-mnist) the paper's way, trains the paper's
network with the `demo` recipe on this machine, evaluates it on the full 10,000-image test set
and shows a prediction. Re-running resumes whatever was interrupted and skips what is done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def cmd_demo(args) -> int:
    from alexnet.cli import main as cli

    t0 = time.perf_counter()
    store, out = Path(args.store), Path(args.out)
    src = Path(args.source)
    if (
        not (src / "train-images-idx3-ubyte.gz").exists()
        and not (src / "train-images-idx3-ubyte").exists()
    ):
        raise FileNotFoundError(
            f"{src}: no Fashion-MNIST IDX files; install Debian's package: "
            "apt-get install dataset-fashion-mnist (make demo does it)"
        )

    _step(f"prepare Fashion-MNIST from {src} into {store}")
    rc = cli(["prepare", str(src), str(store), "--kind", "fashion-mnist"])
    if rc:
        return rc

    state_done = False
    if (out / "config.json").exists():
        cfg = json.loads((out / "config.json").read_text())
        state_done = len(_epochs(out)) >= cfg["profile"]["train"]["epochs"]
    if state_done:
        _step(f"{out} is already trained (delete it to train again)")
    else:
        resume = (out / "state.pt").exists()
        _step(("resume" if resume else "train") + f" the paper's network, recipe `demo`, in {out}")
        argv = (
            ["train", "--resume", str(out)]
            if resume
            else [
                "train",
                "--data",
                str(store),
                "--out",
                str(out),
                "--profile",
                "demo",
            ]
        )
        rc = cli(argv + (["--epochs", str(args.epochs)] if args.epochs else []))
        if rc:
            return rc

    # The validation at the end of the epoch is the evaluation on the full test set (the store's
    # val split is Fashion-MNIST's 10,000 test images), so it is not run a second time.
    final = [r for r in _epochs(out) if "val_top1_error" in r][-1]
    _step(
        f"test set ({final['val_images']:,} images, centre view): top-1 error "
        f"{final['val_top1_error']:.2%}, top-5 error {final['val_top5_error']:.2%}, "
        f"loss {final['val_loss']:.4f}"
    )
    print(
        f"    the same with the paper's ten views: alexnet evaluate {out} --data {store} --views 10"
    )

    examples = _write_examples(store, out / "examples")
    _step(f"predict: alexnet predict {out} {' '.join(str(p) for p in examples)}")
    cli(["predict", str(out), *map(str, examples), "--topk", "3"])

    minutes = (time.perf_counter() - t0) / 60
    print(
        f"\ndemo done in {minutes:.1f} min. Run folder: {out} (config.json, metrics.jsonl, "
        f"model.safetensors); curves: {out / 'curves.png'}; TensorBoard: "
        f"tensorboard --logdir {out}"
    )
    return 0


def _epochs(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if r.get("kind") == "epoch"]


def _write_examples(store_path: Path, folder: Path, n: int = 3) -> list[Path]:
    """A few test images as PNG files, so that `predict` has real files to read."""
    from PIL import Image

    from alexnet.data import open_store

    store = open_store(store_path)
    folder.mkdir(parents=True, exist_ok=True)
    labels = store.labels("val")
    paths = []
    for i in range(n):
        name = store.classes[int(labels[i])].replace("/", "-").replace(" ", "_")
        p = folder / f"test{i}_{name}.png"
        Image.fromarray(store.image("val", i)).save(p)
        paths.append(p)
    return paths


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="prepare Fashion-MNIST, train the paper's net, evaluate")
    p.add_argument("--out", default="runs/demo", help="the run folder (default runs/demo)")
    p.add_argument("--store", default="data/fashion-mnist", help="the prepared store")
    p.add_argument("--source", default=str(FASHION_MNIST), help="the IDX files")
    p.add_argument("--epochs", type=int, help="override the demo recipe's epochs")
    p.set_defaults(func=cmd_demo)
