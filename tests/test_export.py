"""featcache export (issue 25): each winner kind becomes one model from uint8 pixels to class
probabilities that a fresh Python which cannot import featcache loads (Keras safe mode, ONNX
Runtime, TensorFlow's SavedModel loader) and that answers as `featcache predict` does on
the same files; bad inputs are refused with the README's exit codes and nothing half-written.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.app import export as export_mod
from pipeline.app.cli import main
from pipeline.core.config import ExportConfig, ExtractConfig, FinetuneConfig, SweepConfig
from pipeline.core.errors import ConfigError
from pipeline.features import images
from pipeline.features.extract import extract
from pipeline.train.heads import LogRegHead, MLPHead, SVMHead

from conftest import CLASS_COLOURS, make_folder, separable, vgg16_weights_file

THREE = {**CLASS_COLOURS, "frogs": (40, 200, 40)}
TOL = 1e-4 + 1e-6  # the float32 promise, plus predict's CSV rounding (6 decimals)


def _sweep(tmp: Path, cache: Path, name: str, table: str) -> Path:
    from pipeline.train.sweep import run_sweep

    spec = tmp / f"{name}.toml"
    spec.write_text(f"[[head]]\n{table}\n")
    cfg = SweepConfig(sweep_file=spec, runs_dir=tmp / "runs", n_jobs=1, name=name, track=False)
    return run_sweep(cfg, cache).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Winners of each kind on 32-px images through seeded random VGG16 weights: logreg,
    SVM and MLP (two classes; SVM and logreg also on three), and a fine-tuned block5."""
    from pipeline.app.finetune import finetune

    tmp = tmp_path_factory.mktemp("export")
    weights = vgg16_weights_file(tmp / "w.weights.h5", 1)
    two = make_folder(tmp / "two", {"train": 6, "validation": 3, "test": 3}, size=32)
    three = make_folder(tmp / "three", {"train": 6, "validation": 3, "test": 3}, size=32, classes=THREE)
    base = ExtractConfig(data=str(two), size=32, weights=str(weights), cache_dir=tmp / "cache", quiet=True)
    cache2 = extract(base).path
    cache3 = extract(dataclasses.replace(base, data=str(three))).path
    out = {
        "logreg": _sweep(tmp, cache2, "logreg", 'name = "logreg"\npooling = "flatten"'),
        "svm": _sweep(tmp, cache2, "svm", 'name = "svm"\npooling = "avg"'),
        "mlp": _sweep(tmp, cache2, "mlp", 'name = "mlp"\npooling = "max"\nunits = 8\nepochs = 2'),
        "svm3": _sweep(tmp, cache3, "svm3", 'name = "svm"\npooling = "flatten"'),
        "logreg3": _sweep(tmp, cache3, "logreg3", 'name = "logreg"\npooling = "avg"\nC = 0.01'),
    }
    block4 = dataclasses.replace(base, layer="block4_pool")
    extract(block4)
    ft = FinetuneConfig(epochs=1, head_epochs=2, runs_dir=tmp / "runs", track=False, name="finetune")
    out["finetune"] = finetune(ft, block4).run_dir
    return tmp, {"two": two, "three": three}, out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """``exported(name, formats)``: that run's export, made once for the module on first use
    (read-only to tests: a test that moves or changes one copies it first)."""
    _tmp, _data, run = runs
    base = tmp_path_factory.mktemp("exports")
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, formats: str = "keras") -> Path:
        if (name, formats) not in made:
            out = base / f"export-{name}-{formats.replace(',', '-')}"
            assert main(["export", str(run[name]), "--format", formats, "--out", str(out)]) == 0
            made[(name, formats)] = out
        return made[(name, formats)]

    return get


def _predict_csv(images_dir: Path, out: Path, *extra: str) -> dict[str, dict[str, str]]:
    assert main(["predict", str(images_dir), "--out", str(out), *extra]) == 0
    return {r["path"]: r for r in csv.DictReader(open(out))}


