"""Issue 27: shared caches that fail safely, and the guards no test reached before.

A read-only cache answers hits and stage two; only work that writes needs a writable folder.
Views of another seed are refused whether as many or more are asked. Lock files are removed
when released, safely. And one test per guard that no test reached: the merge's refusal of
shards with other weight values or another int8 model, a search picking its winner on
validation scores, predict's check of the rebuilt model's weight values. Each was checked by
removing the guard and seeing its test fail (TESTING.md)."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.app.cli import main
from pipeline.cache import store
from pipeline.core.config import ExtractConfig, SweepConfig
from pipeline.core.errors import CacheError
from pipeline.core.vocab import view_split
from pipeline.features.extract import extract

from conftest import cache_from, flipped_test_splits, make_folder, make_image, vgg16_weights_file

REPO = Path(__file__).resolve().parent.parent
# As root, chmod alone does not stop writes: setpriv drops the capabilities that bypass permission bits.
AS_USER = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
needs_unprivileged = pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="as root, needs util-linux setpriv to drop the capabilities that ignore permission bits",
)


def _cfg(root: Path, cache_dir: Path, **kw) -> ExtractConfig:
    kw.setdefault("size", 32)
    kw.setdefault("weights", "random")
    return ExtractConfig(data=str(root), cache_dir=cache_dir, quiet=True, **kw)


def _featcache(*argv: str) -> subprocess.CompletedProcess:
    """``python -m pipeline argv`` without the right to ignore permission bits."""
    drop = AS_USER if os.geteuid() == 0 else []
    return subprocess.run(
        [*drop, sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def _set_writable(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- read-only caches


@pytest.fixture
def read_only(tmp_path):
    """A complete cache, then every folder and file under the cache folder made read-only."""
    root = make_folder(tmp_path / "imgs", {"train": 3, "validation": 2, "test": 2}, size=32)
    cache_dir = tmp_path / "cache"
    path = extract(_cfg(root, cache_dir)).path
    before = _listing(cache_dir)
    _set_writable(cache_dir, False)
    try:
        yield root, cache_dir, path, before
    finally:
        _set_writable(cache_dir, True)


@needs_unprivileged
@pytest.mark.slow
def test_a_read_only_cache_answers_a_hit_and_stage_two_reads_it(tmp_path, read_only):
    root, cache_dir, path, before = read_only
    probe = path.parent / "probe"
    denied = subprocess.run(
        [*(AS_USER if os.geteuid() == 0 else []), sys.executable, "-c", f"open({str(probe)!r}, 'w')"],
        capture_output=True,
        text=True,
    )
    assert denied.returncode != 0 and "PermissionError" in denied.stderr  # the folder really is read-only here
    options = ["--data", str(root), "--size", "32", "--weights", "random", "--cache-dir", str(cache_dir)]
    hit = _featcache("extract", *options)
    assert hit.returncode == 0, hit.stderr
    assert hit.stdout.startswith(f"cache hit: {path}") and "Traceback" not in hit.stderr
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = "avg"\n')
    runs = tmp_path / "runs"
    classify = _featcache("classify", *options, "--sweep", str(sweep), "--runs-dir", str(runs), "--jobs", "1")
    assert classify.returncode == 0, classify.stderr
    (run,) = runs.iterdir()
    assert json.loads((run / "run.json").read_text())["cache"] == str(path)
    assert _listing(cache_dir) == before  # nothing written, not even a lock file


@needs_unprivileged
@pytest.mark.slow
def test_work_that_must_write_to_a_read_only_cache_is_refused_with_exit_2(read_only):
    root, cache_dir, path, before = read_only
    make_image(root / "train" / "cats" / "new.png", (200, 40, 40), 32, 99)  # an update must write
    options = ["--data", str(root), "--size", "32", "--weights", "random", "--cache-dir", str(cache_dir)]
    for extra in ([], ["--force"]):
        out = _featcache("extract", *options, *extra)
        assert out.returncode == 2, out.stderr
        assert f"cache folder {path.parent}: {path.parent} is not writable" in out.stderr
        assert "Traceback" not in out.stderr
    assert _listing(cache_dir) == before


# ----------------------------------------------------------------------------- views of another seed


@pytest.fixture(scope="module")
def views_seed0(tmp_path_factory):
    """A weights file keeps the seed out of the cache's name: only the views' seed can differ."""
    tmp = tmp_path_factory.mktemp("views")
    root = make_folder(tmp / "imgs", {"train": 2, "validation": 1}, size=32)
    weights = vgg16_weights_file(tmp / "w.weights.h5", 1)
    first = extract(_cfg(root, tmp / "c", weights=str(weights), augment=1, seed=0))
    return root, weights, tmp / "c", first.path


@pytest.mark.parametrize("views", [1, 2], ids=["as-many-views", "more-views"])
def test_views_of_another_seed_are_refused_whether_as_many_or_more_are_asked(views_seed0, capsys, views):
    root, weights, cache_dir, path = views_seed0
    before = path.read_bytes()
    with pytest.raises(CacheError) as e:
        extract(_cfg(root, cache_dir, weights=str(weights), augment=views, seed=1))
    message = str(e.value)
    assert message.startswith(f"{path} holds 1 augmented view(s) per train image made with seed 0; ")
    assert f"AUGMENT={views} with SEED=1 asks for views made with seed 1" in message
    assert "Use SEED=0 to use (or add to) the cached views, or rebuild with FORCE=1" in message
    options = ["--data", str(root), "--size", "32", "--weights", str(weights), "--cache-dir", str(cache_dir)]
    assert main(["extract", *options, "--augment", str(views), "--seed", "1"]) == 3
    err = capsys.readouterr().err
    assert "made with seed 0" in err and "SEED=1" in err and "Traceback" not in err
    assert path.read_bytes() == before
    assert extract(_cfg(root, cache_dir, weights=str(weights), augment=1, seed=0)).hit  # its own seed: a hit
    assert extract(_cfg(root, cache_dir, weights=str(weights), seed=1)).hit  # no views asked: the clean rows


def test_force_rebuilds_the_views_with_the_new_seed(views_seed0, tmp_path):
    root, weights, cache_dir, path = views_seed0
    copy = tmp_path / "c"
    shutil.copytree(cache_dir, copy)
    rebuilt = extract(_cfg(root, copy, weights=str(weights), augment=1, seed=1, force=True)).path
    assert store.read_meta(rebuilt).augment["seed"] == 1
    old, new = (store.load_split(p, view_split(1))[0] for p in (path, rebuilt))
    assert not np.allclose(old, new)


# ----------------------------------------------------------------------------- lock files


def test_no_lock_file_is_left_after_a_run_or_a_merge(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", {"train": 2, "test": 1}, size=32)
    seen = []
    original = store.writer_lock

    def watching(final):  # the lock file exists while held: it is removed, not never made
        lock = original(final)
        lock.__enter__()
        seen.append(Path(f"{final}.lock").exists())
        return _Exit(lock)

    monkeypatch.setattr(store, "writer_lock", watching)
    cfg = _cfg(root, tmp_path / "c")
    extract(cfg, shards=2, shard=0)
    extract(cfg, shards=2, shard=1)
    extract(cfg, shards=2, merge=True)
    extract(_cfg(root, tmp_path / "plain"))
    assert seen == [True] * 4
    assert [p.name for p in tmp_path.rglob("*") if p.name.endswith((".lock", ".lock.json"))] == []


class _Exit:
    def __init__(self, entered):
        self.entered = entered

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return self.entered.__exit__(*exc)


def test_a_lock_file_removed_by_its_last_holder_is_not_taken(tmp_path):
    """A holder removes its lock file before releasing it. A writer that opened that file just
    before locks a file no longer at the path, which a third writer could then create and lock:
    the check refuses the removed file, and writer_lock then takes the one at the path."""
    final = tmp_path / "c.h5"
    lock_path = Path(f"{final}.lock")
    with store.writer_lock(final):
        late = os.open(lock_path, os.O_RDWR)  # opened while still held
    try:
        assert not lock_path.exists()
        fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # flock alone grants the removed file
        check = store._same_file(lock_path, [])
        with pytest.raises(store._StaleLockFile):
            check(late)
        lock_path.touch()  # a third writer's new file at the path: still not the file we locked
        with pytest.raises(store._StaleLockFile):
            check(late)
        lock_path.unlink()
    finally:
        os.close(late)
    with store.writer_lock(final):
        assert lock_path.exists()
    assert not lock_path.exists()


def test_the_lock_file_is_removed_before_the_lock_is_released(tmp_path, monkeypatch):
    """Removed after release, a waiter could lock the file between the two and keep it after
    its removal, while a third writer creates and locks a new one: two writers."""
    import filelock

    at_release = []
    original = filelock.FileLock.release

    def release(self, *args, **kw):
        at_release.append((Path(self.lock_file).exists(), self.is_locked))
        return original(self, *args, **kw)

    monkeypatch.setattr(filelock.FileLock, "release", release)
    with store.writer_lock(tmp_path / "c.h5"):
        assert Path(f"{tmp_path / 'c.h5'}.lock").exists()
    assert at_release[0] == (False, True)  # gone from the path while still held
    assert not Path(f"{tmp_path / 'c.h5'}.lock").exists()


def test_the_lock_still_excludes_under_contention(tmp_path):
    """Three processes take and release the lock of one cache many times at once: never two inside."""
    final, inside = tmp_path / "c.h5", tmp_path / "inside"
    code = (
        "import os, sys, time; from pathlib import Path; from pipeline.cache import store\n"
        "from pipeline.core.errors import CacheError\n"
        f"final, inside = Path({str(final)!r}), Path({str(inside)!r}); got = 0\n"
        "while got < 150:\n"
        "    try:\n"
        "        with store.writer_lock(final):\n"
        "            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another is inside\n"
        "            os.close(fd); got += 1; os.unlink(inside)\n"
        "    except CacheError:\n"
        "        time.sleep(0.0005)\n"
        "print(got)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e.decode()[-800:] for _, e in outs]
    assert [o.decode().strip() for o, _ in outs] == ["150"] * 3
    assert not Path(f"{final}.lock").exists()


# ----------------------------------------------------------------------------- guards no test reached


def test_merge_refuses_shards_computed_with_other_weight_values(tmp_path, monkeypatch):
    """Shard 1 made where seeded random weights come out differently (another Keras, say):
    the same weights name, other values. Its features must never join shard 0's."""
    import keras

    root = make_folder(tmp_path / "imgs", {"train": 2, "test": 1}, size=32)
    cfg = _cfg(root, tmp_path / "c")
    first = extract(cfg, shards=2, shard=0)
    seed = keras.utils.set_random_seed
    monkeypatch.setattr(keras.utils, "set_random_seed", lambda s: seed(s + 1))
    extract(cfg, shards=2, shard=1)
    monkeypatch.undo()
    final = first.path.with_name(first.path.name.split(".shard-")[0] + ".h5")
    with pytest.raises(CacheError, match="computed with different weight values; rerun them"):
        extract(cfg, shards=2, merge=True)
    assert not final.exists()


