#!/usr/bin/env bash
# Quality benchmarks on one GPU (the device machine). Results go to $OUT/results.tar even if a step times out.
# Usage: OUT=/dir BENCH="<rows spec>" bash tools/gpu_bench.sh
set -u
LIMIT=${LIMIT:-540}
. tools/gpu_env.sh
nvidia-smi -L
R=/tmp/results; mkdir -p $R
if [ "${FLOAT:-0}" = 1 ]; then  # in the background: it shares the GPU with the rows below
  timeout $(left) python3 bench/float_eval.py --n 1000 --out $R/float_eval.json --grids $R > $R/float_eval.log 2>&1 &
fi
for spec in ${BENCH:-}; do   # spec = model:rowsets:jobs[:only]
  IFS=: read -r model rows jobs only <<< "$spec"
  extra=""; [ -n "${only:-}" ] && extra="--only $only"
  timeout $(left) python3 bench/quality.py --model $model --rows $rows --n ${N:-1000} --jobs $jobs --threads 1 \
    ${MERGED:+--merged} --preset ${PRESET:-gpu} --out $R/$model-$rows.json $extra ${SETS:-} > $R/$model-$rows.log 2>&1
done
wait
tar -C /tmp -cf $OUT/results.tar results
tail -n 30 $R/*.log | cut -c1-300