def _decoded(folder: Path, size: int) -> tuple[list[str], np.ndarray]:
    """The images of ``folder`` decoded as predict decodes them, in its CSV's (sorted) order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    batch = next(images.batches([str(f) for f in files], range(len(files)), size, len(files)))
    assert len(batch.rows) == len(files)
    return [f.relative_to(folder).as_posix() for f in files], batch.images


# Runs with `python -I` from a folder outside the repository, and refuses `import pipeline`
# (the venv may hold an editable install): what a colleague without featcache has.
FRESH = textwrap.dedent(
    """
    import json, sys
    sys.modules["pipeline"] = None  # featcache is not importable in this process
    try:
        import pipeline  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("pipeline is importable")
    import numpy as np, keras

    job = json.load(open(sys.argv[1]))
    out = {}
    for name, (folder, images) in job["exports"].items():
        x = np.load(images)
        model = keras.saving.load_model(folder + "/model.keras", safe_mode=True)
        def walk(layer):
            yield layer
            for inner in getattr(layer, "layers", []):
                yield from walk(inner)
        kinds = sorted({type(l).__module__.split(".")[0] + ":" + type(l).__name__ for l in walk(model)})
        out[name] = {"keras": np.asarray(model.predict(x, verbose=0)).tolist(), "layers": kinds}
        if name in job.get("onnx", []):
            import onnxruntime as ort
            s = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
            out[name]["onnx"] = s.run(None, {s.get_inputs()[0].name: x})[0].tolist()
        if name in job.get("saved_model", []):
            import tensorflow as tf
            loaded = tf.saved_model.load(folder + "/saved_model")  # kept: serve() needs its variables
            out[name]["saved_model"] = np.asarray(loaded.serve(tf.constant(x))).tolist()
    json.dump(out, open(job["result"], "w"))
    """
)


def _fresh(tmp: Path, job: dict) -> dict:
    script, job_file = tmp / "fresh.py", tmp / "job.json"
    script.write_text(FRESH)
    job["result"] = str(tmp / "result.json")
    job_file.write_text(json.dumps(job))
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(job_file)], cwd=tmp, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(Path(job["result"]).read_text())


def _onnx_available() -> str | None:
    import importlib.util

    missing = [m for m in ("tf2onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed (pip install 'featcache[export]')" if missing else None


@pytest.mark.slow  # a fresh Python with TensorFlow: ~70 s with the module's fixture on 2 busy cores
def test_each_winner_kind_exports_and_answers_as_predict_in_a_process_without_featcache(runs, exported, tmp_path):
    _tmp, data, run = runs
    onnx_skip = _onnx_available()
    formats = "keras,tf_saved_model" + ("" if onnx_skip else ",onnx")
    exports, expected, column_names = {}, {}, {}
    for name, run_dir in run.items():
        folder = data["three"] if name.endswith("3") else data["two"]
        fmt = formats if name == "logreg" else "keras"
        out = exported(name, fmt)  # exit 0 checked there
        record = json.loads((out / "export.json").read_text())
        assert record["precision"] == "float32" and record["check"]["images"] == (8 if name.endswith("3") else 6)
        assert record["check"]["tolerance"] == 1e-4 and max(record["check"]["max_abs_diff"].values()) <= 1e-4
        assert record["formats"] == fmt.split(",") and record["custom_layers"] == []
        exports[name] = str(out)
        expected[name] = _predict_csv(folder / "test", tmp_path / f"{name}.csv", "--run", str(run_dir))
        column_names[name] = record["labels"]
    paths2, x2 = _decoded(data["two"] / "test", 32)
    paths3, x3 = _decoded(data["three"] / "test", 32)
    np.save(tmp_path / "two.npy", x2)
    np.save(tmp_path / "three.npy", x3)
    job = {
        "exports": {
            k: (v, str(tmp_path / ("three.npy" if k.endswith("3") else "two.npy"))) for k, v in exports.items()
        },
        "saved_model": ["logreg"],
        "onnx": [] if onnx_skip else ["logreg"],
    }
    got = _fresh(tmp_path, job)
    for name, result in got.items():
        assert all(kind.startswith("keras:") for kind in result["layers"]), result["layers"]
        assert not any("Lambda" in kind for kind in result["layers"])
        paths = paths3 if name.endswith("3") else paths2
        want = np.array([[float(expected[name][p][f"p_{c}"]) for c in column_names[name]] for p in paths])
        assert want.shape[1] == (3 if name.endswith("3") else 2)
        for runtime in ("keras", "onnx", "saved_model"):
            if runtime in result:
                np.testing.assert_allclose(
                    np.array(result[runtime]), want, atol=TOL, rtol=0, err_msg=f"{name} {runtime}"
                )
    assert set(got["logreg"]) >= {"keras", "saved_model"} | (set() if onnx_skip else {"onnx"})
    if onnx_skip:
        pytest.skip(f"ONNX round trip not run: {onnx_skip}")


def test_predict_runs_from_the_export_alone(runs, exported, tmp_path):
    """No cache, no weights file, no run folder: the export folder moved elsewhere still answers
    as predict --run does."""
    import shutil

    tmp, data, run = runs
    out = shutil.copytree(exported("svm3"), tmp_path / "shipped")  # `featcache export RUN --out DIR`'s DIR
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    out.rename(moved)
    weights = tmp / "w.weights.h5"
    hidden = weights.rename(tmp / "hidden.h5")  # predict --run would refuse now; --model must not care
    try:
        got = _predict_csv(data["three"] / "test", tmp_path / "m.csv", "--model", str(moved))
    finally:
        hidden.rename(weights)
    want = _predict_csv(data["three"] / "test", tmp_path / "r.csv", "--run", str(run["svm3"]))
    assert got.keys() == want.keys() and len(got) == 9
    for path, row in want.items():
        assert got[path]["class"] == row["class"]
        for c in ("cats", "dogs", "frogs"):
            assert abs(float(got[path][f"p_{c}"]) - float(row[f"p_{c}"])) <= TOL
    assert sorted(p.name for p in moved.iterdir()) == ["export.json", "model.keras"]  # nothing written into it


def _left_behind(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") or p.name == "out")


def test_an_export_that_disagrees_with_predict_is_refused_and_nothing_is_kept(runs, tmp_path, monkeypatch, capsys):
    _tmp, _data, run = runs
    real = export_mod._fold

    def off(scaler, coef, intercept):  # a conversion that forgets part of the standardisation
        w, b = real(scaler, coef, intercept)
        return w, b + 0.05

    monkeypatch.setattr(export_mod, "_fold", off)
    assert main(["export", str(run["logreg"]), "--out", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert "disagrees with featcache predict" in err and "Traceback" not in err
    assert _left_behind(tmp_path) == []


def test_a_failing_format_writer_leaves_nothing(runs, tmp_path, monkeypatch, capsys):
    import keras

    _tmp, _data, run = runs

    def broken(self, *args, **kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(keras.Model, "export", broken)
    assert main(["export", str(run["mlp"]), "--format", "keras,tf_saved_model", "--out", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert "tf_saved_model export failed" in err and "converter crashed" in err and "Traceback" not in err
    assert _left_behind(tmp_path) == []


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("export*"))
    return dst


def test_a_run_folder_without_a_winner_is_exit_3(runs, tmp_path, capsys):
    _tmp, _data, run = runs
    bare = _copy_run(run["logreg"], tmp_path / "bare")
    (bare / "winner.skops").unlink()
    assert main(["export", str(bare)]) == 3
    err = capsys.readouterr().err
    assert "winner.skops" in err and str(bare) in err and "Traceback" not in err
    assert not (bare / "export").exists() and not [p for p in bare.iterdir() if p.name.startswith(".")]
    assert main(["export", str(tmp_path / "nope")]) == 2  # not a folder at all: a mistyped path
    assert "does not exist" in capsys.readouterr().err


def test_a_tampered_head_is_exit_3(runs, tmp_path, capsys):
    _tmp, _data, run = runs
    tampered = _copy_run(run["svm"], tmp_path / "tampered")
    blob = bytearray((tampered / "winner.skops").read_bytes())
    blob[len(blob) // 2 : len(blob) // 2 + 64] = b"\xff" * 64
    (tampered / "winner.skops").write_bytes(bytes(blob))
    assert main(["export", str(tampered)]) == 3
    err = capsys.readouterr().err
    assert "winner.skops" in err and "Traceback" not in err
    assert not (tampered / "export").exists()


def test_unknown_format_unavailable_runtime_and_bad_targets_are_exit_2(runs, tmp_path, capsys, monkeypatch):
    _tmp, _data, run = runs
    assert main(["export", str(run["logreg"]), "--format", "keras,pickle", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "format must be one of" in err and "'pickle'" in err and "onnx" in err and "Traceback" not in err

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    assert main(["export", str(run["logreg"]), "--out", str(a_file / "out")]) == 2  # cannot be written
    err = capsys.readouterr().err
    assert str(a_file) in err and "not a folder" in err and "Traceback" not in err

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    assert main(["export", str(run["logreg"]), "--out", str(taken)]) == 2
    assert "already exists" in capsys.readouterr().err and (taken / "mine.txt").read_text() == "keep me"

    assert main(["export", str(run["logreg"]), "--precision", "bfloat16", "--format", "onnx"]) == 2
    assert "bfloat16 convolution" in capsys.readouterr().err and not (run["logreg"] / "export").exists()

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    assert main(["export", str(run["logreg"]), "--format", "onnx", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "tf2onnx" in err and "featcache[export]" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "taken"]


@pytest.mark.parametrize(
    ("make", "k", "per_class"),
    [
        pytest.param(lambda: LogRegHead(pooling="flatten"), 2, 20, id="logreg-2-flatten"),
        pytest.param(lambda: LogRegHead(pooling="max", C=0.05), 3, 20, id="logreg-3-max"),
        pytest.param(lambda: SVMHead(pooling="avg"), 2, 20, id="svm-2-split"),  # one calibration split
        pytest.param(lambda: SVMHead(pooling="flatten", C=1.0), 4, 20, id="svm-4-flatten"),  # K sigmoids, normalised
        # 2 rows per class: 2-fold calibration, averaged; 1 row per class: no calibration, softmax of margins
        pytest.param(lambda: SVMHead(pooling="avg"), 3, 2, id="svm-3-2fold"),
        pytest.param(lambda: SVMHead(pooling="avg"), 2, 1, id="svm-2-uncalibrated"),
        pytest.param(lambda: MLPHead(pooling="flatten", units=6, epochs=2, patience=0), 2, 10, id="mlp-2"),
        pytest.param(lambda: MLPHead(pooling="avg", units=6, epochs=2, patience=0), 3, 10, id="mlp-3"),
    ],
)
def test_each_head_conversion_equals_its_predict_proba(make, k, per_class):
    """The conversions alone, on cached-like maps: every branch (two and more classes, each
    calibration case, each pooling) gives the head's own probabilities, columns in order."""
    import keras

    x, y = separable(per_class, k=k, shape=(2, 2, 8), spread=2.0)
    head = make().fit(x, y)
    features = keras.Input(x.shape[1:])
    model = keras.Model(features, export_mod.convert_head(head, features))
    probe, _ = separable(5, k=k, shape=(2, 2, 8), spread=4.0, seed=1)
    np.testing.assert_allclose(model.predict(probe, verbose=0), head.predict_proba(probe), atol=1e-5, rtol=0)


