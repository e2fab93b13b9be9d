"""The package's layering (docs/architecture.md), read from the source with `ast`:

- every module has a rank, and imports only modules of lower rank (so there are no cycles);
- imports of the package's own modules are at the top of the file, never inside functions;
- the library does not import argparse: only alexnet.commands parses command lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "alexnet"

# Lower ranks are more basic. config -> model/lrn/optim/data -> train/evaluate ->
# experiments/benchmarks -> commands.
RANKS = {
    "alexnet.errors": 0,
    "alexnet.fileio": 1,
    "alexnet.config": 1,
    "alexnet.devices": 1,
    "alexnet.lrn_pool": 2,
    "alexnet.lrn": 2,
    "alexnet.optim": 2,
    "alexnet.plots": 2,
    "alexnet.checkpoint": 2,
    "alexnet.distributed": 2,
    "alexnet.data.listing": 2,
    "alexnet.data.images": 2,
    "alexnet.data.store": 2,
    "alexnet.data.photos": 2,
    "alexnet.towers": 3,
    "alexnet.runlog": 3,
    "alexnet.data.imagenet": 3,
    "alexnet.data.views": 3,
    "alexnet.model": 4,
    "alexnet.fast": 4,
    "alexnet.speed": 5,
    "alexnet.data.sources": 4,
    "alexnet.data.loader": 4,
    "alexnet.data.prepare": 5,
    "alexnet.data": 6,
    "alexnet.summary": 6,
    "alexnet.benchmarks.report": 6,
    "alexnet.evaluate": 7,
    "alexnet.runfolder": 7,
    "alexnet.trainstate": 7.5,  # (the train loop, rank 8, imports it)
    "alexnet.train": 8,
    "alexnet.experiments.common": 9,
    "alexnet.experiments.cifar_nets": 9,
    "alexnet.benchmarks.model": 9,
    "alexnet.benchmarks.data": 9,
    "alexnet.benchmarks.ops": 9,
    "alexnet.benchmarks.convs": 9,
    "alexnet.benchmarks.e2e": 10,
    "alexnet.experiments.figure1": 10,
    "alexnet.experiments.kernels": 10,
    "alexnet.experiments.neighbors": 10,
    "alexnet.experiments.ablate": 11,
    "alexnet.experiments.report": 11,
    "alexnet.experiments.finetune": 11,
    "alexnet.experiments.recipes": 12,
    "alexnet.experiments": 13,
    "alexnet.benchmarks": 13,
    "alexnet.commands.summary": 14,
    "alexnet.commands.prepare": 14,
    "alexnet.commands.train": 14,
    "alexnet.commands.evaluate": 14,
    "alexnet.commands.experiments": 14,
    "alexnet.commands.bench": 14,
    "alexnet.commands.demo": 15,
    "alexnet.commands": 16,
    "alexnet": 17,
    "alexnet.__main__": 18,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(SRC.rglob("*.py"))}


def own_imports(tree: ast.Module, name: str, top_level_only: bool):
    """(line, imported alexnet module) of `tree`'s imports of the package's modules."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "alexnet":
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] != "alexnet":
                continue
            for a in node.names:  # `from alexnet.data import sources`: the submodule
                sub = f"{node.module}.{a.name}"
                yield node.lineno, sub if sub in RANKS else node.module


def test_every_module_has_a_rank():
    assert sorted(modules()) == sorted(RANKS)


def test_modules_import_only_lower_ranks():
    bad = []
    for name, tree in modules().items():
        for line, target in own_imports(tree, name, top_level_only=False):
            if RANKS[target] >= RANKS[name] and not name.startswith(target + "."):
                bad.append(f"{name}:{line} imports {target} (rank {RANKS[target]} >= "
                           f"{RANKS[name]})")  # fmt: skip
    assert not bad, "\n".join(bad)


def test_own_imports_are_at_the_top_of_the_file():
    late = []
    for name, tree in modules().items():
        top = set(own_imports(tree, name, top_level_only=True))
        late += [f"{name}:{line} {t}" for line, t in own_imports(tree, name, False)
                 if (line, t) not in top]  # fmt: skip
    assert not late, "function-level imports of the package's modules:\n" + "\n".join(late)


def test_only_the_commands_parse_arguments():
    users = [
        name
        for name, tree in modules().items()
        if not name.startswith("alexnet.commands")
        and any(
            (isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and n.module == "argparse")
            for n in ast.walk(tree)
        )
    ]
    assert not users, users


def test_docs_hold_no_paths_of_the_machine_that_made_them():
    """Issue 10: the published tables and figures name stores and runs, not the folders of the
    machine they were made on (a reader's clone has none of them)."""
    root = SRC.parents[1]
    files = [root / "README.md", root / "BENCHMARKS.md", *sorted((root / "docs").rglob("*"))]
    bad = []
    for f in files:
        if f.is_file() and f.suffix in (".md", ".json", ".html", ".png"):
            text = f.read_bytes().decode("latin-1")
            bad += [
                f"{f.relative_to(root)}: {p}" for p in ("/tmp/", "/work/", "/root/") if p in text
            ]
    assert not bad, bad


def test_long_modules_say_why():
    """Issue 12: no module over about 450 lines without the reason in its docstring."""
    long = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 470:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Why one file of this length" not in doc:
                long.append(str(path.relative_to(SRC)))
    assert not long, long
