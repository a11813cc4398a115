#!/usr/bin/env bash
# One device call: issue 16's W4A4 ablation of fmnist-uncond (bench/ablation_w4a4.py), `gpu` preset, pipeline seed 0,
# n = 1000, the same noise for every variant. Quantizes METHODS (default: dmq+quest quest) unless their artifacts
# were carried in .abl-art/<method>.tgz (as this script leaves them in $OUT); every finished variant is kept.
set -u
LIMIT=${LIMIT:-560}
METHODS=${METHODS:-"dmq+quest quest"}
JOBS=${JOBS:-8}
PER=${PER:-4}
. tools/gpu_env.sh
R=/tmp/abl; mkdir -p $R /tmp/art
quant="" given=()
for m in $METHODS; do
  t=.abl-art/$(echo "$m" | tr '+/' '__').tgz
  if [ -f "$t" ]; then tar -C /tmp/art -xzf "$t"; given+=(--artifact "$m=/tmp/art/$(echo "$m" | tr '+/' '__')")
  else quant="$quant,$m"; fi
done
timeout $(( $(left) - 8 )) python3 bench/ablation_w4a4.py --methods "${quant#,}" "${given[@]}" ${VARIANTS:+--variants $VARIANTS} \
  --preset gpu --n 1000 --jobs $JOBS --per-worker $PER --threads 1 --work /tmp/aw --artifact-tar $OUT --deadline $(( $(left) - 45 )) \
  --out $R/ablation.json > $R/ablation.log 2>&1
tail -n 70 $R/ablation.log | cut -c1-200
tar -C /tmp -czf $OUT/abl.tgz abl
