"""`alexnet demo` (what `make demo` runs): the main job on the embedded default dataset.

Prepares Fashion-MNIST (Debian's dataset-fashion-mnist) the paper's way, trains the paper's
network with the `demo` recipe on this machine, evaluates it on the full 10,000-image test set
and shows a prediction. Re-running resumes whatever was interrupted and skips what is done.
"""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from alexnet.commands.evaluate import print_predictions
from alexnet.config import RunConfig, RunSpec, apply_settings, get_profile
from alexnet.data import open_store, prepare_store
from alexnet.data.sources import FASHION_MNIST_DIR, idx_file
from alexnet.errors import NotFound
from alexnet.evaluate import load_model, predict_images
from alexnet.runfolder import RunFolder
from alexnet.runlog import read_metrics, shows_top5
from alexnet.train import Trainer


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _epochs(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "epoch"]


def write_examples(store_path: Path, folder: Path, n: int = 3) -> list[Path]:
    """A few test images as PNG files, so that `predict` has real files to read."""
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


def run_demo(args) -> int:
    t0 = time.perf_counter()
    store, out, src = Path(args.data), Path(args.out), Path(args.source)
    if idx_file(src, "train-images-idx3-ubyte") is None:
        raise NotFound(
            f"{src}: no Fashion-MNIST IDX files; install Debian's package: "
            "apt-get install dataset-fashion-mnist (make demo does it)"
        )

    _step(f"prepare Fashion-MNIST from {src} into {store}")
    prepare_store(src, store, kind="fashion-mnist")

    folder = RunFolder(out)
    if (out / "config.json").exists():  # an earlier demo: finish it, or it is done
        spec, resume = folder.read_spec(), True
    else:
        spec = RunSpec.checked(get_profile("demo"), RunConfig(data=str(store), out=str(out)))
        resume = False
    if args.epochs:
        spec = RunSpec.checked(
            *apply_settings(spec.profile, spec.run, {"train.epochs": args.epochs})
        )
    if len(_epochs(out)) >= spec.profile.train.epochs:
        _step(f"{out} is already trained (delete it to train again)")
    else:
        what = "resume" if (out / "state.pt").exists() else "train"
        _step(f"{what} the paper's network, recipe `demo`, in {out}")
        # one writer (InUse for a second demo or train on it); resumes the run it finds
        with folder.hold(spec, resume) as resume:
            result = Trainer(spec, resume=resume).fit()
        if result["status"] == "interrupted":
            print(f"interrupted; run `alexnet demo` again to continue {out}")
            return 130

    # The validation at the end of the epoch is the evaluation on the full test set (the store's
    # val split is Fashion-MNIST's 10,000 test images), so it is not run a second time.
    final = [r for r in _epochs(out) if "val_top1_error" in r][-1]
    five = shows_top5(open_store(store).num_classes)  # the rule of every command (10: shown)
    _step(
        f"test set ({final['val_images']:,} images, centre view): top-1 error "
        f"{final['val_top1_error']:.2%}, "
        + (f"top-5 error {final['val_top5_error']:.2%}, " if five else "")
        + f"loss {final['val_loss']:.4f}"
    )
    print(
        f"    the same with the paper's ten views: alexnet evaluate {out} --data {store} --views 10"
    )

    examples = write_examples(store, out / "examples")
    _step(f"predict: alexnet predict {out} {' '.join(str(p) for p in examples)}")
    loaded = load_model(out, "cpu")
    print_predictions(predict_images(loaded, [str(p) for p in examples], topk=3))

    minutes = (time.perf_counter() - t0) / 60
    print(
        f"\ndemo done in {minutes:.1f} min. Run folder: {out} (config.json, metrics.jsonl, "
        f"model.safetensors); curves: {out / 'curves.png'}; TensorBoard: "
        f"tensorboard --logdir {out}"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="prepare Fashion-MNIST, train the paper's net, evaluate")
    p.add_argument(
        "--out",
        "--output-dir",
        default="runs/demo",
        help="the run folder (default runs/demo; run again, it resumes or skips what is done)",
    )
    p.add_argument(
        "--data",
        "--store",
        dest="data",
        default="data/fashion-mnist",
        metavar="STORE",
        help="the prepared store it makes (default data/fashion-mnist; --store: the old name)",
    )
    p.add_argument(
        "--source", default=FASHION_MNIST_DIR, help=f"the IDX files (default {FASHION_MNIST_DIR})"
    )
    p.add_argument("--epochs", type=int, help="the demo recipe's epochs (default 1) [train.epochs]")
    p.set_defaults(handler=run_demo)
