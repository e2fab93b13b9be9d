"""Issue 11, the data side: no code runs from a CIFAR-10 batch, nothing hangs (a dead prepare
worker, a FIFO), one prepare per store, resume checks shard contents, images cost bounded
memory. Each test names the item it covers."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import alexnet.data.prepare as prep
from alexnet.commands import main as cli_main
from alexnet.data import prepare_store
from alexnet.data.sources import open_source, read_cifar_batch
from alexnet.errors import BadInput
from alexnet.experiments.figure1 import Figure1Config, load_dataset
from conftest import deadline, one_line_error
from test_data_prepare import assert_same_store, photo_tree, quiet, shard_files, write_cifar
from test_data_prepare import cli_main as prepare_main

# --- item 1: CIFAR-10 batches never run code --------------------------------------------------


class _Payload:
    """Unpickling calls `func(*args)`: what a crafted batch can make pickle.load do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_item1_a_cifar10_batch_that_runs_code_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payloads = {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').write('x')"),
    }
    for name, payload in payloads.items():
        root = tmp_path / name / "cifar-10-batches-py"
        write_cifar(root)
        # A batch that looks right, with the payload among its values.
        batch = {
            b"data": np.zeros((3, 3072), np.uint8),
            b"labels": [0, 1, 2],
            b"batch_label": payload,
        }
        (root / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
        out = tmp_path / name / "out"
        rc = cli_main(["prepare", str(root.parent), str(out), "--kind", "cifar10", "-q"])
        err = capsys.readouterr().err
        assert rc == 2
        line = one_line_error(err, root / "data_batch_1", "not a CIFAR-10 batch")
        assert "refused global" in line, line
        assert not marker.exists(), f"the {name} payload ran"
        assert not out.exists()  # refused while listing, before anything is written
        # figure1 reads CIFAR-10 through the same reader.
        with pytest.raises(BadInput, match="not a CIFAR-10 batch"):
            load_dataset(Figure1Config(data=str(root)))
        assert not marker.exists()


def test_item1_a_pickle_that_is_not_a_dict_is_one_clear_line(tmp_path, capsys):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root)
    (root / "data_batch_2").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    rc = cli_main(["prepare", str(tmp_path), str(tmp_path / "out"), "--kind", "cifar10", "-q"])
    assert rc == 2
    line = one_line_error(capsys.readouterr().err, root / "data_batch_2")
    assert "not a CIFAR-10 batch: a pickled list, not a dict" in line


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_item1_real_format_batches_still_read(tmp_path, protocol):
    """The official files are Python 2 pickles (protocol 2, bytes keys); batches re-pickled by
    Python 3 use its default protocol (numpy's arrays then pickle otherwise)."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4, 1], b"data": data,
             b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}  # fmt: skip
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    got = read_cifar_batch(path)
    np.testing.assert_array_equal(got[b"data"], data)
    assert got[b"labels"] == [3, 1, 4, 1] and got[b"filenames"][0] == b"a.png"
    meta = tmp_path / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=protocol))
    assert read_cifar_batch(meta, keys=(b"label_names",))[b"label_names"][0] == b"airplane"


# --- item 2: a dead prepare worker ends the command ---------------------------------------------


def test_item2_a_killed_prepare_worker_is_an_error_within_seconds_and_a_rerun_resumes(
    tmp_path, monkeypatch, capsys
):
    src = photo_tree(tmp_path / "src", per_class=4)
    out = tmp_path / "out"
    argv = ["prepare", str(src), str(out), "--size", "24", "--val-fraction", "0.25",
            "--chunk-size", "1", "--workers", "2", "-q"]  # fmt: skip
    victim = (src / "c1" / "2.jpg").read_bytes()
    real = prep.encode_item

    def dying(data, params):
        if isinstance(data, bytes) and data == victim:
            # Some chunks finished first (the work to keep), then the worker dies as the OOM
            # killer or a decoder's segfault would end it.
            t0 = time.time()
            while len(list(out.glob(".prepare/*.npz"))) < 2 and time.time() - t0 < 30:
                time.sleep(0.01)
            (tmp_path / "killed_at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, params)

    monkeypatch.setattr(prep, "encode_item", dying)
    with deadline(60):
        rc = cli_main(argv)
    latency = time.time() - float((tmp_path / "killed_at").read_text())
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\nthe command ended {latency:.3f} s after its worker was killed")
    assert rc == 2
    one_line_error(err, out, "worker process died", "run the same command")
    assert latency < 10
    # The chunks finished (shard and result file both written) are kept as they are.
    done = {f"{p.stem.split('-')[0]}/shard-{p.stem.split('-')[1]}.bin"
            for p in out.glob(".prepare/*.npz")}  # fmt: skip
    kept = {k: v for k, v in shard_files(out).items() if k in done}
    assert len(kept) >= 2
    monkeypatch.setattr(prep, "encode_item", real)
    logs = []
    prepare_store(src, out, size=24, val_fraction=0.25, chunk_size=1, workers=2,
                  progress=False, log=logs.append)  # fmt: skip
    assert any(line.startswith("resuming: ") for line in logs), logs
    after = shard_files(out)
    assert all(after[k] == v for k, v in kept.items())  # not made again
    prepare_store(src, tmp_path / "clean", **quiet(size=24, val_fraction=0.25, chunk_size=1))
    assert_same_store(out, tmp_path / "clean")


def test_item2_a_worker_error_is_raised_not_lost(tmp_path, monkeypatch):
    """An exception in a worker (not a death) still reaches the caller as itself."""
    src = photo_tree(tmp_path / "src", per_class=2)

    def broken(stored):
        raise KeyError("a bug")

    monkeypatch.setattr(prep, "_pixel_products", broken)
    with deadline(60), pytest.raises(KeyError, match="a bug"):
        prepare_store(src, tmp_path / "out", size=16, val_fraction=0.5, chunk_size=1,
                      workers=2, progress=False, log=lambda *a: None)  # fmt: skip


# --- item 4: one prepare per store ---------------------------------------------------------------


@pytest.mark.slow
def test_item4_a_second_prepare_into_the_same_store_is_refused_at_once(tmp_path, capsys):
    src = photo_tree(tmp_path / "src", per_class=4)
    out = tmp_path / "out"
    slow = textwrap.dedent(f"""
        import time
        import alexnet.data.prepare as prep
        real = prep.encode_item
        def slow(data, params):
            time.sleep(0.5)
            return real(data, params)
        prep.encode_item = slow
        prep.prepare_store({str(src)!r}, {str(out)!r}, size=24, val_fraction=0.25, chunk_size=1,
                           workers=1, progress=False)
    """)
    first = subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not (out / ".lock").exists() or not (out / ".lock").read_text().strip():
            assert first.poll() is None and time.time() - t0 < 120
            time.sleep(0.05)
        argv = ["prepare", str(src), str(out), "--size", "24", "--val-fraction", "0.25",
                "--chunk-size", "1", "--workers", "1", "-q"]  # fmt: skip
        t1 = time.perf_counter()
        assert cli_main(argv) == 2
        assert time.perf_counter() - t1 < 5  # at once, not after the first
        one_line_error(capsys.readouterr().err, out, f"in use by process {first.pid}")
        assert first.poll() is None  # the first goes on undisturbed
    finally:
        first.kill()
        first.wait()
    # The lock dies with its holder: the same command resumes the killed prepare.
    assert cli_main(argv) == 0
    prepare_store(src, tmp_path / "clean", **quiet(size=24, val_fraction=0.25, chunk_size=1))
    assert_same_store(out, tmp_path / "clean")


# --- item 6: resume checks what the shards hold ------------------------------------------------


def test_item6_a_zeroed_shard_is_detected_and_made_again_on_resume(tmp_path, monkeypatch):
    src = photo_tree(tmp_path / "src", per_class=4)
    kw = dict(size=24, val_fraction=0.25, chunk_size=2, **quiet())
    real, calls = prep.encode_item, {"n": 0}

    def interrupted(data, params):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(data, params)

    monkeypatch.setattr(prep, "encode_item", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_store(src, tmp_path / "out", **kw)
    monkeypatch.setattr(prep, "encode_item", real)
    shards = sorted((tmp_path / "out" / "train").glob("shard-*.bin"))
    assert len(shards) == 3
    # A disk that lost a file's blocks: the size is right, the bytes are zeros.
    shards[1].write_bytes(bytes(shards[1].stat().st_size))
    logs = []
    prep.prepare_store(src, tmp_path / "out", **dict(kw, log=logs.append))
    assert any("resuming: 2 of" in line for line in logs), logs  # the zeroed one made again
    prep.prepare_store(src, tmp_path / "clean", **kw)
    assert_same_store(tmp_path / "out", tmp_path / "clean")


# --- item 8: only regular files of bounded size are read ---------------------------------------


def test_item8_fifos_devices_and_huge_files_are_skipped_without_reading(tmp_path):
    src = photo_tree(tmp_path / "src", per_class=2)
    os.mkfifo(src / "c0" / "pipe.jpg")  # opening it to read would wait for a writer forever
    os.symlink("/dev/null", src / "c1" / "device.jpg")
    with open(src / "c2" / "huge.jpg", "wb") as f:  # 300 MiB, sparse: nothing on disk
        f.truncate(300 * 2**20)
    source = open_source(src, "folder", 0.5, 0)
    refs = {r.split("/")[-1]: r for sp in source.splits.values() for r in sp.refs}
    for name, why in (("pipe.jpg", "a FIFO"), ("device.jpg", "a character device"),
                      ("huge.jpg", "over the 256 MiB limit")):  # fmt: skip
        t0 = time.perf_counter()
        with deadline(10), pytest.raises(OSError, match=why):
            source.read(refs[name])
        took = time.perf_counter() - t0
        print(f"{name}: refused in {took * 1000:.2f} ms")
        assert took < 1.0
    with deadline(60):
        store = prepare_store(src, tmp_path / "out", size=16, val_fraction=0.5, **quiet())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    skipped = " ".join(report["skipped"]["train"] + report["skipped"]["val"])
    for name in ("pipe.jpg", "device.jpg", "huge.jpg"):
        assert name in skipped, skipped
    assert store.size("train") + store.size("val") == 6
    # --max-file-mb lowers the limit: here below every photo.
    out2 = tmp_path / "out2"
    argv = ["prepare", str(src), str(out2), "--size", "16", "--val-fraction", "0.5",
            "--max-file-mb", "0.0001", "--workers", "1", "-q"]  # fmt: skip
    with pytest.raises(BadInput, match="every training image"):
        prepare_main(argv)  # the command's handler itself: its error as an exception


# --- item 9: big 16-bit and 1-bit images in bounded memory -------------------------------------

_MAKE_BIG = """
import sys
import numpy as np
from PIL import Image
kind, path = sys.argv[1], sys.argv[2]
if kind == "16":  # 9000 x 9000 16-bit grey: a smooth ramp, a small PNG
    row = (np.arange(9000, dtype=np.uint32) * 7).astype(np.uint16)
    Image.fromarray(np.broadcast_to(row, (9000, 9000)).copy()).save(path)