def test_merge_refuses_int8_shards_made_by_different_quantised_models(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    root = make_folder(tmp_path / "imgs", {"train": 3, "test": 1}, size=32)
    cfg = _cfg(root, tmp_path / "c", precision="int8")
    shard0 = extract(cfg, shards=2, shard=0).path
    shard1 = extract(cfg, shards=2, shard=1).path
    with h5py.File(shard1, "r+") as f:  # shard 1 as a node that calibrated its own model would record it
        info = json.loads(f.attrs["info"])
        info["int8"]["model_sha256"] = "0" * 64
        f.attrs["info"] = json.dumps(info)
    assert store.read_meta(shard0).info["int8"] != store.read_meta(shard1).info["int8"]
    with pytest.raises(CacheError, match="computed with different int8 models; rerun them"):
        extract(cfg, shards=2, merge=True)
    assert not shard0.with_name(shard0.name.split(".shard-")[0] + ".h5").exists()


SEARCH = """
search = "random"
trials = 8

[[head]]
name = "logreg"
pooling = ["max", "flatten"]
C = {low = 0.5, high = 2.0}
"""


def test_a_search_picks_its_winner_on_validation_scores(tmp_path):
    """Test is validation with its labels flipped, so every ranking reverses on it: flatten
    wins on validation, max would win on test. Each trial's recorded score is its validation
    accuracy, recomputed here, and the winner is the best of those."""
    pytest.importorskip("optuna")
    from pipeline.train.sweep import run_sweep
    from pipeline.train.sweep_file import make_head

    train, (xv, yv), test = flipped_test_splits()
    cache = cache_from(tmp_path / "c.h5", {"train": train, "validation": (xv, yv), "test": test})
    sweep = tmp_path / "s.toml"
    sweep.write_text(SEARCH)
    result = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1, seed=0), cache)
    rows = result.rows
    assert {r["pooling"] for r in rows} == {"max", "flatten"}  # both were tried
    for r in rows:
        head = make_head("logreg", pooling=r["pooling"], random_state=0, **json.loads(r["params"])).fit(*train)
        assert r["val_accuracy"] == pytest.approx((head.predict(xv) == yv).mean())
    (winner,) = [r for r in rows if r.get("winner")]
    assert winner["pooling"] == "flatten"
    assert winner["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    saved = list(csv.DictReader(open(result.run_dir / "results.csv")))
    assert [r["winner"] for r in saved] == [str(bool(r.get("winner"))) if r.get("winner") else "" for r in rows]


@pytest.fixture(scope="module")
def random_weights_run(tmp_path_factory):
    from pipeline.train.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("predict")
    root = make_folder(tmp / "imgs", {"train": 4, "validation": 2, "test": 2}, size=32)
    cache = extract(_cfg(root, tmp / "cache")).path
    sweep = tmp / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = "avg"\n')
    run = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp / "runs", n_jobs=1), cache).run_dir
    return tmp, root, run


def test_predict_refuses_a_rebuilt_model_whose_weight_values_differ(random_weights_run, monkeypatch, capsys):
    """``random`` (and ``imagenet``) weights have no file to hash: the values of the model that
    predict rebuilds are the only check that it is the model the head was trained behind."""
    import keras

    tmp, root, run = random_weights_run
    assert main(["predict", str(root / "test"), "--run", str(run), "--out", str(tmp / "ok.csv")]) == 0
    seed = keras.utils.set_random_seed
    monkeypatch.setattr(keras.utils, "set_random_seed", lambda s: seed(s + 1))  # same name, other values
    code = main(["predict", str(root / "test"), "--run", str(run), "--out", str(tmp / "other.csv")])
    err = capsys.readouterr().err
    assert code == 3 and "weights_sha256" in err and str(run) in err and "Traceback" not in err
    assert not (tmp / "other.csv").exists()
