#!/usr/bin/env bash
# One device call (issue 17): the `quest-export eval` matrix of both bundled models, METHODS x BITS, `gpu` preset,
# n = 1000, seed 0 (the same noise for every row). One eval process per (model, method, bits), all at once on the
# GPU, each in its own work folder; their finished rows are then gathered into one work folder per model and the
# matrix is printed by `quest-export eval` itself (every row reused). Finished rows are restored from
# .gpu-eval/eval.tgz when carried and written back to $OUT/eval.tgz, so a later call continues where this one stopped.
set -u
LIMIT=${LIMIT:-560}
METHODS=${METHODS:-"ptq qdiffusion quest"}
BITS=${BITS:-"w8a8 w4a8 w4a4"}
MODELS=${MODELS:-"fmnist-cond fmnist-uncond"}
. tools/gpu_env.sh
export OMP_NUM_THREADS=1
W=/tmp/ev; mkdir -p $W
[ -f .gpu-eval/eval.tgz ] && tar -C /tmp -xzf .gpu-eval/eval.tgz
for model in $MODELS; do for m in $METHODS; do for b in $BITS; do
  d=$W/$model/$(echo $m | tr '+' '_')-$b; mkdir -p $d
  [ -f $d/matrix.json ] && continue  # finished in an earlier call
  ( s=$(date +%s); timeout $(( $(left) - 40 )) python3 -m cli.main --quiet eval --model $model --preset ${PRESET:-gpu} --device cuda \
      --methods $m --bits $b --n 1000 --seed 0 --work $d --json $d/matrix.json > $d/eval.log 2>&1
    echo "{\"model\": \"$model\", \"method\": \"$m\", \"bits\": \"$b\", \"rc\": $?, \"s\": $(( $(date +%s) - s ))}" >> $W/procs.jsonl ) &
done; done; done
wait
list() { echo "$1" | tr ' ' ','; }
for model in $MODELS; do
  g=$W/$model/all; mkdir -p $g/runs/eval
  cp -n $W/$model/*/runs/eval/* $g/runs/eval/ 2>/dev/null
  timeout 30 python3 -m cli.main --quiet eval --model $model --preset ${PRESET:-gpu} --device cuda --methods $(list "$METHODS") \
    --bits $(list "$BITS") --n 1000 --seed 0 --work $g --json $W/$model-matrix.json > $W/$model-matrix.log 2>&1
  tail -n 14 $W/$model-matrix.log
done
cat $W/procs.jsonl
# the per-process float samples are left out (3 MB each): one copy per model travels in ev/<model>/all
cd /tmp && find ev -path '*/runs/eval/*' ! -path 'ev/*/all/*' -name '*.npy' -delete
tar -czf $OUT/eval.tgz ev/*/*/runs/eval ev/*/*/matrix.json ev/*/*/eval.log ev/*-matrix.* ev/procs.jsonl 2>/dev/null; cd - >/dev/null
ls -la $OUT
