"""--decoder auto|cpu|gpu: the pure parts of pipeline.features.gpu_decode (here), the device parts
(marked ``gpu``, skipped without a CUDA device; run on a lent GPU, BENCHMARKS.md section 11)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.app import cli
from pipeline.core.config import ExtractConfig
from pipeline.core.errors import ConfigError
from pipeline.features import gpu_decode, images, layout

from conftest import make_folder


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not _cuda(), reason="no CUDA device (or no PyTorch): the GPU decoder cannot run")


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour gradients plus noise: JPEG-like content, not flat."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------- Pillow's resize, exactly


@pytest.mark.parametrize(("h", "w", "size"), [(375, 500, 150), (188, 250, 150), (200, 200, 180), (80, 100, 150)])
def test_resize_matrices_reproduce_pillow_bilinear_exactly(h, w, size):
    img = _photo(np.random.default_rng(h), h, w)
    want = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
    assert np.array_equal(gpu_decode.resize_reference(img, size), want)


def test_same_size_is_the_identity():
    img = _photo(np.random.default_rng(1), 150, 150)
    assert np.array_equal(gpu_decode.resize_reference(img, 150), img)


@pytest.mark.parametrize(("w", "h", "size"), [(500, 375, 150), (375, 500, 180), (1600, 1200, 150), (200, 200, 150)])
def test_draft_scale_is_the_one_pillow_picks(tmp_path, w, h, size):
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg(_photo(np.random.default_rng(0), h, w)))
    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        drafted = im.size
    s = gpu_decode.draft_scale(w, h, size)
    assert drafted == (-(-w // s), -(-h // s))


def test_box_emulation_of_draft_is_closer_to_the_cpu_path_than_none(tmp_path):
    """Same decoder (libjpeg), full decode + box filter vs Pillow's DCT-scaled decode."""
    rng = np.random.default_rng(3)
    path = tmp_path / "p.jpg"
    path.write_bytes(_jpeg(_photo(rng, 375, 500)))
    cpu = images.load(str(path), 150).astype(float)
    full = np.asarray(Image.open(path).convert("RGB"))
    emulated = gpu_decode.resize_reference(full, 150, box=gpu_decode.draft_scale(500, 375, 150)).astype(float)
    plain = gpu_decode.resize_reference(full, 150).astype(float)
    assert np.abs(emulated - cpu).mean() < np.abs(plain - cpu).mean()
    assert np.abs(emulated - cpu).mean() < 1.5  # grey levels, of 255


# ----------------------------------------------------------------------------- which files go to the device


