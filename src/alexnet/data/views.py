"""The views the network sees (Sec. 4.1 of the paper; cuda-convnet's convdata.py as options).

Training: a random crop of the stored S x S image (S - c + 1 positions per axis), a horizontal
reflection with probability 1/2, PCA lighting, and mean subtraction. Evaluation: the centre crop,
or the ten views (four corners, centre, and the same five reflected).

Every random draw is a pure function of (seed, epoch, image index) computed by a counter-based
hash (splitmix64), never of a stateful generator: a worker can compute the views of any batch on
its own, whatever the number of workers, and a resumed epoch repeats the interrupted one exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alexnet.config import DataConfig
from alexnet.data.images import paper_image
from alexnet.errors import BadInput, NotFound

MEAN_MODES = ("image", "center", "channel", "channel-std")
LIGHTING_MODES = ("paper", "cuda-convnet")

# --- counter-based random numbers --------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK = (1 << 64) - 1
STREAM_CROP, STREAM_FLIP, STREAM_LIGHT = 1, 2, 3


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic, no warnings)."""
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


def hash_uniform(seed: int, epoch: int, stream: int, idx, k: int = 1) -> np.ndarray:
    """(len(idx), k) float64 uniforms in [0, 1), a pure function of every argument."""
    key = np.array([seed & _MASK], dtype=np.uint64)
    key = _mix(_mix(key) ^ (np.array([epoch & _MASK], dtype=np.uint64) * _GOLDEN))
    key = _mix(key ^ (np.array([stream], dtype=np.uint64) * _M2))
    ctr = np.asarray(idx, dtype=np.int64).astype(np.uint64)[:, None] * np.uint64(k)
    ctr = ctr + np.arange(k, dtype=np.uint64)[None, :]
    z = _mix(_mix(ctr + _GOLDEN) ^ key)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_normal(seed: int, epoch: int, stream: int, idx, k: int) -> np.ndarray:
    """(len(idx), k) standard normals (Box-Muller on hash_uniform)."""
    u = hash_uniform(seed, epoch, stream, idx, 2 * k)
    r = np.sqrt(-2.0 * np.log1p(-u[:, :k]))  # 1 - u in (0, 1]
    return r * np.cos(2.0 * math.pi * u[:, k:])


def epoch_permutation(n: int, seed: int, epoch: int, part: int = 0) -> np.ndarray:
    """The order of an epoch: a function of (seed, epoch) only; `part` p > 0: the order of the
    epoch's pass p over a split it cycles (train.min_steps)."""
    ss = np.random.SeedSequence([seed & _MASK, epoch & _MASK, 0xA1E] + ([part] if part else []))
    return np.random.default_rng(ss).permutation(n)


# --- public tensor functions -------------------------------------------------------------------


def pca_lighting(image: torch.Tensor, eigval, eigvec, std: float = 0.1, generator=None):
    """Sec. 4.1: add [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T to every pixel, a_i ~ N(0, std) drawn
    afresh on every call, one draw per image. `image` is float (3, H, W) or (N, 3, H, W);
    eigvec holds the eigenvectors p_i as columns. Returns a new tensor."""
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise BadInput(f"pca_lighting expects (3, H, W) or (N, 3, H, W), got {tuple(image.shape)}")
    batch = image if image.dim() == 4 else image[None]
    lam = torch.as_tensor(np.asarray(eigval, dtype=np.float64), dtype=torch.float64)
    vec = torch.as_tensor(np.asarray(eigvec, dtype=np.float64), dtype=torch.float64)
    alpha = torch.randn((batch.shape[0], 3), generator=generator, dtype=torch.float64) * std
    offset = (alpha * lam) @ vec.T  # row n: eigvec @ (alpha_n * eigval)
    out = batch + offset.to(image.dtype).to(image.device)[:, :, None, None]
    return out if image.dim() == 4 else out[0]


def five_positions(size: int, crop: int) -> list[tuple[int, int]]:
    """(top, left) of the four corners (top-left, top-right, bottom-left, bottom-right) and
    the centre (Sec. 4.1's test views)."""
    e, m = size - crop, (size - crop) // 2
    return [(0, 0), (0, e), (e, 0), (e, e), (m, m)]


