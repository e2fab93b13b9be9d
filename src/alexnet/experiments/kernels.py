"""`alexnet kernels RUN`: Figure 3 of the paper, the conv1 kernels, and how colourful each
tower's kernels are.

The paper (Figure 3): "96 convolutional kernels of size 11x11x3 learned by the first
convolutional layer on the 224x224x3 input images. The top 48 kernels were learned on GPU 1
while the bottom 48 kernels were learned on GPU 2." and (Sec. 6.1) "the kernels on GPU 1 are
largely color-agnostic, while the kernels on on GPU 2 are largely color-specific. This kind of
specialization occurs during every run."

The grid: tower A's kernels (output channels 0-47 of conv1) in the upper block, tower B's
(48-95) in the lower block, 3 rows of 16 each, as in Figure 3. Each kernel is normalised for
display on its own: (w - min w) / (max w - min w) over its 3x11x11 values (one range for the
three colours, so the colour balance is kept), then upscaled by an integer factor (nearest
neighbour). The exact pixel layout is `grid_layout`'s docstring.

The colour-specificity number (the "chroma energy share"): for a kernel w of shape (3, h, w),
its luminance part is the mean over R, G, B at each pixel, L = (w_R + w_G + w_B) / 3, and its
chroma part is C = w - L (the same L subtracted from each colour). The kernel's share is
||C||^2 / ||w||^2: 0 for a grey kernel (R = G = B everywhere: colour-agnostic), 1 for a kernel
whose colours sum to zero at every pixel (pure colour opponency, e.g. red against green), and
in between otherwise. A tower's number is the mean share over its kernels (the median is
reported too). The paper's observation holds in a run when tower A's number is clearly below
tower B's. (An untrained net with i.i.d. N(0, s^2) weights has an expected share near 2/3: two of
the three colour directions are chroma.)

Layouts: the two-tower profiles (paper, cuda-convnet, caffe) give two blocks of 48. The
one-tower comparison net (towers=1, 48 kernels) and torchvision's layout (64 kernels, one tower)
are drawn as a single block "all" of rows of 16, with one number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from alexnet.errors import BadInput
from alexnet.evaluate import load_model
from alexnet.experiments.common import markdown_table
from alexnet.fileio import write_json, write_text
from alexnet.model import AlexNet
from alexnet.plots import plt, save_figure

COLS = 16  # Figure 3: 16 kernels per row, 3 rows per GPU


def conv1_weights(model: torch.nn.Module) -> np.ndarray:
    """conv1's weights as float64 (K, 3, h, w), whatever the layout and devices."""
    return model.conv1_weight().detach().to("cpu", torch.float64).numpy()


def tower_slices(model: torch.nn.Module, n_kernels: int) -> list[tuple[str, slice]]:
    """[(name, slice of conv1's output channels)]: A = first half, B = second half (Sec. 3.2:
    tower A's maps are the first half of every layer), or one block "all"."""
    if isinstance(model, AlexNet) and model.config.towers == 2:
        half = n_kernels // 2
        return [("A", slice(0, half)), ("B", slice(half, n_kernels))]
    return [("all", slice(0, n_kernels))]