else:  # 13000 x 13000 1-bit: stripes
    a = np.zeros((13000, 13000), bool)
    a[::2] = True
    Image.fromarray(a).save(path)
"""

_MEASURE = """
import json, sys
import alexnet.data.prepare  # all that a prepare worker imports
from alexnet.data.images import UnreadableImage, paper_image
from alexnet.data import prepare_store

def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

def reset():
    # Linux: "5" resets the peak resident set size (VmHWM) to the current one.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak is an upper bound (it includes earlier peaks)
    return kb("VmRSS:")

out = {}
for name in sys.argv[1:3]:
    base = reset()
    try:
        paper_image(name, 256)
        out[name] = "ok"
    except UnreadableImage as e:
        out[name] = str(e)
    out[name + ":mb"] = (kb("VmHWM:") - base) / 1024
base = reset()
prepare_store(sys.argv[3], sys.argv[4], kind="folder", size=256, val_fraction=0.5, workers=1,
              progress=False, log=lambda *a: None)
out["prepare:mb"] = (kb("VmHWM:") - base) / 1024
out["base:mb"] = base / 1024
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_item9_big_16_bit_and_1_bit_pngs_in_bounded_memory(tmp_path):
    src = tmp_path / "src"
    big16, big1 = src / "a" / "big16.png", src / "b" / "big1.png"
    for kind, path in (("16", big16), ("1", big1)):
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", _MAKE_BIG, kind, str(path)], check=True)
    for d in ("a", "b"):  # one more ordinary image per class
        Image.new("RGB", (40, 30), (10, 20, 30)).save(src / d / "small.png")
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(big16), str(big1), str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.splitlines()[-1])
    print(f"{big16.stat().st_size / 1024:.0f} KB 16-bit PNG: peak +{r[str(big16) + ':mb']:.0f} MB;"
          f" 1-bit: peak +{r[str(big1) + ':mb']:.0f} MB ({r[str(big1)]}); the whole prepare:"
          f" peak +{r['prepare:mb']:.0f} MB over {r['base:mb']:.0f} MB")  # fmt: skip
    assert r[str(big16)] == "ok"
    assert r[str(big16) + ":mb"] < 500
    # 169 million pixels: over Pillow's decompression-bomb limit, refused before decoding.
    assert "over the limit of 89,478,485 pixels" in r[str(big1)]
    assert r[str(big1) + ":mb"] < 100
    assert r["prepare:mb"] < 500
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any("big1.png" in s for s in report["skipped"]["train"] + report["skipped"]["val"])


