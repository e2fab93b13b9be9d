"""The data pipeline: prepare any image dataset the paper's way (`alexnet prepare`), and feed it
fast (the training and evaluation loaders). docs/data.md describes the store and why.

    store = open_store("data/fashion-mnist")
    loader = make_train_loader(store, profile.data, batch_size=128, seed=0, epoch=0)
    for images, labels in loader: ...
"""

from alexnet.data.images import UnreadableImage, paper_image
from alexnet.data.loader import (
    TrainLoader,
    make_eval_loader,
    make_train_loader,
    spread_indices,
)
from alexnet.data.prepare import prepare_store
from alexnet.data.store import Stats, Store, open_store
from alexnet.data.views import (
    epoch_permutation,
    lighting_basis,
    pca_lighting,
    preprocess,
    ten_crop,
)

__all__ = [
    "Stats",
    "Store",
    "TrainLoader",
    "UnreadableImage",
    "epoch_permutation",
    "lighting_basis",
    "make_eval_loader",
    "make_train_loader",
    "open_store",
    "paper_image",
    "pca_lighting",
    "prepare_store",
    "preprocess",
    "spread_indices",
    "ten_crop",
]
