"""Run folders open without running code: heads round-trip through skops + .keras, and
crafted files (a pickle, an untrusted type, a Lambda model) are refused before their
payload runs. Each refusal test also shows the payload is live (it does run when the
guard is bypassed), so a broken guard makes the test fail."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import joblib
import numpy as np
import pytest
import skops.io as sio

from pipeline.cache.store import CacheError
from pipeline.core.provenance import versions
from pipeline.train import persist
from pipeline.train.heads import KerasModelHead, LogRegHead, MLPHead, SVMHead

from conftest import separable


class Payload:
    """Touches ``marker`` when rebuilt: stands in for any code a crafted file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()
        self.__dict__.update(state)

    def __reduce__(self):  # for pickle: rebuilding calls Path.touch(marker)
        return (Path.touch, (Path(self.marker),))


def _lambda_model(marker: Path):
    """A Keras model whose Lambda layer touches ``marker`` whenever the model is rebuilt."""
    import keras

    fn = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Lambda(fn)(inputs)))
    return model


@pytest.fixture(scope="module")
def data():
    return separable(12, k=2), separable(8, k=3, seed=1)


@pytest.fixture(scope="module")
def mlp(data):
    (x, y), _ = data
    return MLPHead(pooling="flatten", units=4, epochs=2, batch_size=8, validation_fraction=0.0).fit(x, y)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("make", "k"),
    [
        (lambda: LogRegHead(class_weight={0: 1.0, 1: 2.0}), 2),
        (lambda: SVMHead(), 2),
        (lambda: SVMHead(class_weight="balanced"), 3),
    ],
)
def test_sklearn_heads_round_trip_exactly(tmp_path, data, make, k):
    x, y = data[0] if k == 2 else data[1]
    head = make().fit(x, y)
    written = persist.save_head(head, tmp_path)
    assert written == [tmp_path / "winner.skops"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["winner.skops"]  # no temporary left behind
    # what the file needs is inside what load trusts (computed here, fixed in persist.py)
    assert set(sio.get_untrusted_types(file=written[0])) <= set(persist.TRUSTED_TYPES)
    loaded = persist.load_head(tmp_path)
    assert type(loaded) is type(head) and loaded.get_params() == head.get_params()
    np.testing.assert_array_equal(loaded.classes_, head.classes_)
    np.testing.assert_array_equal(loaded.predict_proba(x), head.predict_proba(x))


def test_mlp_round_trip_exactly(tmp_path, data, mlp):
    (x, _), _ = data
    written = persist.save_head(mlp, tmp_path, stem="best")
    assert written == [tmp_path / "best.keras", tmp_path / "best.skops"]
    assert hasattr(mlp, "model_")  # saving left the live head whole
    loaded = persist.load_head(tmp_path, stem="best")
    assert isinstance(loaded, MLPHead) and loaded.history_ == mlp.history_
    np.testing.assert_array_equal(loaded.predict_proba(x), mlp.predict_proba(x))


def test_end_to_end_keras_head_round_trip(tmp_path):
    """A fine-tuned end-to-end model holds the registered preprocessing layer."""
    import keras

    from pipeline.core.layers import preprocess_layer_class

    inputs = keras.Input((6, 6, 3))
    z = preprocess_layer_class()("vgg16", dtype="float32", name="vgg16_preprocess")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(z)))
    head = KerasModelHead.wrap(model, np.array([0, 1]))
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3)).astype(np.uint8)
    persist.save_head(head, tmp_path)
    loaded = persist.load_head(tmp_path)
    assert isinstance(loaded, KerasModelHead)
    np.testing.assert_array_equal(loaded.predict_proba(images), head.predict_proba(images))


# --------------------------------------------------------------------------- refusals


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "winner.joblib").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CacheError, match=r"old format.*--trust-pickle"):
        persist.load_head(tmp_path)
    assert not marker.exists()
    persist.load_head(tmp_path, trust_pickle=True)  # the payload is live: only the guard stopped it
    assert marker.exists()


def test_pickle_disguised_as_skops_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "winner.skops").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CacheError, match="not a readable skops file"):
        persist.load_head(tmp_path, trust_pickle=True)  # trust_pickle never applies to a .skops
    assert not marker.exists()