def ten_crop(image: torch.Tensor, size: int = 224) -> torch.Tensor:
    """(10, C, size, size): four corners (top-left, top-right, bottom-left, bottom-right),
    centre, then the same five horizontally reflected, in that order (Sec. 4.1; as
    cuda-convnet's multiview test). Note torchvision's ten_crop differs: its reflected views
    are crops of the reflected image, so its view 5 is the mirror of the top-right corner."""
    if image.dim() != 3:
        raise BadInput(f"ten_crop expects (C, H, W), got {tuple(image.shape)}")
    h, w = image.shape[-2:]
    if h != w:
        raise BadInput(f"ten_crop expects a square image, got {h}x{w}")
    if size > h:
        raise BadInput(f"crop {size} is larger than the image ({h})")
    five = [image[:, y : y + size, x : x + size] for y, x in five_positions(h, size)]
    return torch.stack(five + [v.flip(-1) for v in five])


def lighting_basis(stats, mode: str = "paper") -> tuple[np.ndarray, np.ndarray]:
    """(l, eigvec) such that eigvec @ (alpha * l) is the lighting offset in 0-255 pixel units.

    "paper" (Sec. 4.1): offset = eigvec @ (alpha * eigval). The formula is not scale-invariant:
    with eigenvalues of 0-255 values the offsets would be hundreds of levels. We read "RGB pixel
    values" as intensities in [0, 1] (as fb.resnet.torch and most reimplementations do) and
    rescale the offset to 0-255: l = 255 * (eigval / 255^2) = eigval / 255.
    "cuda-convnet" (convdata.py): eigvec @ (N(0,1) * stdevs) * coeff with stdevs the square
    roots of the eigenvalues, which is scale-free: l = sqrt(eigval)."""
    eigval = np.asarray(stats.eigval, dtype=np.float64)
    if mode == "paper":
        return eigval / 255.0, np.asarray(stats.eigvec, dtype=np.float64)
    if mode == "cuda-convnet":
        return np.sqrt(np.clip(eigval, 0, None)), np.asarray(stats.eigvec, dtype=np.float64)
    raise BadInput(f"unknown lighting {mode!r}; valid: {', '.join(LIGHTING_MODES)}")


# --- the views of a batch ----------------------------------------------------------------------


