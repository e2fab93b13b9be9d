"""The paper's experiments and figures, one command each (alexnet.commands.experiments).

- `alexnet figure1`   (figure1.py)   Figure 1: ReLU versus tanh, epochs to 25% training error.
                      (cifar_nets.py) its small nets and their plain training loop.
- `alexnet ablate`    (ablate.py)    Sec. 3.3-3.5, 4.1, 4.2: each design choice switched off.
- `alexnet recipes`   (recipes.py)   Sec. 5: do the recipes learn; one-change controls if not.
- `alexnet kernels`   (kernels.py)   Figure 3: the 96 conv1 kernels and their colour specificity.
- `alexnet neighbors` (neighbors.py) Figure 4: nearest training images in fc7 space, top-5.
- `alexnet report`    (report.py)    one self-contained HTML page for a run.

Every command writes PNG figures, JSON numbers and a Markdown table into its output folder;
docs/experiments.md describes each, with its quick and full costs.
"""
