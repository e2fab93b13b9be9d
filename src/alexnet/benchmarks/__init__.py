"""Benchmarks: `model` (training and inference speed against torchvision's AlexNet), `data`
(the loader against torchvision's ImageFolder), and `report` (the machine, BENCHMARKS.md)."""
