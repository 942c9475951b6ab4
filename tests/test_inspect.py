"""featcache inspect on caches written directly (no TensorFlow): planted label errors rank at
the top, planted copies across splits are found as leakage, an untouched cache has none,
``--exclude`` drops exactly the listed train rows, bad inputs are clear errors."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image, synthetic_meta

DIMS = 256  # wide for the rows, like 512 pooled VGG channels on a few thousand images
CLASSES = ("a", "b", "c")


def blobs(n: int, centres: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n,1,1,DIMS) rows around one centre per class, and their labels."""
    y = rng.integers(0, len(centres), n)
    x = centres[y] + rng.normal(0, 1, (n, DIMS))
    return x.astype(np.float32)[:, None, None, :], y


def write(path: Path, splits: dict, class_names=CLASSES, data: str | None = None) -> Path:
    """A complete cache of ``splits`` ({split: (x, y, paths)}), naming ``data`` as its data root."""
    from pipeline.cache import store

    x0 = next(iter(splits.values()))[0]
    meta = synthetic_meta(x0, class_names, info={"data": data} if data else {})
    return store.write_cache(
        path, {s: {"features": x, "labels": y, "paths": p} for s, (x, y, p) in splits.items()}, meta
    )


@pytest.fixture(scope="module")
def clean_splits():
    """train 600, validation 150, test 150 rows of three well-separated classes."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 0.5, (len(CLASSES), DIMS))
    splits = {}
    for split, n in (("train", 600), ("validation", 150), ("test", 150)):
        x, y = blobs(n, centres, rng)
        splits[split] = (x, y, [f"{split}/{CLASSES[c]}/{i}.png" for i, c in enumerate(y)])
    return splits


@pytest.fixture(scope="module")
def planted(clean_splits, tmp_path_factory):
    """The clean cache with 2% of train relabelled and 5 train rows copied (a little noise
    added) into validation and test; returns the cache, the relabelled paths and the copies."""
    rng = np.random.default_rng(1)
    x, y, paths = (a.copy() if isinstance(a, np.ndarray) else list(a) for a in clean_splits["train"])
    flipped = rng.choice(len(y), size=round(0.02 * len(y)), replace=False)
    y[flipped] = (y[flipped] + rng.integers(1, len(CLASSES), len(flipped))) % len(CLASSES)
    splits = {"train": (x, y, paths)}
    sources = rng.choice(np.setdiff1d(np.arange(len(y)), flipped), size=5, replace=False)
    copies = []
    for split in ("validation", "test"):
        xs, ys, ps = clean_splits[split]
        mine = sources[:3] if split == "validation" else sources[3:]
        extra = x[mine] + rng.normal(0, 0.01, x[mine].shape).astype(np.float32)
        new = [f"{split}/copy-of-{paths[i].replace('/', '-')}" for i in mine]
        splits[split] = (np.concatenate([xs, extra]), np.concatenate([ys, y[mine]]), [*ps, *new])
        copies += [(paths[i], p) for i, p in zip(mine, new, strict=True)]
    cache = write(tmp_path_factory.mktemp("planted") / "planted.h5", splits)
    return cache, {paths[i] for i in flipped}, copies


def inspect(cache: Path, runs: Path, **options):
    import pipeline as fc

    return fc.inspect(cache, runs_dir=runs, **options)


# --------------------------------------------------------------------------- findings


def test_planted_label_errors_rank_in_the_top_5_percent(planted, tmp_path):
    cache, flipped, _ = planted
    result = inspect(cache, tmp_path)
    train = [r["path"] for r in result.findings["label_issues"] if r["split"] == "train"]
    top = train[: math.ceil(0.05 * 600)]
    caught = flipped & set(top)
    assert len(caught) >= 0.8 * len(flipped), (sorted(flipped - caught), top)
    scores = [r["score"] for r in result.findings["label_issues"]]
    assert scores == sorted(scores, reverse=True)  # most suspicious first
    # and in the ranking of every train row by self-confidence, flagged or not
    from pipeline.app.inspection import label_probabilities, load_embedding
    from pipeline.cache import store
    from pipeline.core.config import InspectConfig

    emb = load_embedding(cache, store.read_meta(cache), "avg")
    proba, _ = label_probabilities(emb, InspectConfig())
    rows = np.flatnonzero(emb.train)
    confidence = proba[rows, emb.labels[rows]]
    ranked = [emb.paths[i] for i in rows[np.argsort(confidence, kind="stable")]]
    assert len(flipped & set(ranked[: len(top)])) >= 0.8 * len(flipped)
    # the CSV says the same, one row per flagged image, with the columns the README promises
    rows = list(csv.DictReader(open(result.csvs["label_issues"])))
    assert list(rows[0])[:5] == ["path", "split", "class", "score", "partner"]
    assert [r["path"] for r in rows] == [r["path"] for r in result.findings["label_issues"]]


def test_every_planted_copy_is_found_as_leakage(planted, tmp_path):
    cache, _, copies = planted
    result = inspect(cache, tmp_path)
    pairs = {(r["path"], r["partner"]) for r in result.findings["leakage"]}
    assert set(copies) <= pairs
    assert all(r["split"] == "train" and r["partner_split"] != "train" for r in result.findings["leakage"])
    assert all(r["score"] > 0.99 for r in result.findings["leakage"] if (r["path"], r["partner"]) in set(copies))
    # the train side of each pair is what classify --exclude can drop
    flagged = {r["path"] for r in csv.DictReader(open(result.csvs["flagged_train"]))}
    assert {p for p, _ in copies} <= flagged


def test_an_untouched_cache_has_no_leakage_and_no_duplicates(clean_splits, tmp_path):
    cache = write(tmp_path / "clean.h5", clean_splits)
    result = inspect(cache, tmp_path / "runs")
    assert result.counts["leakage"] == 0 and result.counts["duplicates"] == 0
    assert list(csv.DictReader(open(result.csvs["leakage"]))) == []
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["kind"] == "inspect" and info["counts"]["leakage"] == 0
    assert info["config"]["pooling"] == "avg"


def test_a_copy_within_a_split_is_a_duplicate_not_leakage(clean_splits, tmp_path):
    x, y, paths = clean_splits["train"]
    splits = {**clean_splits, "train": (np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]]), [*paths, "train/dup"])}
    result = inspect(write(tmp_path / "dup.h5", splits), tmp_path / "runs")
    assert result.counts["leakage"] == 0
    assert [(r["path"], r["partner"]) for r in result.findings["duplicates"]] == [("train/dup", paths[0])]


def test_the_neighbour_search_gives_the_same_pairs_in_any_block_size(planted, tmp_path):
    """memory_mb bounds the block of rows compared at once; what is found must not depend on it."""
    from pipeline.app.inspection import load_embedding, neighbour_search
    from pipeline.cache import store

    cache = planted[0]
    emb = load_embedding(cache, store.read_meta(cache), "avg")
    one = neighbour_search(emb, 0.95, 10, memory_mb=1)  # blocks of ~70 rows here
    whole = neighbour_search(emb, 0.95, 10, memory_mb=1024)  # one block
    assert sorted(p[:2] for p in one[0]) == sorted(p[:2] for p in whole[0]) and len(one[0]) >= 5
    np.testing.assert_allclose(one[1], whole[1], rtol=1e-5)
    # the brute force answer: every pair at or above the threshold
    s = emb.z @ emb.z.T
    np.fill_diagonal(s, -1)
    i, j = np.nonzero(np.triu(s >= 0.95))
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == sorted(p[:2] for p in whole[0])


def test_outliers_are_rows_far_from_every_class(clean_splits, tmp_path):
    x, y, paths = clean_splits["test"]
    far = np.random.default_rng(5).normal(0, 1, (2, 1, 1, DIMS)).astype(np.float32) * 3 - 10  # away from all
    splits = {**clean_splits, "test": (np.concatenate([x, far]), np.concatenate([y, [0, 1]]), [*paths, "t/o1", "t/o2"])}
    result = inspect(write(tmp_path / "out.h5", splits), tmp_path / "runs")
    assert [r["path"] for r in result.findings["outliers"]][:2] in (["t/o1", "t/o2"], ["t/o2", "t/o1"])


# --------------------------------------------------------------------------- the page


def test_inspect_html_is_self_contained_with_thumbnails_beside_their_partners(tmp_path):
    """Images on disk under the cache's data root: each flagged one is shown (inline JPEG)
    beside its partner; the map is inline too; nothing is fetched from anywhere."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 0.5, (2, DIMS))
    splits = {}
    for split, n in (("train", 60), ("validation", 20)):
        x, y = blobs(n, centres[:2], rng)
        paths = [f"{split}/{'ab'[c]}/{i}.png" for i, c in enumerate(y)]
        for i, p in enumerate(paths):
            make_image(root / p, (200, 40, 40) if y[i] else (40, 40, 200), 40, seed=i + 100 * len(splits))
        splits[split] = (x, y, paths)
    xv, yv, pv = splits["validation"]
    splits["validation"] = (
        np.concatenate([xv, splits["train"][0][:1]]),
        np.r_[yv, splits["train"][1][:1]],
        [*pv, splits["train"][2][0]],
    )
    result = inspect(write(tmp_path / "c.h5", splits, ("a", "b"), data=str(root)), tmp_path / "runs")
    assert result.counts["leakage"] == 1
    page = result.html.read_text()
    assert "leakage: 1 flagged" in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert not re.search(r"(src|href)=\"(https?:|file:|//)", page)
    card = re.search(r'<div class="pair" data-finding="leakage">(.*?)</div></div>', page, re.S)
    assert card and card.group(1).count('<img src="data:image/jpeg;base64,') == 2  # the image and its partner
    assert (result.run_dir / "map.png").is_file()


