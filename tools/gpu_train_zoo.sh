#!/usr/bin/env bash
# Reproduces the bundled models (quest_export/zoo/models) on one GPU, from the repo root, with the
# diffusers wheels in .whl and the Fashion-MNIST .gz files in .data (see quest_export/zoo/README.md).
#   OUT=/some/dir bash tools/gpu_train_zoo.sh
# The shipped UNets were trained with a 7-minute time limit (three jobs sharing one H200); the step
# counts they reached are fixed here so that a rerun repeats the same optimisation.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/runtime/python PYTHONUNBUFFERED=1 FASHION_MNIST_DIR=$PWD/.data
nvidia-smi -L
W=/tmp/zoo; mkdir -p $W
python3 -m quest_export.zoo.train classifier --out $W/classifier --seed 0 --epochs 15 > $OUT/classifier.log 2>&1 &
python3 -m quest_export.zoo.train unet --model fmnist-cond --out $W/fmnist-cond --seed 0 --steps 5985 > $OUT/cond.log 2>&1 &
python3 -m quest_export.zoo.train unet --model fmnist-uncond --out $W/fmnist-uncond --seed 0 --steps 9062 > $OUT/uncond.log 2>&1 &
wait
for m in classifier fmnist-cond fmnist-uncond; do tar -C $W -cf $OUT/$m.tar $m; done
tail -n 3 $OUT/*.log
