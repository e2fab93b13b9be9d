"""The README's figures that the suite itself can check: how many tests it holds."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_states_the_number_of_tests_collected(request):
    """README's "N tests (K of them CUDA checks, ...)" against what pytest collected in this
    session, when the session is the whole suite (`make test`, CI); a partial session (a file,
    -k, -m "not slow") cannot tell and is skipped."""
    m = re.search(r"(\d[\d,]*) tests \((\d+) of them CUDA checks", (ROOT / "README.md").read_text())
    assert m, "README.md no longer states the suite's size as 'N tests (K of them CUDA checks'"
    cfg, items = request.config, request.session.items
    every = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    whole = (
        {Path(str(i.path)).name for i in items} == every
        and not cfg.option.keyword
        and not cfg.option.markexpr
        and not cfg.getoption("deselect", None)
        and not any("::" in a for a in cfg.args)
    )
    if not whole:
        pytest.skip("checked when the whole suite runs (make test, CI)")
    cuda = sum(Path(str(i.path)).name == "test_cuda.py" for i in items)
    stated = (int(m.group(1).replace(",", "")), int(m.group(2)))
    assert stated == (len(items), cuda), (
        f"README.md says {stated[0]} tests, {stated[1]} of them CUDA checks; the suite has "
        f"{len(items)}, {cuda} of them in tests/test_cuda.py: write these"
    )


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```sh block after `heading` in README.md, comments removed."""
    text = (ROOT / "README.md").read_text()
    at = text.index(heading)
    block = re.search(r"```sh\n(.*?)```", text[at:], re.S)
    assert block, f"README.md: no ```sh block after {heading!r}"
    lines = [line.split("  #", 1)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.slow
def test_readme_own_photos_path(tmp_path, tiny_store):
    """README's "Your own photos", command by command as printed: real photos (crops of
    scikit-image's photographs of brick, grass and gravel, alexnet.data.photos; held-out crops
    from another part of each photo) prepared, fine-tuned with --profile finetune --init
    runs/demo, evaluated (better than chance, 66.7% top-1 error on 3 classes) and predicted.
    `alexnet demo` (minutes) is stood in for by a 4-step run of the demo recipe, and training
    stops at step 45 of 300 (--max-steps appended: the whole run takes minutes on 2 cores), so
    the error here is not the table's (docs/finetune-photos.md): it shows the path works."""
    pytest.importorskip("skimage")
    from alexnet.data.photos import make_photo_folder

    commands = readme_block("## Your own photos")
    assert commands[0] == "alexnet demo", commands
    make_photo_folder(tmp_path / "my-photos", per_class=30, val_per_class=20, seed=0)
    new = tmp_path / "new-photos" / "from-the-phone"
    make_photo_folder(tmp_path / "new", per_class=1, val_per_class=1, seed=9)
    new.mkdir(parents=True)
    for i, jpg in enumerate(sorted((tmp_path / "new" / "val").rglob("*.jpg"))):
        (new / f"IMG_{i:04d}.jpg").write_bytes(jpg.read_bytes())
    (new / "notes.txt").write_text("not a photo")  # predict takes the images only
    run = lambda argv: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "alexnet", *argv], cwd=tmp_path, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    demo = run(["train", "--profile", "demo", "--data", str(tiny_store), "--out", "runs/demo",
                "--max-steps", "4", "--batch-size", "8"])  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    outputs = {}
    for line in commands[1:]:
        argv = shlex.split(line)
        assert argv[0] == "alexnet", line
        if argv[1] == "train":  # 45 of the recipe's 300 steps (1.5 epochs): the time budget
            argv += ["--max-steps", "45"]
        r = run(argv[1:])
        assert r.returncode == 0, (line, r.stdout, r.stderr)
        outputs[argv[1]] = r.stdout
    config = json.loads((tmp_path / "runs" / "my-photos" / "config.json").read_text())
    assert config["profile"]["name"] == "finetune" and config["derived"]["init"]["loaded"]
    print(outputs["evaluate"])  # (pytest -s: the example's error, for the record)
    m = re.search(r"top-1 error ([\d.]+)%", outputs["evaluate"])
    assert m, outputs["evaluate"]
    assert float(m.group(1)) < 50.0, outputs["evaluate"]  # chance: 66.7%
    for i in range(3):
        assert f"IMG_{i:04d}.jpg" in outputs["predict"], outputs["predict"]
    assert "notes.txt" not in outputs["predict"]