def test_a_cache_without_image_files_gives_a_page_that_says_why(planted, tmp_path):
    result = inspect(planted[0], tmp_path)
    page = result.html.read_text()
    assert "no thumbnails: the cache does not name its data folder" in page
    assert 'class="missing"' in page and page.count('src="data:image/png;base64,') == 1  # the map only


# --------------------------------------------------------------------------- acting on it: --exclude


def _sweep_file(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = "avg"\nC = 1.0\n')
    return sweep


def test_exclude_drops_exactly_the_listed_train_rows_and_run_json_says_so(clean_splits, tmp_path):
    import pipeline as fc

    cache = write(tmp_path / "clean.h5", clean_splits)
    train_paths = clean_splits["train"][2]
    listed = [train_paths[3], train_paths[10], train_paths[599], clean_splits["validation"][2][0], "not/in/cache.png"]
    exclude = tmp_path / "bad rows.csv"
    with exclude.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "score"])
        w.writerows([p, "x", 1] for p in listed)
    run = fc.classify(cache, sweep_file=_sweep_file(tmp_path), runs_dir=tmp_path / "runs", n_jobs=1, exclude=exclude)
    assert run.winner["train_rows"] == 600 - 3
    info = json.loads((run.run_dir / "run.json").read_text())
    assert info["exclude"]["dropped_paths"] == sorted(listed[:3])
    assert info["exclude"]["listed"] == 5 and info["exclude"]["dropped"] == 3
    assert info["config"]["exclude"] == str(exclude)
    assert any("left out of training" in n for n in info["notes"])
    # validation keeps every row: the listed validation path was scored, not dropped
    plain = fc.classify(cache, sweep_file=_sweep_file(tmp_path), runs_dir=tmp_path / "runs", n_jobs=1)
    assert plain.winner["train_rows"] == 600 and json.loads((plain.run_dir / "run.json").read_text())["exclude"] is None


