"""alexnet: Krizhevsky, Sutskever & Hinton (NIPS 2012), faithfully, on PyTorch.

import alexnet
model = alexnet.build_model("paper", num_classes=1000)  # plain modules: print, hook, export
alexnet.fast.fuse(model)                                # the fast form (what `alexnet train` runs)
alexnet.PROFILES  # "paper", "cuda-convnet", "caffe", "torchvision", "demo"
net = alexnet.load_model("runs/demo")                      # trained weights, eval mode
r = alexnet.evaluate_networks(["runs/a", "runs/b"], "data/fashion-mnist")  # an ensemble
"""

import importlib

from alexnet.config import PROFILES, DataConfig, ModelConfig, Profile, TrainConfig, get_profile
from alexnet.evaluate import evaluate_networks, load_model, predict_networks
from alexnet.model import build_model

__version__ = "0.1.0"
__all__ = [
    "PROFILES",
    "DataConfig",
    "ModelConfig",
    "Profile",
    "TrainConfig",
    "build_model",
    "evaluate_networks",
    "get_profile",
    "load_model",
    "predict_networks",
]


def __getattr__(name):
    # `alexnet.data.pca_lighting(...)` after a plain `import alexnet`: submodules load on use.
    try:
        return importlib.import_module(f"alexnet.{name}")
    except ModuleNotFoundError as e:
        raise AttributeError(f"module 'alexnet' has no attribute {name!r}") from e
