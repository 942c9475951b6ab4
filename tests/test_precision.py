"""Precision choice: explicit values, auto from flags + a remembered probe, and bfloat16 features."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.errors import ConfigError
from pipeline.features import machine
from pipeline.features import precision as P

BF16_CPU = {"fpu", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
PLAIN_CPU = {"fpu", "avx2", "fma"}


class CountingProbe:
    """Stands in for the timed probe: fixed (float32, bfloat16) rates, counts its calls."""

    def __init__(self, fp32: float, bf16: float):
        self.rates, self.calls = (fp32, bf16), 0

    def __call__(self) -> tuple[float, float]:
        self.calls += 1
        return self.rates


@pytest.fixture(autouse=True)
def unpinned(monkeypatch):
    """conftest pins auto to float32 for the rest of the suite; here auto is what is tested."""
    monkeypatch.delenv(P.ENV, raising=False)


def auto(tmp_path, probe, flags=BF16_CPU, **kw):
    return P.resolve(
        "auto",
        gpu=False,
        probe=probe,
        memo=tmp_path / "precision.json",
        flags=flags,
        name="Test CPU",
        versions="keras3-tf2",
        **kw,
    )


def test_auto_picks_bfloat16_when_flags_and_probe_agree(tmp_path):
    probe = CountingProbe(30.0, 55.0)
    choice = auto(tmp_path, probe)
    assert (choice.precision, choice.policy, choice.probed) == ("bfloat16", "mixed_bfloat16", True)
    assert probe.calls == 1
    assert "avx512_bf16" in choice.reason and "1.83x" in choice.reason
    memo = json.loads((tmp_path / "precision.json").read_text())
    (entry,) = memo["machines"].values()
    assert (entry["float32_img_s"], entry["bfloat16_img_s"]) == (30.0, 55.0)


def test_auto_keeps_float32_when_probe_finds_bfloat16_slower(tmp_path):
    choice = auto(tmp_path, CountingProbe(30.0, 28.0))
    assert choice.precision == "float32"
    assert "below the 1.15x" in choice.reason


def test_auto_needs_the_margin_not_just_a_win(tmp_path):
    assert auto(tmp_path, CountingProbe(30.0, 31.0)).precision == "float32"  # 1.03x: noise, not a win


def test_memo_prevents_a_second_probe_and_is_per_machine(tmp_path):
    probe = CountingProbe(30.0, 55.0)
    first, second = auto(tmp_path, probe), auto(tmp_path, probe)
    assert probe.calls == 1
    assert (first.probed, second.probed) == (True, False)
    assert second.precision == "bfloat16" and "remembered" in second.reason
    other = P.resolve(
        "auto",
        gpu=False,
        probe=probe,
        memo=tmp_path / "precision.json",
        flags=BF16_CPU | {"avx512_fp16"},
        name="Test CPU",
        versions="keras3-tf2",
    )
    assert other.probed and probe.calls == 2  # new flags: a new machine as far as the memo knows
    assert len(json.loads((tmp_path / "precision.json").read_text())["machines"]) == 2


def test_auto_on_amx_under_tensorflow_onednn_is_bfloat16_without_a_probe(tmp_path, monkeypatch):
    """issue 31: on AMX the probe's seconds are never paid; elsewhere (XLA, oneDNN off) it still runs."""
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    probe = CountingProbe(30.0, 28.0)  # would say float32 if it were asked
    choice = auto(tmp_path, probe, flags=BF16_CPU | {"amx_bf16", "amx_tile"})
    assert (choice.precision, choice.probed, probe.calls) == ("bfloat16", False, 0)
    assert "amx_bf16" in choice.reason and not (tmp_path / "precision.json").exists()
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert auto(tmp_path, probe, flags=BF16_CPU | {"amx_bf16"}).precision == "float32" and probe.calls == 1
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert auto(tmp_path / "jax", CountingProbe(30.0, 55.0), flags=BF16_CPU | {"amx_bf16"}).probed


def test_damaged_memo_is_probed_again_and_rewritten(tmp_path):
    (tmp_path / "precision.json").write_text("{not json")
    probe = CountingProbe(30.0, 55.0)
    assert auto(tmp_path, probe).probed and probe.calls == 1
    assert auto(tmp_path, probe).probed is False


def test_a_failing_probe_falls_back_to_float32_and_is_not_remembered(tmp_path):
    def broken() -> tuple[float, float]:
        raise RuntimeError("no bf16 kernel")

    choice = auto(tmp_path, broken)
    assert choice.precision == "float32" and "probe failed (RuntimeError: no bf16 kernel)" in choice.reason
    assert not (tmp_path / "precision.json").exists()


def test_auto_without_bf16_flags_is_float32_without_probing(tmp_path):
    probe = CountingProbe(30.0, 55.0)
    choice = auto(tmp_path, probe, flags=PLAIN_CPU)
    assert choice.precision == "float32" and probe.calls == 0
    assert "neither amx_bf16 nor avx512_bf16" in choice.reason
    assert not (tmp_path / "precision.json").exists()


def test_auto_on_a_gpu_is_mixed_float16(tmp_path):
    probe = CountingProbe(30.0, 55.0)
    choice = P.resolve("auto", gpu=True, probe=probe, memo=tmp_path / "m.json", flags=BF16_CPU)
    assert (choice.precision, choice.policy) == ("float16", "mixed_float16") and probe.calls == 0


def test_explicit_values_pass_through_with_reasons(tmp_path):
    probe = CountingProbe(30.0, 55.0)
    kw = {"probe": probe, "memo": tmp_path / "m.json"}
    assert P.resolve("float32", gpu=False, flags=BF16_CPU, **kw).precision == "float32"
    slow = P.resolve("float16", gpu=False, flags=BF16_CPU, **kw)
    assert slow.precision == "float16" and "slower than float32" in slow.reason
    emulated = P.resolve("bfloat16", gpu=False, flags=PLAIN_CPU, **kw)
    assert emulated.precision == "bfloat16" and "neither amx_bf16 nor avx512_bf16" in emulated.reason
    assert probe.calls == 0


