"""``featcache inspect``: see a dataset through its cached features, without another pass
of the backbone.

The embedding is the cached layer (block5_pool for VGG16) pooled per row (``avg`` by
default: (4,4,512) -> 512) and L2-normalised, so a dot product is a cosine similarity.
Every finding comes from it:

- **near-duplicates**: pairs at or above ``duplicate_similarity``, found by an exact
  neighbour search in blocks of rows (one matrix product each, its memory bounded by
  ``memory_mb``); a pair whose images sit in different splits is **leakage**;
- **likely label errors**: out-of-fold probabilities of a logistic regression trained by
  cross-validation on train (no train row is scored by a model that saw it; validation and
  test rows by the model fitted on all of train), flagged by confident learning (Northcutt
  et al. 2021, cleanlab's ``filter_by="confident_learning"``: another class's probability
  reaches that class's own average) and ranked by self-confidence;
- **outliers**: mean cosine distance to the ``neighbours`` nearest train rows, flagged when
  it lies ``outlier_mad`` scaled MADs above train's median;
- a **2-D map** (PCA; UMAP with the ``inspect`` extra) coloured by class, flagged rows marked.

It writes a run folder: one CSV per finding (path, split, class, score, partner, ...),
``flagged_train.csv`` (every train row any finding names: ``classify --exclude`` takes it),
``map.png``, a self-contained ``inspect.html`` and run.json.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import store
from pipeline.core.config import InspectConfig, as_dict
from pipeline.core.errors import CacheError, ConfigError
from pipeline.core.vocab import SPLITS
from pipeline.runs import inspect_page, plots
from pipeline.runs.folder import RunFolder, text_table
from pipeline.train.heads import pool_features

log = logging.getLogger(__name__)

FINDINGS = ("leakage", "duplicates", "label_issues", "outliers")  # one CSV each, in this order
COLUMNS = ("path", "split", "class", "score", "partner", "partner_split", "partner_class", "suggested")
SCORES = {  # what ``score`` means in each CSV (the page and the README say the same)
    "leakage": "cosine similarity of the pair (1 = identical features)",
    "duplicates": "cosine similarity of the pair (1 = identical features)",
    "label_issues": "1 - out-of-fold probability of the given class",
    "outliers": "mean cosine distance to the nearest train rows, in scaled MADs above train's median",
}
READ_ROWS = 1024  # rows per block read from the cache: the raw maps never all sit in memory


@dataclass
class Embedding:
    """Every row of train, validation and test as one L2-normalised vector."""

    z: np.ndarray  # (N, D) float32, unit rows (all-zero rows stay zero)
    labels: np.ndarray  # (N,) int64 index into class_names
    split: np.ndarray  # (N,) int8 index into ``splits``
    splits: tuple[str, ...]
    paths: list[str]
    class_names: tuple[str, ...]

    @property
    def train(self) -> np.ndarray:
        return self.split == self.splits.index("train")

    def describe(self, i: int) -> dict[str, Any]:
        return {"path": self.paths[i], "split": self.splits[self.split[i]], "class": self.class_names[self.labels[i]]}


@dataclass
class InspectResult:
    run_dir: Path
    html: Path
    csvs: dict[str, Path]  # finding -> CSV, and "flagged_train"
    findings: dict[str, list[dict[str, Any]]]  # finding -> rows, most suspicious first
    counts: dict[str, int]
    seconds: float
    notes: list[str] = field(default_factory=list)
    table: str = ""


# --------------------------------------------------------------------------- the embedding


def load_embedding(cache: Path, meta: store.CacheMeta, pooling: str) -> Embedding:
    """The pooled, normalised rows of every split, read in blocks (peak: one raw block)."""
    splits = tuple(s for s in SPLITS if s in meta.splits)
    if "train" not in splits:
        raise CacheError(f"{cache} has no train split (it has {list(meta.splits)}); inspect needs one")
    index = store.read_index(cache)
    parts, labels, split_ids, paths = [], [], [], []
    try:
        for k, split in enumerate(splits):
            for block, y in store.iter_split(cache, split, rows=READ_ROWS):
                parts.append(pool_features(block, pooling))
                labels.append(y)
                split_ids.append(np.full(len(y), k, np.int8))
            paths += [p for p, _ in sorted(index.rows[split].items(), key=lambda item: item[1][0])]
            if len(paths) != sum(len(y) for y in labels):
                raise CacheError(f"{cache}: split {split!r} lists a path twice; rebuild it with `make extract FORCE=1`")
    except OSError as e:  # a Fletcher-32 mismatch surfaces here: the bytes on disk changed
        raise CacheError(
            f"{cache} could not be read or failed its checksum ({e}); rebuild it with `make extract FORCE=1`"
        ) from e
    z = np.concatenate(parts).astype(np.float32, copy=False)
    if not np.isfinite(z).all():
        raise CacheError(f"{cache} holds non-finite features; rebuild it with `make extract FORCE=1`")
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    z /= np.where(norms > 0, norms, 1.0)
    return Embedding(z, np.concatenate(labels), np.concatenate(split_ids), splits, paths, tuple(meta.class_names))


# --------------------------------------------------------------------------- neighbours


def neighbour_search(
    emb: Embedding, threshold: float, k: int, memory_mb: int
) -> tuple[list[tuple[int, int, float]], np.ndarray]:
    """One exact pass over all pairs, a block of rows at a time: the pairs (i < j) at or
    above ``threshold`` (each row's ``k`` most similar at most), and every row's mean
    similarity to its ``k`` nearest train rows (itself excluded)."""
    z, n = emb.z, len(emb.z)
    train_idx = np.flatnonzero(emb.train)
    k_train = max(1, min(k, len(train_idx) - 1))
    block = max(1, memory_mb * 2**20 // (16 * n))  # the block's similarities, its train columns, one partition
    pairs: dict[tuple[int, int], float] = {}
    knn = np.empty(n, np.float32)
    for a in range(0, n, block):
        b = min(n, a + block)
        s = z[a:b] @ z.T
        s[np.arange(b - a), np.arange(a, b)] = -np.inf  # a row is not its own neighbour
        st = s[:, train_idx]
        knn[a:b] = np.partition(st, st.shape[1] - k_train, axis=1)[:, -k_train:].mean(axis=1)
        rows, cols = np.nonzero(s >= threshold)  # row-major: each row's hits are consecutive
        cuts = np.flatnonzero(rows[1:] != rows[:-1]) + 1
        for r, hits in zip(np.split(rows, cuts), np.split(cols, cuts), strict=True):
            if not len(r):
                continue
            if len(hits) > k:  # a large cluster of copies: its k closest are enough to show it
                hits = hits[np.argsort(-s[r[0], hits])[:k]]
            for c in hits:
                i, j = sorted((a + int(r[0]), int(c)))
                pairs[(i, j)] = float(s[r[0], c])
    return [(i, j, sim) for (i, j), sim in pairs.items()], knn


def duplicate_rows(emb: Embedding, pairs: list[tuple[int, int, float]]) -> tuple[list[dict], list[dict]]:
    """(leakage, duplicates): pairs across splits name the earlier split's row (train first,
    the one ``--exclude`` can drop) with the other as partner; pairs within a split name the
    later row, the copy."""
    leakage, within = [], []
    for i, j, sim in sorted(pairs, key=lambda p: -p[2]):
        if emb.split[i] != emb.split[j]:
            first, second = (i, j) if emb.split[i] < emb.split[j] else (j, i)
            leakage.append(_row(emb, first, sim, second))
        else:
            within.append(_row(emb, j, sim, i))
    return leakage, within


def _row(emb: Embedding, i: int, score: float, partner: int | None, **extra: Any) -> dict[str, Any]:
    row = {**emb.describe(i), "score": score, "row": i, **extra}
    if partner is not None:
        other = emb.describe(partner)
        row.update(
            partner=other["path"], partner_split=other["split"], partner_class=other["class"], partner_row=partner
        )
    return row


# --------------------------------------------------------------------------- label errors


def label_probabilities(emb: Embedding, cfg: InspectConfig) -> tuple[np.ndarray | None, str]:
    """(N, K) probabilities: out-of-fold for train rows, from the model fitted on all of
    train for the other splits; None (and why) when a class has too few train rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train = emb.train
    z, y = emb.z[train], emb.labels[train]
    classes, counts = np.unique(y, return_counts=True)
    folds = min(cfg.folds, int(counts.min()))
    if len(classes) < 2 or folds < 2:
        have = {emb.class_names[c]: int(n) for c, n in zip(classes, counts, strict=True)}
        return None, f"no label check: train needs two classes with 2+ rows each (it has {have})"
    model = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.C, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=cfg.seed)
    proba = np.zeros((len(emb.z), len(emb.class_names)), np.float64)
    others = np.flatnonzero(~train)
    # one BLAS thread: L-BFGS makes many small products, and on a busy 2-core machine two
    # spinning OpenBLAS threads made a fit 20x slower (4.8 s against 0.2 s on 1,600 rows)
    with threadpool_limits(limits=1, user_api="blas"):
        proba[np.ix_(np.flatnonzero(train), classes)] = cross_val_predict(model, z, y, cv=cv, method="predict_proba")
        if len(others):
            model.fit(z, y)
            proba[np.ix_(others, classes)] = model.predict_proba(emb.z[others])
    accuracy = float((proba[train].argmax(1) == y).mean())
    return proba, (
        f"label check: logistic regression (C={cfg.C}, standardised), {folds}-fold out-of-fold accuracy on train "
        f"{accuracy:.4f}"
    )