def chroma_share(w: np.ndarray) -> np.ndarray:
    """Per kernel ||w - mean_rgb(w)||^2 / ||w||^2 for w of shape (K, 3, h, w) (module doc)."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise BadInput(f"expected kernels of shape (K, 3, h, w), got {w.shape}")
    lum = w.mean(axis=1, keepdims=True)
    chroma = w - lum
    total = (w**2).sum(axis=(1, 2, 3))
    return np.where(total > 0, (chroma**2).sum(axis=(1, 2, 3)) / np.maximum(total, 1e-300), 0.0)


def normalise_for_display(k: np.ndarray) -> np.ndarray:
    """One kernel (3, h, w) -> uint8 (h, w, 3): its own min to 0, its own max to 255."""
    k = np.asarray(k, dtype=np.float64)
    lo, hi = k.min(), k.max()
    v = np.full_like(k, 0.5) if hi - lo <= 0 else (k - lo) / (hi - lo)
    return np.round(255 * v).astype(np.uint8).transpose(1, 2, 0)


def grid_layout(
    n_per_block: list[int], size: int, scale: int = 4, gap: int = 2, block_gap: int = 10
) -> dict[str, Any]:
    """The exact pixel geometry of the grid (the test checks the PNG against it).

    Tiles are (size*scale) pixels square, COLS per row, separated from each other and from the
    block's edge by `gap` white pixels. Blocks (towers) are stacked top to bottom with a band of
    `block_gap` mid-grey (128) pixels between them. Tile j of block b sits at
        x = gap + (j % COLS) * (tile + gap)
        y = top[b] + gap + (j // COLS) * (tile + gap)
    with top[0] = 0 and top[b+1] = top[b] + rows[b] * (tile + gap) + gap + block_gap.
    """
    tile = size * scale
    rows = [-(-n // COLS) for n in n_per_block]
    width = COLS * (tile + gap) + gap
    tops, y = [], 0
    for r in rows:
        tops.append(y)
        y += r * (tile + gap) + gap + block_gap
    height = y - block_gap
    positions = [
        [
            (tops[b] + gap + (j // COLS) * (tile + gap), gap + (j % COLS) * (tile + gap))
            for j in range(n)
        ]
        for b, n in enumerate(n_per_block)
    ]
    return {
        "tile": tile,
        "gap": gap,
        "block_gap": block_gap,
        "rows": rows,
        "tops": tops,
        "width": width,
        "height": height,
        "positions": positions,
    }


def kernel_grid(
    w: np.ndarray,
    blocks: list[tuple[str, slice]],
    scale: int = 4,
    gap: int = 2,
    block_gap: int = 10,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The grid image uint8 (H, W, 3) of the kernels w (K, 3, h, w) and its layout."""
    size = w.shape[-1]
    sel = [list(range(w.shape[0]))[s] for _, s in blocks]
    lay = grid_layout([len(s) for s in sel], size, scale, gap, block_gap)
    img = np.full((lay["height"], lay["width"], 3), 255, dtype=np.uint8)
    for b in range(1, len(blocks)):  # the grey band between towers
        y0 = lay["tops"][b] - block_gap
        img[y0 : lay["tops"][b]] = 128
    t = lay["tile"]
    for b, idx in enumerate(sel):
        for j, k in enumerate(idx):
            y, x = lay["positions"][b][j]
            tile = normalise_for_display(w[k]).repeat(scale, 0).repeat(scale, 1)
            img[y : y + t, x : x + t] = tile
    return img, lay


def kernels_report(model: torch.nn.Module) -> dict[str, Any]:
    """The per-tower colour numbers of a model's conv1 (JSON-ready)."""
    w = conv1_weights(model)
    blocks = tower_slices(model, w.shape[0])
    share = chroma_share(w)
    towers = {}
    for name, s in blocks:
        v = share[s]
        towers[name] = {
            "kernels": [s.start, s.stop - 1],
            "count": int(len(v)),
            "chroma_share_mean": float(v.mean()),
            "chroma_share_median": float(np.median(v)),
            "chroma_share_per_kernel": [round(float(x), 6) for x in v],
        }
    return {"kernel_shape": list(w.shape), "towers": towers}


def run_kernels(run: str | Path, out: str | Path | None = None, scale: int = 4) -> dict[str, Any]:
    """Writes kernels_grid.png (raw grid), kernels.png (annotated), kernels.json, kernels.md."""
    loaded = load_model(run, "cpu")
    out = Path(out) if out else (Path(run) if Path(run).is_dir() else Path(run).parent)
    out.mkdir(parents=True, exist_ok=True)
    model = loaded
    w = conv1_weights(model)
    blocks = tower_slices(model, w.shape[0])
    img, lay = kernel_grid(w, blocks, scale=scale)
    Image.fromarray(img).save(out / "kernels_grid.png")
    rep = kernels_report(model)
    rep.update(
        {
            "figure": "Figure 3 (Krizhevsky et al. 2012): conv1 kernels",
            "weights": str(loaded.run_info.path),
            "profile": loaded.run_info.profile.name,
            "layout": loaded.run_info.profile.model.layout,
            "towers_in_model": getattr(model.config, "towers", 1),
            "definition": "chroma share of a kernel w (3,h,w): ||w - L||^2 / ||w||^2 with "
            "L = mean of w over R,G,B at each pixel; 0 = grey (colour-agnostic), 1 = pure "
            "colour opponency; a tower's number is the mean over its kernels",
            "grid": {
                k: lay[k] for k in ("tile", "gap", "block_gap", "rows", "tops", "width", "height")
            }
            | {"scale": scale, "blocks": [b for b, _ in blocks]},
        }
    )
    t = rep["towers"]
    if set(t) == {"A", "B"}:
        a, b = t["A"]["chroma_share_mean"], t["B"]["chroma_share_mean"]
        # Figure 3 names tower A (GPU 1) the colour-agnostic one; the towers are symmetric at
        # initialisation, so which one specialises is the run's: report which one is greyer.
        rep["greyer_tower"] = "A" if a < b else "B"
        rep["difference_B_minus_A"] = b - a
    write_json(out / "kernels.json", rep)
    write_text(out / "kernels.md", kernels_markdown(rep))
    _plot(img, lay, rep, blocks, out / "kernels.png")
    return rep


def kernels_markdown(rep: dict[str, Any]) -> str:
    rows = [
        [
            name,
            f"{v['kernels'][0]}-{v['kernels'][1]}",
            f"{v['chroma_share_mean']:.3f}",
            f"{v['chroma_share_median']:.3f}",
        ]
        for name, v in rep["towers"].items()
    ]
    text = (
        "conv1 kernels (Figure 3). Chroma share = ||w - L||^2 / ||w||^2, L the per-pixel mean "
        "over R, G, B: 0 = grey (colour-agnostic), 1 = purely colour-opponent.\n\n"
    )
    text += markdown_table(["tower", "kernels", "mean chroma share", "median"], rows)
    if "greyer_tower" in rep:
        text += (
            f"\nGreyer tower: {rep['greyer_tower']} (B - A = {rep['difference_B_minus_A']:+.3f});"
            " the paper: tower A (GPU 1) colour-agnostic, tower B (GPU 2) colour-specific.\n"
        )
    return text


def _plot(img, lay, rep, blocks, path) -> None:
    h, w = img.shape[:2]
    # Figure size from the grid's aspect: a left margin for the labels, a line for the title.
    fig_w, left, width = 11.0, 0.15, 0.83
    ax_h = fig_w * width * h / w
    fig_h = ax_h + 0.5
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes([left, 0.1 / fig_h, width, ax_h / fig_h])
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    for b, (name, _) in enumerate(blocks):
        t = rep["towers"][name]
        mid = lay["tops"][b] + (lay["rows"][b] * (lay["tile"] + lay["gap"])) / 2
        label = f"tower {name}" if name != "all" else "all kernels"
        ax.text(
            -10,
            mid,
            f"{label}\nkernels {t['kernels'][0]}-{t['kernels'][1]}\n"
            f"chroma share\n{t['chroma_share_mean']:.3f}",
            ha="right",
            va="center",
            fontsize=8,
        )
    fig.suptitle(
        f"Figure 3: conv1 kernels of {Path(rep['weights']).parent.name or rep['weights']}"
        f" ({rep['profile']})",
        fontsize=9,
    )
    save_figure(fig, path)
