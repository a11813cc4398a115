#!/usr/bin/env bash
# Quality benchmarks on one GPU (the device machine). Results go to $OUT/results.tar even if a step times out.
# Usage: OUT=/dir BENCH="<rows spec>" bash tools/gpu_bench.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QUEST_EXPORT_NO_PROGRESS=1
nvidia-smi -L
R=/tmp/results; mkdir -p $R
LIMIT=${LIMIT:-540}
start=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - start) )); }
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