def label_issue_rows(emb: Embedding, proba: np.ndarray) -> list[dict[str, Any]]:
    """Confident learning: a row is flagged when some other class's probability reaches that
    class's threshold (its mean probability over train rows labelled with it) and is the
    largest such; ranked by 1 - probability of the given class."""
    train = emb.train
    k = proba.shape[1]
    thresholds = np.array(
        [proba[train & (emb.labels == c), c].mean() if (train & (emb.labels == c)).any() else np.inf for c in range(k)]
    )
    above = proba >= thresholds
    candidate = np.where(above, proba, -1.0).argmax(axis=1)
    given = proba[np.arange(len(proba)), emb.labels]
    flagged = np.flatnonzero(above.any(axis=1) & (candidate != emb.labels))
    flagged = flagged[np.argsort(given[flagged], kind="stable")]
    partners = _nearest_of_class(emb, flagged, candidate[flagged])
    return [
        _row(emb, int(i), float(1 - given[i]), p, suggested=emb.class_names[candidate[i]])
        for i, p in zip(flagged, partners, strict=True)
    ]


def _nearest_of_class(emb: Embedding, rows: np.ndarray, classes: np.ndarray) -> list[int | None]:
    """Each row's most similar train row of the given class (the picture shown beside it)."""
    out: list[int | None] = [None] * len(rows)
    for c in np.unique(classes):
        mine = np.flatnonzero(classes == c)
        for k, partner in zip(mine, nearest(emb, rows[mine], emb.train & (emb.labels == c)), strict=True):
            out[k] = partner
    return out


