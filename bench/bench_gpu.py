"""Stage one on a GPU: JPEG decoding on the host (threads, processes) against on the device
(``--decoder gpu``), the forward pass alone (the ceiling), extract end to end with its time
split and GPU utilisation, the feature difference and head accuracy of CPU- against
GPU-decoded caches, and the default sweep's MLP configs fitted on this machine.

Backend-agnostic Keras (KERAS_BACKEND=jax or torch; no TensorFlow on the GPU machines).
Random weights (throughput does not depend on their values). Sections run in order of
importance and stop starting once ``--budget`` seconds have passed. Usage:
    KERAS_BACKEND=jax python bench/bench_gpu.py --photos PHOTOS [--sizes 150 180]
    python bench/bench_gpu.py --sections mlp --mlp-data cats_and_dogs_small   # the CPU side
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import REPO, Timer, machine, median, require_data

T0 = time.perf_counter()


class GpuUse:
    """Samples the GPU's utilisation (NVML, every 20 ms) while the block runs: mean percent."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml: Any = pynvml
        except Exception:
            self._nvml = None

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu)

    def __enter__(self) -> GpuUse:
        if self._nvml is not None:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._t.join()

    def __str__(self) -> str:
        if not self.samples:
            return "GPU use n/a"
        return f"GPU busy {sum(self.samples) / len(self.samples):.0f}% (NVML, {len(self.samples)} samples)"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    except ImportError:
        pass
    return "no CUDA device"