def test_exclude_with_inspects_own_csv_drops_the_train_side_of_leakage(planted, tmp_path):
    import pipeline as fc

    cache, _, copies = planted
    found = fc.inspect(cache, runs_dir=tmp_path)
    run = fc.classify(
        cache, sweep_file=_sweep_file(tmp_path), runs_dir=tmp_path, n_jobs=1, exclude=found.csvs["leakage"]
    )
    dropped = json.loads((run.run_dir / "run.json").read_text())["exclude"]["dropped_paths"]
    assert dropped == sorted({r["path"] for r in found.findings["leakage"]}) and {p for p, _ in copies} <= set(dropped)


# --------------------------------------------------------------------------- bad input


def _cli(args, capsys):
    from pipeline.app.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def test_bad_inputs_are_clear_errors_without_a_traceback(clean_splits, tmp_path, capsys):
    cache = write(tmp_path / "clean.h5", clean_splits)
    code, err = _cli(["inspect", "--cache", str(tmp_path / "nope.h5"), "--runs-dir", str(tmp_path)], capsys)
    assert code == 3 and "no cache file at" in err and "nope.h5" in err and "Traceback" not in err
    code, err = _cli(["inspect", "--cache", str(cache), "--duplicate-similarity", "1.5"], capsys)
    assert code == 2 and "duplicate_similarity must be a cosine in (0, 1]; received 1.5" in err
    code, err = _cli(["inspect", "--cache", str(cache), "--map", "umap", "--runs-dir", str(tmp_path)], capsys)
    try:
        import umap  # noqa: F401
    except ImportError:
        assert code == 2 and "pip install 'featcache[inspect]'" in err
    no_path = tmp_path / "wrong.csv"
    no_path.write_text("file,score\na,1\n")
    sweep = ["--sweep", str(_sweep_file(tmp_path)), "--runs-dir", str(tmp_path), "--jobs", "1"]
    code, err = _cli(["classify", "--cache", str(cache), "--exclude", str(no_path), *sweep], capsys)
    assert code == 2 and "has no 'path' column" in err and "wrong.csv" in err and "Traceback" not in err
    code, err = _cli(["classify", "--cache", str(cache), "--exclude", str(tmp_path / "missing.csv"), *sweep], capsys)
    assert code == 2 and "missing.csv does not exist" in err
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"path\n\xff\xfe\x00bad\n")
    code, err = _cli(["classify", "--cache", str(cache), "--exclude", str(binary), *sweep], capsys)
    assert code == 2 and "binary.csv is not a readable CSV" in err


def test_a_cache_without_train_is_refused(clean_splits, tmp_path, capsys):
    cache = write(tmp_path / "vt.h5", {s: clean_splits[s] for s in ("validation", "test")})
    code, err = _cli(["inspect", "--cache", str(cache), "--runs-dir", str(tmp_path)], capsys)
    assert code == 3 and "has no train split" in err
    assert not list(tmp_path.glob("*-inspect*"))  # refused before a run folder is made