def nearest(emb: Embedding, rows: np.ndarray, among: np.ndarray, block: int = 256) -> list[int | None]:
    """For each of ``rows``, its most similar row where ``among`` is True (never itself),
    by matrix products over blocks of ``rows``."""
    pool = np.flatnonzero(among)
    out: list[int | None] = []
    for a in range(0, len(rows), block):
        queries = rows[a : a + block]
        s = emb.z[queries] @ emb.z[pool].T
        s[pool[None, :] == queries[:, None]] = -np.inf
        best = s.argmax(axis=1) if len(pool) else np.zeros(len(queries), np.int64)
        out += [int(pool[b]) if len(pool) and np.isfinite(s[q, b]) else None for q, b in enumerate(best)]
    return out


# --------------------------------------------------------------------------- outliers


def outlier_rows(emb: Embedding, knn_similarity: np.ndarray, mad_limit: float) -> list[dict[str, Any]]:
    """Rows whose mean distance to their nearest train rows is ``mad_limit`` scaled MADs above
    train's median (a robust z-score), most distant first; partner: the nearest train row."""
    distance = 1.0 - knn_similarity.astype(np.float64)
    reference = distance[emb.train]
    median = float(np.median(reference))
    mad = 1.4826 * float(np.median(np.abs(reference - median))) or 1e-12
    robust = (distance - median) / mad
    flagged = np.flatnonzero(robust > mad_limit)
    flagged = flagged[np.argsort(-robust[flagged], kind="stable")]
    partners = nearest(emb, flagged, emb.train)
    return [_row(emb, int(i), float(robust[i]), p) for i, p in zip(flagged, partners, strict=True)]


# --------------------------------------------------------------------------- the map


