#!/usr/bin/env bash
# CPU measurements for docs/BENCHMARKS.md, one after the other on an otherwise idle machine.
# Usage: bash tools/cpu_measure.sh OUTDIR   (uses the repository's .venv or $QX)
set -u
OUT=${1:-/tmp/cpu_measure}; mkdir -p $OUT
QX=${QX:-.venv/bin/quest-export}; PY=${PY:-.venv/bin/python}
export QUEST_EXPORT_NO_PROGRESS=1
t() { local name=$1; shift; local s=$(date +%s.%N); "$@" > $OUT/$name.log 2>&1; local rc=$?; \
      echo "$name rc=$rc seconds=$(echo "$(date +%s.%N) - $s" | bc)" | tee -a $OUT/times.txt; }
rm -rf calib/cache runs engines/out   # from scratch, as on a fresh machine
t main_job_jetson        $QX build --target jetson
t main_job_jetson_again  $QX build --target jetson
t quantize_ptq_w8a8      $QX quantize --method ptq
t quantize_qdiffusion_w8a8 $QX quantize --method qdiffusion
t build_cpu_w8a8         $QX build --target cpu
t build_jetson_w4a8      $QX build --target jetson --bits w4a8
t build_uncond_jetson_w8a8 $QX build --target jetson --model fmnist-uncond
t build_uncond_jetson_w4a8 $QX build --target jetson --model fmnist-uncond --bits w4a8
t sizes_latency          $PY bench/export_sizes.py --latency --threads 2 --out $OUT/export_sizes.json
t agree_w8a8             $PY bench/engine_agreement.py engines/out/fmnist-cond-quest-w8a8-jetson-orin-jp61 --n 200 --out $OUT/agree_w8a8.json
t agree_w4a8             $PY bench/engine_agreement.py engines/out/fmnist-cond-quest-w4a8-jetson-orin-jp61 --n 200 --out $OUT/agree_w4a8.json
cat $OUT/times.txt
