"""`alexnet kernels`: the Figure 3 grid's pixel layout and the colour-specificity number,
checked against kernels built with known colour content and a float64 numpy reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet import checkpoint
from alexnet.config import get_profile
from alexnet.experiments import kernels as K
from alexnet.model import build_model

CLASSES = [f"c{i}" for i in range(4)]


def save_run(tmp_path, model, profile_name: str):
    """A weights file in the documented format (alexnet-weights/1 + profile + classes +
    preprocessing statistics), as `load_model` reads it."""
    profile = get_profile(profile_name)
    tensors = dict(model.state_dict())
    pre = {
        "mean_image": np.zeros((256, 256, 3)),
        "channel_mean": np.zeros(3),
        "channel_std": np.ones(3),
        "eigval": np.ones(3),
        "eigvec": np.eye(3),
    }
    for k, v in pre.items():
        tensors[f"preprocess.{k}"] = torch.as_tensor(v, dtype=torch.float32)
    meta = {
        "profile": profile.name,
        "config": json.dumps(profile.to_dict()),
        "classes": json.dumps(CLASSES),
    }
    run = tmp_path / f"run-{profile_name}"
    run.mkdir()
    checkpoint.save_weights(run / "model.safetensors", tensors, meta)
    return run


def reference_share(w):
    """Independent float64 reference: luminance by explicit (R+G+B)/3, chroma energy share."""
    w = np.asarray(w, dtype=np.float64)
    out = []
    for k in w:
        lum = (k[0] + k[1] + k[2]) / 3.0
        chroma = sum(float(((k[c] - lum) ** 2).sum()) for c in range(3))
        out.append(chroma / float((k**2).sum()))
    return np.array(out)


def grey_and_colour_kernels(rng):
    """96 kernels: 0-47 grey (R = G = B, arbitrary spatial pattern), 48-95 colour-opponent
    (R = -G, B = 0 at every pixel: the three colours sum to zero)."""
    w = np.empty((96, 3, 11, 11))
    pattern = rng.standard_normal((48, 11, 11))
    w[:48] = pattern[:, None]
    opp = rng.standard_normal((48, 11, 11))
    w[48:, 0], w[48:, 1], w[48:, 2] = opp, -opp, 0.0
    return w


def test_chroma_share_grey_zero_colourful_one():
    rng = np.random.default_rng(0)
    w = grey_and_colour_kernels(rng)
    share = K.chroma_share(w)
    assert np.allclose(share[:48], 0.0, atol=1e-12)
    assert np.allclose(share[48:], 1.0, atol=1e-12)
    # A general kernel agrees with the explicit reference formula.
    g = rng.standard_normal((5, 3, 11, 11))
    assert np.allclose(K.chroma_share(g), reference_share(g), rtol=1e-12)
    # i.i.d. Gaussian kernels: chroma is 2 of 3 colour dimensions, so about 2/3 on average.
    many = rng.standard_normal((400, 3, 11, 11))
    assert abs(K.chroma_share(many).mean() - 2 / 3) < 0.01
    # A single-colour kernel (only red): L = R/3, chroma energy (4/9 + 1/9 + 1/9) R^2 = 2/3.
    red = np.zeros((1, 3, 11, 11))
    red[0, 0] = rng.standard_normal((11, 11))
    assert K.chroma_share(red)[0] == pytest.approx(2 / 3)


@pytest.mark.slow  # builds and saves the 61M-parameter net (about 7 s)
def test_kernels_grid_pixels_and_tower_numbers(tmp_path):
    rng = np.random.default_rng(1)
    w = grey_and_colour_kernels(rng)
    torch.manual_seed(0)
    model = build_model("paper", num_classes=len(CLASSES))
    with torch.no_grad():
        model.conv1.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
    run = save_run(tmp_path, model, "paper")
    out = tmp_path / "k"
    from alexnet.commands import main

    assert main(["kernels", str(run), "--out", str(out), "--scale", "3"]) == 0
    rep = json.loads((out / "kernels.json").read_text())

    # The numbers: tower A (kernels 0-47) grey, tower B (48-95) colourful.
    towers = json.loads((out / "kernels.json").read_text())["towers"]
    assert set(towers) == {"A", "B"}
    assert towers["A"]["kernels"] == [0, 47] and towers["B"]["kernels"] == [48, 95]
    assert towers["A"]["chroma_share_mean"] < 1e-6
    assert towers["B"]["chroma_share_mean"] > 1 - 1e-6
    assert rep["greyer_tower"] == "A"
    md = (out / "kernels.md").read_text()
    assert "| A | 0-47 |" in md and "| B | 48-95 |" in md

    # The PNG's pixel layout, computed here from the documented geometry: 11x11 kernels at
    # scale 3 = 33-pixel tiles, 2-pixel white gaps, 16 per row, 3 rows per tower, a 10-pixel
    # grey band between the towers.
    img = np.asarray(Image.open(out / "kernels_grid.png").convert("RGB"))
    tile, gap, band = 33, 2, 10
    block_h = 3 * (tile + gap) + gap
    assert img.shape == (2 * block_h + band, 16 * (tile + gap) + gap, 3)
    assert (img[block_h : block_h + band] == 128).all()  # the band between tower A and B
    wf = torch.as_tensor(w, dtype=torch.float32).double().numpy()  # as stored (float32)
    tiles = 0
    for tower in range(2):
        top = tower * (block_h + band)
        for r in range(3):
            y = top + gap + r * (tile + gap)
            assert (img[y - gap : y] == 255).all()  # white gap above each row of tiles
            for c in range(16):
                x = gap + c * (tile + gap)
                assert (img[y : y + tile, x - gap : x] == 255).all()  # white gap to the left
                k = wf[tower * 48 + r * 16 + c]
                expect = np.round(255 * (k - k.min()) / (k.max() - k.min())).astype(np.uint8)
                expect = np.kron(expect.transpose(1, 2, 0), np.ones((3, 3, 1), np.uint8))
                got = img[y : y + tile, x : x + tile]
                assert np.abs(got.astype(int) - expect.astype(int)).max() <= 1
                # Grey kernels draw grey tiles; colour-opponent ones do not.
                if tower == 0:
                    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
                else:
                    assert (got[..., 0] != got[..., 1]).any()
                tiles += 1
        assert (img[top + block_h - gap : top + block_h] == 255).all()  # bottom gap
    assert tiles == 96
    assert (out / "kernels.png").stat().st_size > 0


@pytest.mark.slow  # builds and saves torchvision's 57M-parameter net
def test_kernels_one_block_for_torchvision_layout(tmp_path):
    torch.manual_seed(0)
    model = build_model("torchvision", num_classes=len(CLASSES))
    run = save_run(tmp_path, model, "torchvision")
    rep = K.run_kernels(run / "model.safetensors", tmp_path / "tv", scale=2)
    assert list(rep["towers"]) == ["all"]
    assert rep["towers"]["all"]["count"] == 64
    w = model.features[0].weight.detach().double().numpy()
    assert rep["towers"]["all"]["chroma_share_mean"] == pytest.approx(
        reference_share(w).mean(), rel=1e-9
    )
    img = np.asarray(Image.open(tmp_path / "tv" / "kernels_grid.png"))
    assert img.shape[:2] == (4 * (22 + 2) + 2, 16 * (22 + 2) + 2)  # 64 = 4 rows of 16