@pytest.mark.slow  # NNCF calibration: ~20 s on 2 cores
def test_an_int8_winner_exports_its_openvino_model_plus_the_head(tmp_path, capsys):
    pytest.importorskip("openvino", reason="int8 needs the openvino extra")
    pytest.importorskip("nncf", reason="int8 needs the openvino extra")
    import openvino as ov

    root = make_folder(tmp_path / "imgs", {"train": 6, "validation": 3, "test": 3}, size=32)
    cfg = ExtractConfig(
        data=str(root), size=32, weights="random", precision="int8", cache_dir=tmp_path / "c", quiet=True
    )
    run = _sweep(tmp_path, extract(cfg).path, "int8", 'name = "logreg"\npooling = "avg"')
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "no")]) == 2
    assert "int8 run" in capsys.readouterr().err and not (tmp_path / "no").exists()
    out = tmp_path / "int8-export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    record = json.loads((out / "export.json").read_text())
    assert record["precision"] == "int8" and record["files"] == {"keras": "head.keras", "openvino": "int8/model.xml"}
    assert record["check"]["max_abs_diff"]["keras"] <= 1e-4
    # the two files alone (OpenVINO + Keras, no featcache) answer as predict --run
    want = _predict_csv(root / "test", tmp_path / "p.csv", "--run", str(run))
    paths, x = _decoded(root / "test", 32)
    engine = ov.Core().compile_model(str(out / "int8" / "model.xml"), "CPU")
    import keras

    head = keras.saving.load_model(out / "head.keras", safe_mode=True)
    got = head.predict(np.asarray(engine(x)[0]), verbose=0)
    expected = np.array([[float(want[p][f"p_{c}"]) for c in record["labels"]] for p in paths])
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    assert main(["predict", str(root / "test"), "--model", str(out)]) == 2  # a Keras-only reader: says why
    assert "int8 export" in capsys.readouterr().err