@pytest.mark.parametrize("bad", ["bf16", "fp32", "Float32", ""])
def test_unknown_precision_names_value_and_choices(tmp_path, bad):
    with pytest.raises(ConfigError) as e:
        P.resolve(bad, gpu=False, probe=CountingProbe(1, 1), memo=tmp_path / "m.json", flags=BF16_CPU)
    assert repr(bad) in str(e.value) and "('auto', 'float32', 'bfloat16', 'float16', 'int8')" in str(e.value)


def test_int8_is_an_explicit_choice_never_auto(tmp_path):
    choice = P.resolve("int8", gpu=False, memo=tmp_path / "m.json", flags=BF16_CPU)
    # int8 builds the float32 Keras base (OpenVINO quantises it) and is a cache of its own
    assert (choice.precision, choice.policy, P.cache_suffix("int8")) == ("int8", "float32", "-int8")
    assert auto(tmp_path, CountingProbe(30.0, 55.0)).precision == "bfloat16"


def test_policy_names_and_cache_suffixes():
    assert [P.keras_policy(p) for p in ("float32", "bfloat16", "float16")] == [
        "float32",
        "mixed_bfloat16",
        "mixed_float16",
    ]
    assert [P.cache_suffix(p) for p in ("float32", "bfloat16", "float16", "int8")] == ["", "-bf16", "-fp16", "-int8"]
    with pytest.raises(ValueError, match="resolve"):
        P.keras_policy("auto")


def test_cpu_flags_and_name_read_cpuinfo_and_survive_its_absence(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: AMD  EPYC 9R14\nflags\t\t: fpu avx512_bf16 amx_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert machine.cpu_flags(str(info)) == {"fpu", "avx512_bf16", "amx_bf16"}
    assert machine.cpu_name(str(info)) == "AMD EPYC 9R14"
    assert machine.cpu_flags(str(tmp_path / "absent")) == set()
    assert machine.cpu_name(str(tmp_path / "absent"))  # a non-empty fallback


def test_relative_error():
    b = np.array([3.0, 4.0])
    assert P.relative_error(b, b) == 0.0
    assert P.relative_error(b * 1.01, b) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="shapes"):
        P.relative_error(b, b[:1])


# --------------------------------------------------------------------------- real Keras

BF16_TOLERANCE = 0.03  # relative L2 error of bfloat16 VGG16 features vs float32 (measured: ~0.005-0.01)


def test_bfloat16_features_agree_with_float32_within_tolerance():
    """VGG16 (random weights, 32 px): same weights, two policies; bfloat16 really ran (error > 0)
    and stays within BF16_TOLERANCE of float32."""
    import keras

    x = np.random.default_rng(0).uniform(-120, 130, (4, 32, 32, 3)).astype("float32")
    out = {}
    weights = None
    for p in ("float32", "bfloat16"):
        with P.policy_scope(p):
            model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
        if weights is None:
            weights = model.get_weights()
        model.set_weights(weights)
        assert model.get_layer("block1_conv1").compute_dtype == ("float32" if p == "float32" else "bfloat16")
        out[p] = np.asarray(keras.ops.cast(model(x), "float32"))
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after each scope
    err = P.relative_error(out["bfloat16"], out["float32"])
    assert 1e-5 < err < BF16_TOLERANCE, err


def test_timed_probe_returns_two_rates_and_restores_policy():
    import keras

    fp32, bf16 = P.timed_probe(size=32, batch=2, seconds=0.05, rounds=1)
    assert fp32 > 0 and bf16 > 0
    assert keras.mixed_precision.global_policy().name == "float32"


def test_auto_is_resolved_in_the_plan_recorded_and_named(tmp_path, monkeypatch):
    """auto becomes a concrete precision before any work; it names the cache file and is
    stored in its key, so bfloat16 and float32 features never answer each other."""
    from pipeline.cache import store
    from pipeline.core.config import ExtractConfig
    from pipeline.features.extract import extract
    from pipeline.features.layout import locate, plan

    from conftest import make_folder

    root = make_folder(tmp_path / "imgs", {"train": 2}, size=32)
    cfg = ExtractConfig(data=str(root), size=32, weights="random", cache_dir=tmp_path / "c", quiet=True)
    monkeypatch.setenv(P.ENV, "bfloat16")
    p = plan(cfg)
    assert p.cfg.precision == p.key.precision == "bfloat16" and p.path.name.endswith("-bf16.h5")
    bf16 = extract(cfg).path
    assert store.read_meta(bf16).precision == "bfloat16" and locate(cfg) == bf16
    monkeypatch.setenv(P.ENV, "float32")
    assert plan(cfg).path != bf16
    with pytest.raises(store.CacheError, match="no cache"):
        locate(cfg)  # the bfloat16 cache never answers a float32 request
    f32 = extract(cfg).path
    a, b = store.load_split(bf16, "train")[0], store.load_split(f32, "train")[0]
    assert P.relative_error(a, b) < 0.05 and not np.array_equal(a, b)


def test_auto_on_a_cpu_without_gpu_device_files_never_imports_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys; from pipeline.features import machine, precision as P; "
        "machine.GPU_DEVICE_FILES = ('/nonexistent',); "
        "c = P.resolve('auto', flags=set()); print(c.precision, 'tensorflow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in __import__("os").environ.items() if k != P.ENV},
    )
    assert out.stdout.split() == ["float32", "False"], out.stderr
