#!/bin/bash
# The device run behind BENCHMARKS.md section 11 (issue 28). Staged on this machine first, from the
# branch's root, into the lead checkout's ignored folder .gpu/ (the `device` tool sends that checkout):
#   echo .gpu/ >> /work/main/.git/info/exclude; mkdir -p /work/main/.gpu/wheels /work/main/.gpu/wt/tests
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d /work/main/.gpu/wheels keras namex optree
#   tar -C /work/shared/data -cf /work/main/.gpu/cats_and_dogs_small.tar cats_and_dogs_small
#   rm -rf /work/main/.gpu/wt/pipeline /work/main/.gpu/wt/bench; cp -r pipeline bench pyproject.toml /work/main/.gpu/wt/
#   cp tests/conftest.py tests/test_gpu_decode.py /work/main/.gpu/wt/tests/; cp bench/gpu_run.sh /work/main/.gpu/run.sh
# then run(command='BENCH_ARGS="--sizes 150 180 --precisions float16 --sections forward extract --gpu-workers 0 2 3 4"
#   COPIES=8 bash .gpu/run.sh', carry=[".gpu"], timeout_s=480)
# issue 28 device run: GPU tests, then bench_gpu under JAX and under torch (sections stop starting after --budget s)
set -o pipefail
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
cd "$(dirname "$0")"
G=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl || exit 9
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
python3 -c "import torch, torchvision, jax; print(torch.__version__, torchvision.__version__, jax.__version__, jax.devices())" | tee -a $OUT/device.txt
tar -xf cats_and_dogs_small.tar -C /tmp
cd wt
export PYTHONPATH=$G/wt:$G/wt/bench:/tmp/site FEATCACHE_BENCH_DATA=/tmp/cats_and_dogs_small
( time python3 bench/make_photos.py /tmp/cats_and_dogs_small /tmp/photos --copies ${COPIES:-3} --workers 16 ) 2>&1 | tee $OUT/photos.txt
KERAS_BACKEND=jax timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py -rs -s 2>&1 | tee $OUT/tests.log | tail -15
KERAS_BACKEND=jax timeout ${BENCH_TIMEOUT:-300} python3 bench/bench_gpu.py --photos /tmp/photos --budget ${BUDGET:-200} $BENCH_ARGS 2>&1 | tee $OUT/bench.log
[ -n "$BENCH2_ARGS" ] && KERAS_BACKEND=jax timeout ${BENCH2_TIMEOUT:-200} python3 bench/bench_gpu.py --photos /tmp/photos $BENCH2_ARGS 2>&1 | tee $OUT/bench2.log
[ -n "$TORCH_ARGS" ] && KERAS_BACKEND=torch timeout ${TORCH_TIMEOUT:-120} python3 bench/bench_gpu.py --photos /tmp/photos $TORCH_ARGS 2>&1 | tee $OUT/bench_torch.log
echo "run.sh done"