def files_of(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def decode_alone(files: list[str], size: int, batch: int, gpu_workers: list[int], cpu: bool = True) -> None:
    from pipeline.core.config import ExtractConfig
    from pipeline.features import gpu_decode, images

    cores = os.cpu_count() or 2
    runs: list[tuple[str, Any]] = []
    if cpu:
        runs.append((f"CPU, {cores} threads", lambda: images.Decoder(threads=cores)))
        processes = ExtractConfig().decode_processes
        runs.append((f"CPU, {processes} processes", lambda: images.Decoder(processes=processes)))
    if gpu_decode.unavailable_reason() is None:
        for w in gpu_workers:
            label = "GPU, decode thread" if w == 0 else f"GPU, {w} decode processes"
            runs.append((label, functools.partial(gpu_decode.GpuDecoder, workers=w)))
    for label, make in runs:
        with make() as decoder:
            for _ in decoder.batches(files, range(min(512, len(files))), size, batch):  # start pools, warm caches
                pass
            with GpuUse() as use, Timer() as t:
                for _ in decoder.batches(files, range(len(files)), size, batch):
                    pass
        extra = ""
        if hasattr(decoder, "counts"):  # read after the pool closed: its processes' counts are merged then
            split = ", ".join(f"{k} {v:.2f} s" for k, v in decoder.timings.items())
            extra = f", {decoder.counts}\n      decoding (summed over threads/processes): {split}"
        print(f"  decode+resize alone, {label:38s}: {len(files) / t.seconds:8.0f} img/s; {use}{extra}", flush=True)


def decode_profile(files: list[str], size: int) -> None:
    """Where GPU decoding's time goes, piece by piece, on files already in memory."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from pipeline.features import gpu_decode

    n = min(4096, len(files))
    with Timer() as t:
        datas = [gpu_decode._read(f) for f in files[:n]]
    print(f"  profile: reading {n} files (page cache, one thread): {t.seconds / n * 1e6:.0f} us/file")
    with Timer() as t:
        for d in datas:
            gpu_decode.jpeg_problem(d)  # type: ignore[arg-type]
    print(f"  profile: header check: {t.seconds / n * 1e6:.1f} us/file")
    enc = [torch.frombuffer(d, dtype=torch.uint8) for d in datas]  # type: ignore[arg-type]
    for bs in (64, 256, 1024):
        decode_jpeg(enc[:bs], mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        with GpuUse() as use, Timer() as t:
            for k in range(0, n, bs):
                decode_jpeg(enc[k : k + bs], mode=ImageReadMode.RGB, device="cuda")
            torch.cuda.synchronize()
        print(f"  profile: torchvision decode_jpeg on cuda, batch {bs:4d}: {n / t.seconds:7.0f} img/s; {use}")
    decoded = decode_jpeg(enc[:256], mode=ImageReadMode.RGB, device="cuda")
    with gpu_decode.GpuDecoder() as dec:
        dec.resize(decoded, size)
        torch.cuda.synchronize()
        with Timer() as t:
            for _ in range(10):
                dec.resize(decoded, size)
            torch.cuda.synchronize()
    print(f"  profile: resize on the device (pad + 2 matmuls), batch 256: {2560 / t.seconds:7.0f} img/s")


def hybrid(files: list[str], size: int, batch: int, gpu_share: float) -> None:
    """What-if: the GPU decoder and the CPU processes at once, on disjoint shares of the files."""
    from pipeline.core.config import ExtractConfig
    from pipeline.features import gpu_decode, images

    cut = int(len(files) * gpu_share)
    done: dict[str, float] = {}

    def drain(label: str, decoder: Any, part: list[str]) -> None:
        with decoder:
            for _ in decoder.batches(part, range(len(part)), size, batch):
                pass
        done[label] = time.perf_counter()

    warm_gpu, warm_cpu = gpu_decode.GpuDecoder(), images.Decoder(processes=ExtractConfig().decode_processes)
    for _ in warm_cpu.batches(files, range(256), size, batch):
        pass
    start = time.perf_counter()
    threads = [
        threading.Thread(target=drain, args=("gpu", warm_gpu, files[:cut])),
        threading.Thread(target=drain, args=("cpu", warm_cpu, files[cut:])),
    ]
    with GpuUse() as use:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    wall = max(done.values()) - start
    print(
        f"  decode+resize alone, GPU ({gpu_share:.0%}) + CPU processes at once: {len(files) / wall:8.0f} img/s "
        f"(GPU share done in {done['gpu'] - start:.2f} s, CPU share in {done['cpu'] - start:.2f} s); {use}",
        flush=True,
    )


def forward_alone(size: int, batch: int, precision: str, images: int = 8192) -> float:
    """Images/s of the model alone: uint8 batches from host memory, already on the device, and
    on the device with the next batch queued before the last one's features are collected
    (``device_forward.Queued``, what extract does with GPU-decoded batches under JAX)."""
    import keras
    import numpy as np

    from pipeline.features import backbone, device_forward, gpu_decode, registry, weights

    gflop = registry.flops_per_image(size, "block5_pool") / 1e9
    model = backbone.build(size=size, layer="block5_pool", weights=weights.resolve("random"), precision=precision)
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    steps = max(4, math.ceil(images / batch))
    rates = {}

    def queued(batch_x: Any) -> None:
        q = device_forward.queued_for(model, batch)
        last = None
        for _ in range(steps):
            handle = q.submit(batch_x)
            if last is not None:
                q.collect(last)
            last = handle
        q.collect(last)  # type: ignore[arg-type]

    inputs: list[tuple[str, Any, Any]] = [("host uint8", x, None)]
    if gpu_decode.unavailable_reason() is None:
        import torch

        on_device = torch.from_numpy(x).cuda()
        inputs.append(("device uint8", on_device, None))
        if keras.backend.backend() == "jax":
            inputs.append(("device uint8, queued", on_device, queued))
    for label, batch_x, how in inputs:
        run = how or (lambda b: [device_forward.forward(model, b, batch) for _ in range(steps)])
        run(batch_x)  # compile
        got = []
        for _ in range(3):
            with Timer() as t:
                run(batch_x)
            got.append(steps * batch / t.seconds)
        rates[label] = median(got)
        print(
            f"  forward alone, {precision:8s} batch {batch}, {label:20s}: {rates[label]:8.0f} img/s "
            f"{rates[label] * gflop / 1e3:6.1f} TFLOP/s",
            flush=True,
        )
    keras.backend.clear_session()
    return max(rates.values())


def extract_once(
    data: Path, size: int, precision: str, decoder: str, batch: int, cache_dir: Path, workers: int = 0
) -> Any:
    from pipeline.core.config import ExtractConfig
    from pipeline.features import gpu_decode
    from pipeline.features.extract import extract

    gpu_decode.WORKERS = workers  # decode processes for --decoder gpu (0: a thread)
    cfg = ExtractConfig(
        data=str(data),
        size=size,
        weights="random",
        precision=precision,
        decoder=decoder,
        batch_size=batch,
        cache_dir=cache_dir,
        force=True,
        quiet=True,
    )
    with GpuUse() as use, Timer() as t:
        result = extract(cfg)
    split = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
    print(
        f"  extract end to end, decoder {decoder}{f' ({workers} processes)' if decoder == 'gpu' and workers else ''}"
        f", {precision:8s} batch {batch}: steady {result.steady_rate:7.0f} "
        f"img/s, wall {result.images / t.seconds:6.0f} img/s ({result.images} images, {t.seconds:.1f} s incl. "
        f"build, compile, HDF5); {use}\n      time: {split}, warm-up {result.warmup_seconds:.1f} s, "
        f"background chunk writer {result.writer_seconds:.2f} s"
        + (f"; decoded {result.decode}" if result.decode else ""),
        flush=True,
    )
    return result


def quality(cpu_cache: Path, gpu_cache: Path) -> None:
    """Feature difference and head accuracy, CPU- against GPU-decoded features of the same images."""
    import numpy as np

    from pipeline.cache import store
    from pipeline.train.heads import LogRegHead

    for split in ("train", "test"):
        a, _, pa = store.load_split(cpu_cache, split)
        b, _, pb = store.load_split(gpu_cache, split)
        assert list(pa) == list(pb), "the two caches hold different rows"
        fa, fb = a.reshape(len(a), -1), b.reshape(len(b), -1)
        cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1) + 1e-12)
        print(
            f"  features {split}: max |cpu-gpu| / max |cpu| = {np.abs(a - b).max() / np.abs(a).max():.3e}, "
            f"mean |cpu-gpu| / mean |cpu| = {np.abs(a - b).mean() / np.abs(a).mean():.3e}, "
            f"cosine min {cos.min():.5f} mean {cos.mean():.6f}",
            flush=True,
        )
    for pooling, c in (("avg", 0.1), ("flatten", 0.001)):
        accs = []
        for cache in (cpu_cache, gpu_cache):
            xtr, ytr, _ = store.load_split(cache, "train")
            xte, yte, _ = store.load_split(cache, "test")
            head = LogRegHead(pooling=pooling, C=c).fit(xtr, ytr)
            accs.append(float((head.predict(xte) == yte).mean()))
        print(
            f"  logistic regression ({pooling}, C={c}) test accuracy: CPU-decoded {accs[0]:.4f}, "
            f"GPU-decoded {accs[1]:.4f} ({len(yte)} test images, random weights)",
            flush=True,
        )


def mlp_sweep(data: Path, cache_dir: Path) -> None:
    """The default sweep's MLP configs (pipeline/train/default_sweep.toml) fitted one after another on this
    machine, on float32 features of DATA at 150 px (random weights, CPU decoding)."""
    import keras

    from pipeline.cache import store
    from pipeline.core.config import load_toml
    from pipeline.train.sweep import expand_grid
    from pipeline.train.sweep_file import make_head

    result = extract_once(data, 150, "float32", "cpu", 64, cache_dir)
    xtr, ytr, _ = store.load_split(result.path, "train")
    xva, yva, _ = store.load_split(result.path, "validation")
    print(f"  features: train {xtr.shape}, mean {xtr.mean():.6f}, std {xtr.std():.6f} (random init: per backend)")
    spec = load_toml(REPO / "pipeline" / "train" / "default_sweep.toml")
    total = 0.0
    for name, params in expand_grid(spec, "default_sweep.toml"):
        if name != "mlp":
            continue
        head = make_head(name, **{k: v for k, v in params.items() if k != "train_on"})
        with Timer() as t:
            head.fit(xtr, ytr)
        total += t.seconds
        acc = float((head.predict(xva) == yva).mean())
        print(f"  mlp {params}: fit {t.seconds:6.1f} s, validation accuracy {acc:.4f}", flush=True)
    print(f"  MLP configs of the default sweep, one after another: {total:.1f} s ({keras.backend.backend()})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=Path, default=None, help="photo-size JPEGs (bench/make_photos.py)")
    p.add_argument("--mlp-data", type=Path, default=None, help="the 200 px originals (default: the shared copy)")
    p.add_argument("--sizes", type=int, nargs="+", default=[150, 180])
    p.add_argument("--precisions", nargs="+", default=["float16", "float32"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--forward-images", type=int, default=8192, help="images per timed forward-alone repeat")
    p.add_argument(
        "--sections", nargs="+", default=["profile", "decode", "hybrid", "forward", "extract", "quality", "mlp"]
    )
    p.add_argument("--gpu-workers", type=int, nargs="+", default=[0], help="GPU decode processes to compare")
    p.add_argument("--no-cpu-decode", action="store_true", help="leave out the CPU decoding rows")
    p.add_argument("--gpu-share", type=float, default=0.4, help="hybrid: the GPU decoder's share of the files")
    p.add_argument("--budget", type=float, default=1e9, help="seconds after which no new section starts")
    args = p.parse_args()
    photos = args.photos or require_data()
    print(machine())
    print("device:", device_name(), flush=True)
    files = files_of(photos)
    print(f"data: {photos} ({len(files)} files)")
    cache_dir = Path(tempfile.mkdtemp(prefix="featcache-gpu-"))

    def guarded(what: str, fn: Any, *a: Any) -> Any:
        """One section; a failure is printed and the next section still runs (one device run)."""
        try:
            return fn(*a)
        except Exception:
            import traceback

            print(f"FAILED {what}:\n{traceback.format_exc()}", flush=True)
            return None

    def time_left(what: str) -> bool:
        if time.perf_counter() - T0 > args.budget:
            print(f"SKIPPED {what}: past --budget {args.budget:.0f} s", flush=True)
            return False
        return True

    try:
        from pipeline.features import gpu_decode

        has_gpu = gpu_decode.unavailable_reason() is None
        quality_done = False
        for size in args.sizes:
            print(f"\n== {size}x{size}", flush=True)
            if "profile" in args.sections and has_gpu and time_left(f"profile at {size}"):
                guarded(f"profile at {size}", decode_profile, files, size)
            if "decode" in args.sections and time_left(f"decode at {size}"):
                guarded(
                    f"decode at {size}", decode_alone, files, size, args.batch, args.gpu_workers, not args.no_cpu_decode
                )
            if "hybrid" in args.sections and has_gpu and time_left(f"hybrid at {size}"):
                guarded(f"hybrid at {size}", hybrid, files, size, args.batch, args.gpu_share)
            ceilings = {}
            if "forward" in args.sections:
                for precision in args.precisions:
                    if time_left(f"forward {precision} at {size}"):
                        got = guarded("forward", forward_alone, size, args.batch, precision, args.forward_images)
                        if got:
                            ceilings[precision] = got
            if "extract" in args.sections:
                made: dict[tuple[str, str], Path] = {}
                for precision in args.precisions:
                    variants = [("gpu", w) for w in args.gpu_workers] if has_gpu else []
                    variants += [] if args.no_cpu_decode else [("cpu", 0)]
                    for decoder, workers in variants:
                        if not time_left(f"extract {decoder} {precision} at {size}"):
                            continue
                        r = guarded(
                            "extract", extract_once, photos, size, precision, decoder, args.batch, cache_dir, workers
                        )
                        if r is None:
                            continue
                        made[decoder, precision] = r.path
                        if precision in ceilings:
                            print(f"      = {r.steady_rate / ceilings[precision]:.0%} of the forward pass alone")
                if "quality" in args.sections and has_gpu and not quality_done:
                    for precision in ("float32", *args.precisions):
                        if ("cpu", precision) in made and ("gpu", precision) in made and time_left("quality"):
                            print(f"  CPU- vs GPU-decoded caches, {precision}, {size} px:")
                            guarded("quality", quality, made["cpu", precision], made["gpu", precision])
                            quality_done = True  # once: the first size
                            break
                for path in made.values():
                    path.unlink(missing_ok=True)
        if "mlp" in args.sections and time_left("mlp"):
            print("\n== default sweep's MLP configs", flush=True)
            guarded("mlp", mlp_sweep, args.mlp_data or require_data(), cache_dir)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"\nbench_gpu done in {time.perf_counter() - T0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