def project(z: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(N, 2) coordinates: PCA, or UMAP when the ``inspect`` extra is installed."""
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ConfigError(
                "map='umap' needs the umap-learn package: pip install 'featcache[inspect]' (or use map='pca')"
            ) from None
        return np.asarray(umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(z))
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(z)


# --------------------------------------------------------------------------- the whole inspection


def _find(
    emb: Embedding, cfg: InspectConfig, timings: dict[str, float], notes: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """The four findings: leakage and duplicates, likely label errors, outliers (timed into ``timings``)."""
    t = time.perf_counter()
    pairs, knn = neighbour_search(emb, cfg.duplicate_similarity, cfg.neighbours, cfg.memory_mb)
    leakage, within = duplicate_rows(emb, pairs)
    outliers = outlier_rows(emb, knn, cfg.outlier_mad)
    timings["neighbours"] = time.perf_counter() - t
    t = time.perf_counter()
    proba, why = label_probabilities(emb, cfg)
    notes.append(why)
    labels = label_issue_rows(emb, proba) if proba is not None else []
    timings["labels"] = time.perf_counter() - t
    return {"leakage": leakage, "duplicates": within, "label_issues": labels, "outliers": outliers}


def _draw_map(
    run: RunFolder, emb: Embedding, meta: store.CacheMeta, cfg: InspectConfig, findings: dict[str, list[dict[str, Any]]]
) -> None:
    """map.png: the 2-D map of the embedding with each finding's rows marked."""
    xy = project(emb.z, cfg.map, cfg.seed)
    marks = {name: np.array([r["row"] for r in rows], dtype=np.int64) for name, rows in findings.items()}
    plots.plot_embedding_map(
        xy,
        emb.labels,
        emb.class_names,
        marks,
        run.path / "map.png",
        f"{cfg.map.upper()} of {meta.layer} ({cfg.pooling}), {len(emb.z)} rows",
    )


def inspect_cache(cache: str | Path, cfg: InspectConfig) -> InspectResult:
    """Find near-duplicates (leakage across splits), likely label errors and outliers in a
    cache's features; write the run folder and return what was found."""
    cache = Path(cache)
    meta = store.read_meta(cache)
    if "train" not in meta.splits:
        raise CacheError(f"{cache} has no train split (it has {list(meta.splits)}); inspect needs one")
    run = RunFolder(cfg.runs_dir, cfg.name)  # before any compute: an unwritable runs folder fails now
    with run:  # a run that fails before writing anything leaves no empty folder
        return _inspect(run, cache, meta, cfg)


def _inspect(run: RunFolder, cache: Path, meta: store.CacheMeta, cfg: InspectConfig) -> InspectResult:
    t0 = time.perf_counter()
    emb = load_embedding(cache, meta, cfg.pooling)
    timings = {"load": time.perf_counter() - t0}
    notes = [
        f"embedding: {meta.layer} ({'x'.join(map(str, meta.feature_shape))}) {cfg.pooling}-pooled to "
        f"{emb.z.shape[1]} dimensions, L2-normalised; {len(emb.z)} rows in {', '.join(emb.splits)}"
    ]
    findings = _find(emb, cfg, timings, notes)
    t = time.perf_counter()
    _draw_map(run, emb, meta, cfg, findings)
    timings["map"] = time.perf_counter() - t
    csvs = {name: run.write_results(rows, COLUMNS, f"{name}.csv") for name, rows in findings.items()}
    flagged = _flagged_train(findings)
    csvs["flagged_train"] = run.write_results(flagged, ("path", "split", "class", "finding", "score", "partner"))
    counts = {name: len(rows) for name, rows in findings.items()} | {"flagged_train": len(flagged)}
    t = time.perf_counter()
    html = inspect_page.write_inspect_page(
        run.path,
        f"featcache inspect {run.path.name}",
        data_root=meta.info.get("data"),
        findings=findings,
        scores=SCORES,
        columns=COLUMNS,
        map_png=run.path / "map.png",
        counts=counts,
        notes=notes,
        meta=meta.to_dict(),
        show=cfg.show,
    )
    timings["page"] = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    run.write_json(
        {
            "kind": "inspect",
            "config": as_dict(cfg),
            "cache": str(cache.resolve()),
            "cache_meta": meta.to_dict(),
            "counts": counts,
            "notes": notes,
            "seconds": seconds,
            "timings": timings,
            "scores": SCORES,
        }
    )
    table = _summary(findings, counts, notes, seconds)
    log.info("inspected %d rows in %.1f s: %s", len(emb.z), seconds, counts)
    return InspectResult(run.path, html, csvs, findings, counts, seconds, notes, table)


def _flagged_train(findings: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every train row a finding names, once (its first finding in FINDINGS order)."""
    seen: dict[str, dict[str, Any]] = {}
    for name in FINDINGS:
        for r in findings[name]:
            if r["split"] == "train" and r["path"] not in seen:
                seen[r["path"]] = {**r, "finding": name}
    return list(seen.values())


def _summary(
    findings: dict[str, list[dict[str, Any]]], counts: dict[str, int], notes: Sequence[str], seconds: float
) -> str:
    lines = [*notes, f"inspected in {seconds:.1f} s"]
    for name in FINDINGS:
        rows = findings[name]
        lines.append(f"\n{name}: {counts[name]} flagged (score: {SCORES[name]})")
        if rows:
            lines.append(text_table(rows[:5], ("path", "split", "class", "score", "partner", "suggested")))
    lines.append(f"\nflagged train rows (any finding): {counts['flagged_train']}")
    return "\n".join(lines)


__all__ = ["FINDINGS", "Embedding", "InspectResult", "inspect_cache"]
