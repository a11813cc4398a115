#!/usr/bin/env bash
# Trains the bundled diffusion models (and, with WITH_CLASSIFIER=1, the metric classifier) on one GPU.
# Usage (from the repo root, with the wheels in .whl and the Fashion-MNIST .gz files in .data):
#   OUT=/some/dir bash tools/gpu_train_zoo.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FASHION_MNIST_DIR=$PWD/.data
nvidia-smi -L
W=/tmp/zoo; mkdir -p $W
MODELS="fmnist-cond fmnist-uncond"
if [ "${WITH_CLASSIFIER:-0}" = 1 ]; then
  python3 -m quest_export.zoo.train classifier --out $W/classifier --seed 0 --epochs 15 > $OUT/classifier.log 2>&1 &
  MODELS="$MODELS classifier"
fi
for m in fmnist-cond fmnist-uncond; do
  python3 -m quest_export.zoo.train unet --model $m --out $W/$m --seed 0 --steps 40000 --max-minutes ${MINUTES:-8.3} \
    --batch 1024 --lr 4e-4 > $OUT/$m.log 2>&1 &
done
wait
for m in $MODELS; do tar -C $W -cf $OUT/$m.tar $m; done
tail -n 3 $OUT/*.log