def test_an_ensemble_converts_to_the_mean_of_its_members():
    import keras

    from pipeline.train.ensemble import Ensemble

    x, y = separable(20, k=3, shape=(2, 2, 8), spread=2.0)
    members = [LogRegHead(pooling="flatten").fit(x, y), SVMHead(pooling="avg").fit(x, y), LogRegHead("max").fit(x, y)]
    head = Ensemble(members, ["00-logreg-flatten", "01-svm-avg", "02-logreg-max"])
    features = keras.Input(x.shape[1:])
    model = keras.Model(features, export_mod.convert_head(head, features))
    probe, _ = separable(5, k=3, shape=(2, 2, 8), spread=4.0, seed=1)
    np.testing.assert_allclose(model.predict(probe, verbose=0), head.predict_proba(probe), atol=1e-5, rtol=0)


def test_a_run_scored_with_test_time_views_is_refused_by_name(runs, tmp_path, capsys):
    _tmp, _data, run = runs
    tta = _copy_run(run["logreg"], tmp_path / "tta")
    info = json.loads((tta / "run.json").read_text())
    (tta / "run.json").write_text(json.dumps({**info, "tta": {"views": 2, "seed": 0}}))
    assert main(["export", str(tta)]) == 2
    err = capsys.readouterr().err
    assert "test-time views" in err and "Traceback" not in err and not (tta / "export").exists()


def test_export_config_refuses_bad_values_by_name():
    with pytest.raises(ConfigError, match="precision"):
        ExportConfig(run=Path("r"), precision="float64")
    with pytest.raises(ConfigError, match="check_images"):
        ExportConfig(run=Path("r"), check_images=0)
    assert ExportConfig(run=Path("r"), formats=("onnx", "keras", "onnx")).formats == ("keras", "onnx")