@pytest.mark.parametrize("where", ["top", "inside"])
def test_untrusted_type_in_skops_is_refused_by_name(tmp_path, data, where):
    (x, y), _ = data
    marker = tmp_path / "pwned"
    obj = Payload(marker)
    if where == "inside":  # a real head carrying something extra
        obj = LogRegHead().fit(x, y)
        obj.model_.extra = Payload(marker)
    path = tmp_path / "winner.skops"
    sio.dump(obj, path)
    name = f"{Payload.__module__}.Payload"
    with pytest.raises(CacheError, match=f"outside featcache's trusted list: {name}"):
        persist.load_head(tmp_path)
    assert not marker.exists()
    sio.load(path, trusted=sio.get_untrusted_types(file=path))  # live: trusting it would run it
    assert marker.exists()


def test_skops_holding_a_non_head_is_refused(tmp_path, data):
    from sklearn.linear_model import LogisticRegression

    (x, y), _ = data
    sio.dump(LogisticRegression().fit(x.reshape(len(x), -1), y), tmp_path / "winner.skops")
    with pytest.raises(CacheError, match="LogisticRegression, not a featcache head"):
        persist.load_head(tmp_path)


def test_lambda_model_beside_a_head_is_refused(tmp_path, mlp):
    import keras

    marker = tmp_path / "pwned"
    persist.save_head(mlp, tmp_path)
    _lambda_model(marker).save(tmp_path / "winner.keras")
    marker.unlink()  # building the model ran the lambda once
    with pytest.raises(CacheError, match="safe mode"):
        persist.load_head(tmp_path)
    assert not marker.exists()
    keras.saving.load_model(tmp_path / "winner.keras", safe_mode=False)  # live outside safe mode
    assert marker.exists()


def test_lambda_model_smuggled_inside_the_skops_is_refused(tmp_path, mlp, monkeypatch):
    """_KerasHead.__setstate__ rebuilds a model from bytes; skops calls it, so it must stay in safe mode."""
    marker = tmp_path / "pwned"
    bare = object.__new__(MLPHead)
    bare.__dict__.update({k: v for k, v in mlp.__dict__.items() if k != "model_"})
    _lambda_model(marker).save(tmp_path / "evil.keras")
    marker.unlink()
    bare.model_ = (tmp_path / "evil.keras").read_bytes()
    monkeypatch.setattr(MLPHead, "__getstate__", lambda self: self.__dict__.copy())  # store the bytes as they are
    sio.dump(bare, tmp_path / "winner.skops")
    monkeypatch.undo()
    with pytest.raises(CacheError, match="cannot load"):
        persist.load_head(tmp_path)
    assert not marker.exists()


def test_keras_head_without_its_model_file(tmp_path, mlp):
    persist.save_head(mlp, tmp_path)
    (tmp_path / "winner.keras").unlink()
    with pytest.raises(CacheError, match=r"winner\.keras is missing"):
        persist.load_head(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(CacheError, match=r"has no winner\.skops"):
        persist.load_head(tmp_path)


def test_save_refuses_foreign_objects(tmp_path):
    with pytest.raises(TypeError, match="received dict"):
        persist.save_head({}, tmp_path)


# --------------------------------------------------------------------------- old format, versions


def test_old_joblib_folder_needs_trust_pickle(tmp_path, data):
    (x, y), _ = data
    head = LogRegHead().fit(x, y)
    joblib.dump(head, tmp_path / "winner.joblib")
    with pytest.raises(CacheError, match="pickle files can run arbitrary code"):
        persist.load_head(tmp_path)
    loaded = persist.load_head(tmp_path, trust_pickle=True)
    np.testing.assert_array_equal(loaded.predict_proba(x), head.predict_proba(x))


def test_skops_wins_over_a_stale_pickle(tmp_path, data):
    (x, y), _ = data
    marker = tmp_path / "pwned"
    persist.save_head(LogRegHead().fit(x, y), tmp_path)
    (tmp_path / "winner.joblib").write_bytes(pickle.dumps(Payload(marker)))
    assert isinstance(persist.load_head(tmp_path, trust_pickle=True), LogRegHead)
    assert not marker.exists()


def test_major_version_difference_warns_only(tmp_path, data, caplog):
    (x, y), _ = data
    persist.save_head(LogRegHead().fit(x, y), tmp_path)
    now = versions()
    with caplog.at_level(logging.WARNING, logger="pipeline.train.persist"):
        persist.load_head(tmp_path, versions={**now, "scikit-learn": "0.24.2"})
    assert "scikit-learn 0.24.2 (saved)" in caplog.text and "numpy" not in caplog.text
    caplog.clear()
    same_major = {k: v.split(".")[0] + ".999" for k, v in now.items()}
    with caplog.at_level(logging.WARNING, logger="pipeline.train.persist"):
        persist.load_head(tmp_path, versions=same_major)
        persist.load_head(tmp_path, versions={})
    assert caplog.text == ""
