#!/usr/bin/env bash
# One device call: QuEST W4A8 (fmnist-cond) with the `fast` and `gpu` presets, each alone on the GPU (wall time,
# peak memory), then the three-seed W4A8 rows of both models. Results in $OUT/presets.tar.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QUEST_EXPORT_NO_PROGRESS=1
R=/tmp/presets; mkdir -p $R
LIMIT=${LIMIT:-550}; t0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - t0) )); }
for preset in fast gpu; do
  timeout $(left) python3 bench/quality.py --model fmnist-cond --rows standard --only quest-w4a8 --preset $preset \
    --no-float --n 1000 --jobs 1 --threads 4 --work /tmp/pw --out $R/alone-$preset.json > $R/alone-$preset.log 2>&1
  tail -n 2 $R/alone-$preset.log
done
timeout $(( $(left) - 15 )) python3 bench/quality.py --rows seeds-w4a8 --n 1000 --jobs 12 --threads 1 --preset gpu \
  --no-float --work /tmp/pw --out $R/w4a8.json > $R/w4a8.log 2>&1
tail -n 16 $R/w4a8.log | cut -c1-200
tar -C /tmp -cf $OUT/presets.tar presets