def test_item9_deep_and_1_bit_images_scale_exactly(tmp_path):
    """The integer conversion against float references: 16-bit round(v / 257), 32-bit integer
    data clipped the same way, floats in [0, 1] times 255, 1-bit 0/255."""
    rng = np.random.default_rng(0)
    v16 = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    v16[0, :4] = (128, 129, 65535, 0)  # 128/257 rounds down, 129/257 up
    v32 = rng.integers(-70000, 140000, (32, 32)).astype(np.int32)
    vf = rng.random((32, 32)).astype(np.float32)
    v1 = rng.random((32, 32)) < 0.5
    cases = {
        "a16.png": (Image.fromarray(v16), np.rint(v16 / 257.0)),
        "b32.tif": (Image.fromarray(v32, mode="I"), np.clip(np.rint(v32 / 257.0), 0, 255)),
        "cf.tif": (Image.fromarray(vf, mode="F"), np.rint(vf.astype(np.float64) * 255)),
        "d1.png": (Image.fromarray(v1), v1 * 255.0),
    }
    for name, (img, _) in cases.items():
        (tmp_path / "src" / name[0]).mkdir(parents=True)
        img.save(tmp_path / "src" / name[0] / name)
        img.save(tmp_path / "src" / name[0] / ("copy-" + name))
    store = prepare_store(tmp_path / "src", tmp_path / "out", size=32, encoding="raw",
                          val_fraction=0.5, **quiet())  # fmt: skip
    assert sum(store.manifest["skipped"].values()) == 0
    for split in store.splits:
        for i in range(store.size(split)):
            label = int(store.labels(split)[i])
            expect = list(cases.values())[label][1]
            got = store.image(split, i)
            assert (got[..., 0] == got[..., 2]).all()
            np.testing.assert_array_equal(got[..., 0], expect.astype(np.uint8))
