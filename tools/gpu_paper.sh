#!/usr/bin/env bash
# `paper` preset timing on one GPU (the device machine), then the W4A4 seed rows, over several device calls:
#   OUT=/dir bash tools/gpu_paper.sh start   # CUDA-graph tests, then QuEST --preset paper (fmnist-cond, W4A8) in the
#                                            # background (setsid: it outlives this call), then poll
#   OUT=/dir bash tools/gpu_paper.sh wait    # poll until it ends; then the eager/graph step-rate benchmark, then
#                                            # `bench/quality.py --rows $SEEDS` (default seeds; SEEDS= skips it)
#                                            # in the background; poll that
# Each call ends by LIMIT seconds and leaves $OUT/paper.tar (logs and JSON so far).
set -u
LIMIT=${LIMIT:-560}
. tools/gpu_env.sh
R=/tmp/paper; mkdir -p $R
if [ "${1:-wait}" = start ]; then
  nvidia-smi -L
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ptq/test_cuda_graphs.py > $R/gpu_tests.log 2>&1
  tail -n 15 $R/gpu_tests.log
  sets=""
  grep -q " passed" $R/gpu_tests.log && ! grep -q "failed" $R/gpu_tests.log || \
    sets="--set ptq.cuda_graphs=false --set finetune.cuda_graphs=false"
  echo "paper run starts at $(date +%s) ${sets}" | tee $R/start
  setsid nohup python3 bench/quality.py --model fmnist-cond --rows standard --only quest-w4a8 --preset paper \
    --no-float --n 1000 --jobs 1 --threads 4 --work /tmp/paperwork --out $R/paper.json $sets \
    > $R/paper.log 2>&1 < /dev/null &
fi
while [ ! -f $R/paper.json ] && [ "$(left)" -gt 20 ]; do sleep 10; done
if [ -f $R/paper.json ] && [ ! -f $R/speed.json ] && [ "$(left)" -gt 240 ]; then
  timeout $(( $(left) - 10 )) python3 bench/recon_speed.py --iters 200 --work /tmp/paperwork --out $R/speed.json \
    > $R/speed.log 2>&1
fi
if [ -f $R/speed.json ] && [ ! -f $R/seeds.started ] && [ -n "${SEEDS-seeds}" ]; then
  date +%s > $R/seeds.started
  setsid nohup python3 bench/quality.py --rows ${SEEDS:-seeds} --n 1000 --jobs ${JOBS:-18} --threads 1 --preset gpu \
    --no-float --work /tmp/seedwork --out $R/seeds.json > $R/seeds.log 2>&1 < /dev/null &
fi
while [ -f $R/seeds.started ] && [ ! -f $R/seeds.json ] && [ "$(left)" -gt 20 ]; do sleep 10; done
echo "now $(date +%s)"; cat $R/start; tail -n 25 $R/paper.log $R/paper/*.log 2>/dev/null | cut -c1-250
tail -n 8 $R/speed.log 2>/dev/null; tail -n 30 $R/seeds.log 2>/dev/null | cut -c1-200
tar -C /tmp -cf $OUT/paper.tar paper
