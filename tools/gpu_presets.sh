#!/usr/bin/env bash
# One device call: QuEST W4A8 (fmnist-cond) with the `fast` and `gpu` presets, each alone on the GPU (wall time,
# peak memory), then the three-seed W4A8 rows of both models. Results in $OUT/presets.tar.
set -u
LIMIT=${LIMIT:-550}
. tools/gpu_env.sh
R=/tmp/presets; mkdir -p $R
for preset in fast gpu; do
  timeout $(left) python3 bench/quality.py --model fmnist-cond --rows standard --only quest-w4a8 --preset $preset \
    --no-float --n 1000 --jobs 1 --threads 4 --work /tmp/pw --out $R/alone-$preset.json > $R/alone-$preset.log 2>&1
  tail -n 2 $R/alone-$preset.log
done
timeout $(( $(left) - 15 )) python3 bench/quality.py --rows seeds-w4a8 --n 1000 --jobs 12 --threads 1 --preset gpu \
  --no-float --work /tmp/pw --out $R/w4a8.json > $R/w4a8.log 2>&1
tail -n 16 $R/w4a8.log | cut -c1-200
tar -C /tmp -cf $OUT/presets.tar presets
