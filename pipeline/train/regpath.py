"""Regularisation paths: logistic regressions that differ only in C, fitted as one warm-started path.

The sweep groups such configs into one task (``path_key``); ``fit_logreg_path`` pools and
standardises once and fits in order of increasing C, each fit starting from the previous
optimum. Each head still comes out an ordinary fitted ``LogRegHead``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.train.heads import check_rows, pool_features, training_classes


def path_key(name: str, params: dict[str, Any]) -> str | None:
    """Configs with the same key differ only in C and can share one warm-started path."""
    import json

    if name != "logreg" or "C" not in params:
        return None
    return json.dumps({"name": name, **{k: v for k, v in params.items() if k != "C"}}, sort_keys=True, default=str)


def pooled_start(X: np.ndarray, yi: np.ndarray, scaler: Any, lr: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(coef, intercept) in the standardised flatten space that give exactly the logits of a
    logistic regression fitted on the average-pooled maps (512 values: about a second), or
    None when ``X`` is not a (N,h,w,C) map. Issue 29: each lbfgs iteration reads the 8,192-wide
    matrix twice, and from zero C=0.001 took 90 iterations on 12,000 real rows (~300 on random
    features); the pooled model is a point of that space near its optimum (avg pooling is
    linear in the flattened values): 68 iterations from there (BENCHMARKS.md section 8).

    With z = (x - mean) / scale per flattened value and a = mean over the h*w positions of x,
    the pooled logit sum_c w_c (a_c - m_c) / s_c + b equals sum_{p,c} w_c scale_pc / (h w s_c) z_pc + b:
    the pooled means m_c are the means of the positions' means, so the intercept is unchanged."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if np.ndim(X) != 4:
        return None
    _, h, w, c = np.shape(X)
    a = pool_features(X, "avg")
    pooled_scaler = StandardScaler().fit(a)
    pooled = LogisticRegression(**{**lr.get_params(), "warm_start": False}).fit(pooled_scaler.transform(a), yi)
    coef = pooled.coef_[:, None, :] * scaler.scale_.reshape(h * w, c)[None] / (h * w * pooled_scaler.scale_)
    return coef.reshape(len(coef), -1).astype(np.float32), pooled.intercept_.astype(np.float32)


def fit_logreg_path(
    heads: Sequence[Any],
    X: np.ndarray,
    y: np.ndarray,
    times: dict[int, float] | None = None,
    pooled_warm_start: bool = True,
) -> None:
    """Fit LogRegHeads that differ only in C as one regularisation path: pool and
    standardise once (float32), then fit in order of increasing C, each fit starting from
    the previous solution (lbfgs with ``warm_start``); a flatten path's first fit starts from
    the avg-pooled model (``pooled_start``; ``pooled_warm_start=False``: from zero). Each head
    gets its own fitted model, the same optimum an independent fit reaches (within the
    solver's tolerance). ``times``
    receives each head's seconds by ``id(head)`` (pooling and scaling counted in the first)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if not heads:
        return
    t0 = time.perf_counter()
    first = heads[0]
    for h in heads:
        h._validate_params()
        other = {k: v for k, v in h.get_params().items() if k != "C"}
        if other != {k: v for k, v in first.get_params().items() if k != "C"}:
            raise ValueError("a C path needs heads that differ only in C")
    Z = pool_features(X, first.pooling)
    y = np.asarray(y)
    check_rows(Z, y)
    classes = training_classes(y)
    yi = np.searchsorted(classes, y)
    scaler = StandardScaler()
    Zs = scaler.fit_transform(Z)  # float32 in, float32 out: one copy for the whole path
    lr = LogisticRegression(
        C=first.C,
        class_weight=first._class_weight_by_index(classes),
        max_iter=first.max_iter,
        random_state=first.random_state,
        warm_start=True,
    )
    ordered = sorted(heads, key=lambda h: h.C)
    start = None
    if pooled_warm_start and first.pooling == "flatten":
        start = pooled_start(X, yi, scaler, lr.set_params(C=ordered[0].C))
    if start is not None:
        lr.coef_, lr.intercept_ = start  # lbfgs with warm_start begins here instead of at zero
    for h in ordered:
        lr.set_params(C=h.C)
        lr.fit(Zs, yi)
        model = copy.deepcopy(lr)
        model.set_params(warm_start=False)  # the saved head is what an independent fit would describe
        h.model_ = Pipeline([("standardscaler", scaler), ("logisticregression", model)])
        h.classes_, h.n_features_in_, h.n_iter_ = classes, Z.shape[1], int(np.max(model.n_iter_))
        now = time.perf_counter()
        if times is not None:
            times[id(h)] = now - t0
        t0 = now


__all__ = ["fit_logreg_path", "path_key"]