def test_jpeg_problem_routes_only_8bit_ycbcr_jpegs_to_the_device():
    rng = np.random.default_rng(0)
    rgb = _photo(rng, 40, 60)
    assert gpu_decode.jpeg_problem(_jpeg(rgb)) is None
    assert gpu_decode.jpeg_problem(_jpeg(rgb, progressive=True)) is None
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG")
    assert "CMYK" in gpu_decode.jpeg_problem(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("L").save(buf, format="JPEG")
    assert "grey" in gpu_decode.jpeg_problem(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    assert gpu_decode.jpeg_problem(buf.getvalue()) == "not a JPEG"
    assert gpu_decode.jpeg_problem(_jpeg(rgb)[:-200]) == "no end-of-image marker (truncated?)"
    assert gpu_decode.jpeg_problem(b"") == "not a JPEG"
    assert gpu_decode.jpeg_problem(_jpeg(rgb) + b"\r\n") is None  # trailing padding after the end marker


def _pil_decode(encoded):
    """Stands in for nvJPEG: (3,H,W) arrays; a whole batch fails on a file it cannot decode
    (as torchvision's batched call does), and a file holding b'REJECT' is refused alone."""
    out = []
    for data in encoded:
        if b"REJECT" in bytes(data):
            raise RuntimeError("Error while decoding JPEG images")
        out.append(np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB")).transpose(2, 0, 1))
    return out


def test_files_the_device_rejects_fall_back_to_the_cpu_path_one_by_one(tmp_path):
    rng = np.random.default_rng(5)
    arrs = [_photo(rng, 60, 80) for _ in range(3)]
    paths = [tmp_path / f"{i}.jpg" for i in range(6)]
    paths[0].write_bytes(_jpeg(arrs[0]))
    good = _jpeg(arrs[1])  # the device "rejects" it; Pillow reads it (the comment segment is legal)
    paths[1].write_bytes(good[:2] + b"\xff\xfe\x00\x08REJECT" + good[2:])
    Image.fromarray(arrs[2]).save(paths[2].with_suffix(".png"))
    paths[2] = paths[2].with_suffix(".png")
    paths[3].write_bytes(_jpeg(arrs[0])[:-300])  # truncated: neither can decode it
    os.mkfifo(paths[4])  # would block a plain read
    paths[5].write_bytes(_jpeg(arrs[2]))
    names = [str(p) for p in paths]
    datas = [gpu_decode._read(n) for n in names]
    assert datas[4] is None
    rows = [10, 11, 12, 13, 14, 15]
    decoded, host, failed, fallbacks = gpu_decode.route_and_decode(names, rows, 32, datas, _pil_decode)
    assert sorted(decoded) == [0, 5]  # the batch failed, then each alone: the good ones stay on the device
    assert sorted(host) == [1, 2]
    for k in host:
        assert np.array_equal(host[k], images.load(names[k], 32))
    assert dict(fallbacks) == {names[1]: "rejected by the GPU decoder", names[2]: "not a JPEG"}
    reasons = dict(failed)
    assert sorted(reasons) == [13, 14]
    assert reasons[14] == "not a regular file"
    assert reasons[13].startswith("cannot decode")


def test_a_batch_the_device_decodes_whole_is_decoded_in_one_call(tmp_path):
    calls = []

    def decode(encoded):
        calls.append(len(encoded))
        return _pil_decode(encoded)

    rng = np.random.default_rng(6)
    names = []
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(_photo(rng, 30, 30)))
        names.append(str(tmp_path / f"{i}.jpg"))
    decoded, host, failed, _ = gpu_decode.route_and_decode(
        names, [0, 1, 2, 3], 16, [gpu_decode._read(n) for n in names], decode
    )
    assert calls == [4] and sorted(decoded) == [0, 1, 2, 3] and not host and not failed


class FakeDecoder:
    """Stands in for GpuDecoder in a decode process: numpy batches, a file named 'boom' raises."""

    def __init__(self):
        self.counts = {"gpu": 0, "cpu fallback": 0, "failed": 0}
        self.fallbacks: list = []
        self.timings = {"nvJPEG decode": 0.5}

    def decode_paths(self, paths, rows, size):
        if "boom" in paths:
            raise ValueError("cannot decode boom")
        self.counts["gpu"] += len(paths)
        return images.Batch(np.full((len(rows), size, size, 3), os.getpid() % 256, np.uint8), np.array(rows), [])


def test_decode_processes_hand_batches_back_in_order_and_report_their_counts():
    pool = gpu_decode._WorkerPool(3, FakeDecoder)
    try:
        jobs = [([f"f{j}"] * 2, [2 * j, 2 * j + 1], 4) for j in range(7)]
        got = list(pool.run(jobs))
        assert [b.rows.tolist() for b in got] == [[2 * j, 2 * j + 1] for j in range(7)]
        assert len({int(b.images[0, 0, 0, 0]) for b in got}) == 3  # round robin over the three processes
        assert len(list(pool.run(jobs[:2]))) == 2  # reused by the next split
    finally:
        stats = pool.close()
    assert sum(c["gpu"] for c, _, _ in stats) == 18 and sum(t["nvJPEG decode"] for _, _, t in stats) == 1.5
    assert not any(p.is_alive() for p in pool.procs)


def test_a_failing_decode_process_is_an_error_not_a_hang():
    pool = gpu_decode._WorkerPool(2, FakeDecoder)
    try:
        with pytest.raises(RuntimeError, match="failed on batch 1: ValueError: cannot decode boom"):
            list(pool.run([(["a"], [0], 4), (["boom"], [1], 4), (["c"], [2], 4)]))
        with pytest.raises(RuntimeError, match="failed earlier"):
            list(pool.run([(["a"], [0], 4)]))
    finally:
        pool.close()
    assert not any(p.is_alive() for p in pool.procs)


# ----------------------------------------------------------------------------- choosing the decoder


def test_decode_processes_only_for_runs_large_enough_to_repay_their_start(monkeypatch):
    monkeypatch.setattr(gpu_decode, "WORKERS", None)
    assert gpu_decode.processes_for(gpu_decode.PROCESSES_FROM_IMAGES - 1) == 0  # the thread: starts at once
    assert gpu_decode.processes_for(gpu_decode.PROCESSES_FROM_IMAGES) == gpu_decode.PROCESSES == 4
    monkeypatch.setattr(gpu_decode, "WORKERS", 2)  # forced (benchmarks, tests)
    assert gpu_decode.processes_for(10) == 2


def test_resolve_auto_cpu_gpu():
    assert gpu_decode.resolve("cpu", has_files=True, reason=None) == "cpu"
    assert gpu_decode.resolve("auto", has_files=True, reason=None) == "gpu"
    assert gpu_decode.resolve("auto", has_files=True, reason="no CUDA device") == "cpu"
    assert gpu_decode.resolve("auto", has_files=False, reason=None) == "cpu"
    assert gpu_decode.resolve("auto", has_files=True, precision="int8", reason=None) == "cpu"
    assert gpu_decode.resolve("gpu", has_files=True, reason=None) == "gpu"
    with pytest.raises(ConfigError) as e:
        gpu_decode.resolve("gpu", has_files=True, reason="no CUDA device is visible to PyTorch")
    assert "--decoder gpu cannot run here: no CUDA device is visible to PyTorch" in str(e.value)
    with pytest.raises(ConfigError, match="holds arrays"):
        gpu_decode.resolve("gpu", has_files=False, reason=None)
    with pytest.raises(ConfigError, match="int8 runs on the CPU"):
        gpu_decode.resolve("gpu", has_files=True, precision="int8", reason=None)


def test_config_refuses_an_unknown_decoder_by_name():
    with pytest.raises(ConfigError) as e:
        ExtractConfig(decoder="fast")
    assert str(e.value) == "decoder must be one of ('auto', 'cpu', 'gpu'); received decoder='fast'"
    assert ExtractConfig().decoder == "auto"


@pytest.mark.skipif(_cuda(), reason="checks the machine without a CUDA device")
def test_auto_picks_cpu_without_a_gpu_and_the_cpu_cache_keeps_its_name(tmp_path):
    root = make_folder(tmp_path / "img", {"train": 2}, ext=".jpg")
    p = layout.plan(ExtractConfig(data=str(root), weights="random", cache_dir=tmp_path / "c"))
    assert p.cfg.decoder == "cpu"
    assert p.key.preprocessing == "caffe (BGR, ImageNet mean subtracted)" or gpu_decode.GPU_IDENTITY not in (
        p.key.preprocessing
    )
    assert not p.path.name.endswith(f"{gpu_decode.CACHE_SUFFIX}.h5")
    assert (
        p.path
        == layout.plan(ExtractConfig(data=str(root), weights="random", cache_dir=tmp_path / "c", decoder="cpu")).path
    )


def test_a_gpu_decoded_cache_has_its_own_identity_and_name(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_decode, "unavailable_reason", lambda: None)  # as on a GPU host
    root = make_folder(tmp_path / "img", {"train": 2}, ext=".jpg")
    base = ExtractConfig(data=str(root), weights="random", cache_dir=tmp_path / "c")
    cpu = layout.plan(ExtractConfig(**{**base.__dict__, "decoder": "cpu"}))
    auto = layout.plan(base)
    assert auto.cfg.decoder == "gpu"
    assert auto.path.name == cpu.path.name.replace(".h5", f"{gpu_decode.CACHE_SUFFIX}.h5")
    diff = cpu.key.identity_diff(auto.key)
    assert len(diff) == 1 and diff[0].startswith("preprocessing:") and gpu_decode.GPU_IDENTITY in diff[0]
    assert "DECODER=gpu" in layout.extract_command(auto.cfg)


@pytest.mark.skipif(_cuda(), reason="checks the machine without a CUDA device")
def test_decoder_gpu_without_a_gpu_is_exit_2_with_no_traceback(tmp_path, capsys):
    root = make_folder(tmp_path / "img", {"train": 2}, ext=".jpg")
    code = cli.main(
        ["extract", "--data", str(root), "--weights", "random", "--cache-dir", str(tmp_path / "c"), "--decoder", "gpu"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "--decoder gpu cannot run here" in err and "Use --decoder cpu" in err
    assert "Traceback" not in err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.h5"))


def test_cli_refuses_an_unknown_decoder_with_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["extract", "--decoder", "fast"])
    assert e.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- on a CUDA device


def _photos(root: Path, n: int) -> list[str]:
    rng = np.random.default_rng(11)
    out = []
    for i in range(n):
        h, w = [(375, 500), (500, 375), (384, 512), (360, 480)][i % 4]
        path = root / ("cats" if i % 2 else "dogs") / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(_photo(rng, h, w)))
        out.append(str(path))
    return out


@gpu
@needs_cuda
def test_device_resize_matches_the_numpy_reference(tmp_path):
    import torch
    from torchvision.io import decode_jpeg

    names = _photos(tmp_path, 8)
    with gpu_decode.GpuDecoder() as dec:
        for name in names[:4]:
            t = decode_jpeg(torch.frombuffer(bytearray(Path(name).read_bytes()), dtype=torch.uint8), device="cuda")
            box = gpu_decode.draft_scale(t.shape[2], t.shape[1], 150)
            got = dec.resize([t], 150)[0].cpu().numpy().astype(int)
            want = gpu_decode.resize_reference(t.permute(1, 2, 0).cpu().numpy(), 150, box=box).astype(int)
            assert np.array_equal(got, want)  # float64 on both sides: Pillow's arithmetic, exactly


@gpu
@needs_cuda
def test_one_shape_groups_and_padded_batches_resize_alike(tmp_path):
    import torch
    from torchvision.io import decode_jpeg

    names = _photos(tmp_path, 12)  # 4 shapes, interleaved: the grouped path must restore the order
    encoded = [torch.frombuffer(bytearray(Path(n).read_bytes()), dtype=torch.uint8) for n in names]
    decoded = decode_jpeg(encoded, device="cuda")
    with gpu_decode.GpuDecoder() as dec:
        grouped = dec.resize(decoded, 150).cpu().numpy()
        padded = dec._resize_padded(decoded, 150).cpu().numpy()
    assert np.array_equal(grouped, padded)
    for k in (0, 5, 11):
        t = decoded[k]
        box = gpu_decode.draft_scale(t.shape[2], t.shape[1], 150)
        assert np.array_equal(grouped[k], gpu_decode.resize_reference(t.permute(1, 2, 0).cpu().numpy(), 150, box))


@gpu
@needs_cuda
def test_gpu_batches_are_close_to_the_cpu_path_and_in_order(tmp_path):
    import torch

    names = _photos(tmp_path, 40)
    Image.open(names[3]).convert("CMYK").save(names[3], format="JPEG")  # must fall back, not be misread
    rows = list(range(len(names)))
    with gpu_decode.GpuDecoder() as dec:
        got = list(dec.batches(names, rows, 150, 16))
        assert dec.counts == {"gpu": 39, "cpu fallback": 1, "failed": 0}
    assert all(isinstance(b.images, torch.Tensor) and b.images.is_cuda for b in got)
    assert np.concatenate([b.rows for b in got]).tolist() == rows
    gpu_pixels = np.concatenate([b.images.cpu().numpy() for b in got]).astype(float)
    cpu_pixels = np.stack([images.load(n, 150) for n in names]).astype(float)
    diff = np.abs(gpu_pixels - cpu_pixels)
    print(f"GPU vs CPU decode, 150 px: mean |diff| {diff.mean():.3f}, p99 {np.percentile(diff, 99):.0f}")
    assert np.array_equal(gpu_pixels[3], cpu_pixels[3])  # the CMYK file went through Pillow
    assert diff.mean() < 2.0


@gpu
@needs_cuda
def test_extract_with_the_gpu_decoder_records_it_and_stays_close_to_cpu_features(tmp_path):
    from pipeline.cache import store
    from pipeline.features.extract import extract

    root = tmp_path / "img"
    for split, n in (("train", 12), ("test", 8)):
        _photos(root / split, n)
    (root / "train" / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "train" / "dogs" / "flat.png")
    base = {"data": str(root), "weights": "random", "cache_dir": tmp_path / "c", "quiet": True, "batch_size": 8}
    cpu = extract(ExtractConfig(**base, decoder="cpu"))
    dev = extract(ExtractConfig(**base, decoder="gpu"))
    assert dev.path != cpu.path and dev.path.name.endswith(f"{gpu_decode.CACHE_SUFFIX}.h5")
    meta = store.read_meta(dev.path)
    assert gpu_decode.GPU_IDENTITY in meta.preprocessing
    assert meta.info["decode"]["gpu"] == 20 and meta.info["decode"]["cpu fallback"] == 1
    assert meta.info["config"]["decoder"] == "gpu"
    assert dev.skipped == cpu.skipped  # the same file skipped, with the same reason
    for split in ("train", "test"):
        a, _, pa = store.load_split(cpu.path, split)
        b, _, pb = store.load_split(dev.path, split)
        assert list(pa) == list(pb)
        rel = np.abs(a - b).max() / np.abs(a).max()
        assert rel < 0.2, rel


@gpu
@needs_cuda
def test_decode_processes_give_the_decode_threads_cache(tmp_path, monkeypatch):
    """``gpu_decode.WORKERS`` decode processes (CUDA IPC, warmed up while the model builds)
    hand over the same pixels, in the same order, as the decode thread: the same cache."""
    from pipeline.cache import store
    from pipeline.features.extract import extract

    root = tmp_path / "img"
    _photos(root / "train", 30)
    base = {"data": str(root), "weights": "random", "quiet": True, "batch_size": 8, "decoder": "gpu"}
    monkeypatch.setattr(gpu_decode, "WORKERS", 0)
    thread = extract(ExtractConfig(**base, cache_dir=tmp_path / "thread"))
    monkeypatch.setattr(gpu_decode, "WORKERS", 2)
    procs = extract(ExtractConfig(**base, cache_dir=tmp_path / "procs"))
    assert store.read_meta(procs.path).info["decode"]["gpu"] == 30
    a, ya, pa = store.load_split(thread.path, "train")
    b, yb, pb = store.load_split(procs.path, "train")
    assert list(pa) == list(pb) and list(ya) == list(yb)
    assert np.array_equal(a, b)


@gpu
@needs_cuda
def test_the_queued_forward_on_device_batches_equals_predict_on_batch():
    import keras
    import torch

    from pipeline.features import backbone, device_forward, weights

    if keras.backend.backend() != "jax":
        pytest.skip("the queued forward is the JAX backend's")
    model = backbone.build(size=64, layer="block5_pool", weights=weights.resolve("random"), precision="float32")
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)).cuda()
    queued = device_forward.Queued(model, 8)
    got = queued.collect(queued.submit(x))
    want = device_forward.forward(model, x, 8)
    assert got.shape == want.shape == (5, 2, 2, 512)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