@dataclass
class ViewSpec:
    """Everything a worker needs to turn stored images into network input (picklable)."""

    size: int  # stored side S
    crop: int  # c
    mean: str
    mean_image: np.ndarray  # float32 (3, S, S) planar
    channel_mean: np.ndarray  # float32 (3,)
    channel_std: np.ndarray  # float32 (3,)
    flip: bool = True
    lighting_std: float = 0.0  # 0: off
    lighting: str = "paper"
    basis: np.ndarray | None = None  # (3, 3): row-vector alpha @ basis is the offset
    crop_chunk: int = 1
    input_scale: float = 1.0

    @classmethod
    def build(cls, data: DataConfig, stats, size: int, lighting: bool = True) -> ViewSpec:
        if data.mean not in MEAN_MODES:
            raise BadInput(f"unknown DataConfig.mean {data.mean!r}; valid: {MEAN_MODES}")
        if data.crop_size > size:
            raise BadInput(f"crop {data.crop_size} is larger than the stored images ({size})")
        if data.image_size != size:
            raise BadInput(
                f"the store holds {size}x{size} images but the profile expects "
                f"{data.image_size}x{data.image_size} (DataConfig.image_size)"
            )
        std = float(data.lighting_std) if lighting else 0.0
        basis = None
        if std > 0:
            lam, vec = lighting_basis(stats, data.lighting)
            basis = (lam[:, None] * vec.T).astype(np.float64)  # alpha @ basis = vec @ (alpha*lam)
        return cls(
            size=size,
            crop=data.crop_size,
            mean=data.mean,
            mean_image=np.ascontiguousarray(stats.mean_image.transpose(2, 0, 1), np.float32),
            channel_mean=np.asarray(stats.channel_mean, np.float32),
            channel_std=np.asarray(stats.channel_std, np.float32),
            flip=data.flip,
            lighting_std=std,
            lighting=data.lighting,
            basis=basis,
            crop_chunk=max(1, int(data.crop_chunk)),
            input_scale=float(data.input_scale),
        )

    # -- random views --

    def train_params(self, seed: int, epoch: int, idx: np.ndarray, pos: np.ndarray):
        """Crop corners, flips and lighting offsets of images `idx` at epoch positions `pos`.

        Crops and flips are drawn per image (the paper), or per chunk of crop_chunk consecutive
        epoch positions (cuda-convnet's convdata.py: "This many images will be cropped in the
        same way"); lighting is per image either way."""
        span = self.size - self.crop + 1  # convdata.py: randint(0, 2 * border + 1)
        key = idx if self.crop_chunk == 1 else pos // self.crop_chunk
        u = hash_uniform(seed, epoch, STREAM_CROP if self.crop_chunk == 1 else 11, key, 2)
        ys = np.minimum((u[:, 0] * span).astype(np.int64), span - 1)
        xs = np.minimum((u[:, 1] * span).astype(np.int64), span - 1)
        stream = STREAM_FLIP if self.crop_chunk == 1 else 12
        flips = hash_uniform(seed, epoch, stream, key, 1)[:, 0] < 0.5 if self.flip else None
        if flips is None:
            flips = np.zeros(len(idx), dtype=bool)
        offsets = None
        if self.lighting_std > 0:
            alpha = hash_normal(seed, epoch, STREAM_LIGHT, idx, 3) * self.lighting_std
            offsets = (alpha @ self.basis).astype(np.float32)  # (n, 3) in pixel units
        return ys, xs, flips, offsets

    def scale(self) -> np.ndarray | None:
        """Per-channel factor applied last (None for 1)."""
        s = np.ones(3, np.float32)
        if self.mean == "channel-std":  # torchvision: (x/255 - m/255) / (s/255)
            s = s / self.channel_std
        if self.lighting_std > 0 and self.lighting == "cuda-convnet":
            s = s / np.float32(1.0 + self.lighting_std)  # convdata.py: data /= 1 + coeff
        if self.input_scale != 1.0:
            s = s * np.float32(self.input_scale)
        return None if np.all(s == 1) else s

    # -- crops --

    def cut(self, planar: np.ndarray, y: int, x: int, flip: bool, out: np.ndarray) -> None:
        """out[...] = the (C, c, c) crop at (y, x) of a planar image, reflected if flip."""
        c = self.crop
        view = planar[:, y : y + c, x : x + c]
        out[...] = view[:, :, ::-1] if flip else view

    def finish(self, u8, ys, xs, flips, offsets, out: np.ndarray | None = None) -> torch.Tensor:
        """float32 (n, 3, c, c) network input from uint8 crops (n, C, c, c) already cut and
        reflected: minus the mean, plus the lighting offset, times the scale.

        On the CPU each image is done whole while it is in cache, with numpy: single-threaded
        on purpose (torch's intra-op threads on 150k-element ops cost more in synchronisation
        than they save, badly so when the trainer keeps the cores busy). `out`, when given, is
        a recycled array (a fresh 77 MB batch pays ~19k page faults, more than the arithmetic).
        On a GPU: finish_torch."""
        u8 = torch.as_tensor(u8)
        if u8.device.type != "cpu":
            return self.finish_torch(u8, ys, xs, flips, offsets)
        src = u8.numpy()
        ys, xs, flips = np.asarray(ys), np.asarray(xs), np.asarray(flips)
        offsets = None if offsets is None else np.asarray(offsets, np.float32)
        n, c, s = len(src), self.crop, self.size
        if out is None:
            out = np.empty((n, 3, c, c), np.float32)
        mirror = self._mirror()
        scale = self.scale()
        centre = (s - c) // 2
        for k in range(n):
            if self.mean == "image":  # Sec. 2: the mean image, cropped (and reflected) alike
                y, x = int(ys[k]), int(xs[k])
                if flips[k]:
                    x = s - c - x
                    m = mirror[:, y : y + c, x : x + c]
                else:
                    m = self.mean_image[:, y : y + c, x : x + c]
            elif self.mean == "center":  # convdata.py: data_mean_crop for every crop
                m = self.mean_image[:, centre : centre + c, centre : centre + c]
            else:
                m = self.channel_mean[:, None, None]
            o = out[k]
            np.copyto(o, src[k], casting="unsafe")  # grey (C = 1) broadcasts to RGB here
            o -= m
            if offsets is not None:
                o += offsets[k][:, None, None]
            if scale is not None:
                o *= scale[:, None, None]
        return torch.from_numpy(out)

    def _mirror(self) -> np.ndarray:
        cache = self.__dict__.setdefault("_mirror_cache", {})
        if "m" not in cache:
            cache["m"] = np.ascontiguousarray(self.mean_image[:, :, ::-1])
        return cache["m"]

    def finish_torch(self, u8: torch.Tensor, ys, xs, flips, offsets) -> torch.Tensor:
        """finish() as batched tensor ops on u8's device (the GPU path).

        ys, xs, flips and offsets are best given as tensors already on u8's device (the loader
        copies them there with the batch, from pinned memory, without waiting): an array from
        the host here would be a synchronous copy, which waits for every kernel queued before
        it. The constants (mean image, channel mean, scale) are copied once per device."""
        dev = u8.device
        n, c, s = u8.shape[0], self.crop, self.size
        x = u8.float()
        if x.shape[1] == 1:
            x = x.expand(n, 3, c, c)
        if self.mean == "image":
            mean = self._const_t("mean_image", dev)
            ar = torch.arange(c, device=dev)
            ys_t = torch.as_tensor(ys, device=dev)[:, None]
            xs_t = torch.as_tensor(xs, device=dev)[:, None]
            fl = torch.as_tensor(flips, device=dev)[:, None].bool()
            rows = ys_t + ar
            cols = torch.where(fl, xs_t + (c - 1 - ar), xs_t + ar)
            m = mean[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
        elif self.mean == "center":
            o = (s - c) // 2
            m = self._const_t("mean_image", dev)[None, :, o : o + c, o : o + c]
        else:
            m = self._const_t("channel_mean", dev)[None, :, None, None]
        x = x - m
        if offsets is not None:
            x = x + torch.as_tensor(offsets, device=dev)[:, :, None, None]
        if self.scale() is not None:
            x = x * self._const_t("scale", dev)[None, :, None, None]
        return x.contiguous()

    def cut_torch(self, images: torch.Tensor, ys, xs, flips, per_image: int = 1) -> torch.Tensor:
        """cut() for a batch on its device: uint8 (m, C, S, S) whole images -> the (n, C, c, c)
        crops at (ys, xs), reflected where flips; row r of the output is cut from image
        r // per_image (the ten evaluation views of one image share its decode)."""
        dev, c = images.device, self.crop
        n = len(ys)
        ar = torch.arange(c, device=dev)
        ys_t = torch.as_tensor(ys, device=dev)[:, None]
        xs_t = torch.as_tensor(xs, device=dev)[:, None]
        fl = torch.as_tensor(flips, device=dev)[:, None].bool()
        rows = ys_t + ar  # (n, c)
        cols = torch.where(fl, xs_t + (c - 1 - ar), xs_t + ar)
        which = torch.arange(n, device=dev) // per_image
        # Advanced indices around a slice put their dimensions first: (n, c, c, C).
        out = images[which[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()

    def _const_t(self, name: str, dev) -> torch.Tensor:
        cache = self.__dict__.setdefault("_const_t_cache", {})
        key = (name, str(dev))
        if key not in cache:
            value = self.scale() if name == "scale" else getattr(self, name)
            cache[key] = torch.as_tensor(np.asarray(value, np.float32), device=dev)
        return cache[key]

    def __getstate__(self):  # caches stay behind
        return {k: v for k, v in self.__dict__.items() if not k.endswith("_cache")}

    # -- evaluation views --

    def eval_layout(self, views: int) -> tuple[list[tuple[int, int]], list[bool]]:
        c, s = self.crop, self.size
        if views == 1:
            o = (s - c) // 2
            return [(o, o)], [False]
        if views == 10:
            five = five_positions(s, c)
            return five + five, [False] * 5 + [True] * 5
        raise BadInput(f"views must be 1 (centre crop) or 10 (Sec. 4.1's ten views), got {views}")


# --- prediction --------------------------------------------------------------------------------


def preprocess(image, data: DataConfig, stats, views: int = 1) -> torch.Tensor:
    """A PIL image or an image file, prepared exactly as the store's images (Sec. 2: EXIF
    orientation, RGB, shorter side to S, central S x S), then the evaluation view(s) with the
    mean subtracted: (3, c, c) for views=1, (10, 3, c, c) for views=10."""
    if isinstance(image, str | Path):
        p = Path(image)
        if not p.exists():
            raise NotFound(f"no image file {p}")
    pic = paper_image(image, data.image_size)  # UnreadableImage (a ValueError) names the file
    spec = ViewSpec.build(data, stats, data.image_size, lighting=False)
    planar = np.ascontiguousarray(pic.transpose(2, 0, 1))
    pos, flips = spec.eval_layout(views)
    u8 = np.empty((len(pos), 3, spec.crop, spec.crop), np.uint8)
    for k, ((y, x), f) in enumerate(zip(pos, flips, strict=True)):
        spec.cut(planar, y, x, f, u8[k])
    ys, xs = np.array([p[0] for p in pos]), np.array([p[1] for p in pos])
    out = spec.finish(torch.from_numpy(u8), ys, xs, np.array(flips), None)
    return out[0] if views == 1 else out
