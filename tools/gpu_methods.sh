#!/usr/bin/env bash
# One device call: the issue-16 method table (ptq, qdiffusion, quest, dmq, dmq+quest) on both bundled models at
# BITS (default: w4a8 w4a6 w4a4), pipeline seeds SEEDS (default: 0), `gpu` preset, n = 1000, same noise for every row.
# Finished rows leave their JSON in $OUT/methods/ even when the call runs out of time (results tarred at the end).
set -u
LIMIT=${LIMIT:-560}
BITS=${BITS:-"w4a8 w4a6 w4a4"}
SEEDS=${SEEDS:-0}
JOBS=${JOBS:-16}
. tools/gpu_env.sh
only=""
for b in $BITS; do for tag in cond uncond; do for m in ptq qdiffusion quest dmq dmq+quest; do for s in $SEEDS; do
  only="$only,$tag/$m-$b-s$s"; done; done; done; done
rows=$(for b in $BITS; do printf 'methods-%s,' $b; done)
R=/tmp/methods; mkdir -p $R
timeout $(( $(left) - 20 )) python3 bench/quality.py --rows ${rows%,} --only ${only#,} --n 1000 --jobs $JOBS --threads 1 \
  --preset gpu --no-float --work /tmp/pw --out $R/methods.json > $R/methods.log 2>&1
tail -n 40 $R/methods.log | cut -c1-220
tar -C /tmp -czf $OUT/methods.tgz methods
