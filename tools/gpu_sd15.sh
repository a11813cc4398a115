#!/usr/bin/env bash
# Issue 15's SD-1.5 cost table on one H200, spread over consecutive device calls (the machine stays warm 30 s
# after a call; a setsid chain runs on between calls). CALL=start installs the carried wheels and starts the chain
# (bench/sd_scale.py, resumable) and a 2 s nvidia-smi sampler; every call then waits until the chain ends or
# LIMIT seconds pass, and copies the results JSON, the chain log and the sampler's log into $OUT.
set -u
LIMIT=${LIMIT:-570}
W=${SD_WORK:-/tmp/sd}
t0=$(date +%s)
if [ "${CALL:-wait}" = start ]; then
  . tools/gpu_env.sh
  mkdir -p $W
  setsid nohup bash -c "while true; do echo \$(date +%s) \$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits); sleep 2; done" > $W/smi.log 2>&1 < /dev/null &
  common="--work $W --preset ${SD_PRESET:-sd15} ${SD_EXTRA:-} --rows 5 --steps 10 --set calib.samples_per_group=4"
  common="$common --set verify.e2e_samples=2 --set ptq.forward_chunk=8 --set ptq.act_batch=8"
  common="$common --stage-set quantize-w8a8:ptq.recon_store=cpu --verify-device ${SD_VERIFY_DEVICE:-cuda}"
  # chain 1, the W4A8 chain alone from gen to verify; chain 2 (W8A8, the 24 GiB knob recon_store=cpu) starts on the
  # same calibration set once chain 1 has calibrated, and shares the GPU with it
  setsid nohup python3 bench/sd_scale.py $common --json $W/sd15.json \
    --stages gen,calibrate,quantize-w4a8,export-w4a8,build-w4a8,verify-w4a8 > $W/chain.log 2>&1 < /dev/null &
  echo $! > $W/chain.pid
  setsid nohup bash -c "until grep -q '== calibrate: rc 0' $W/chain.log; do kill -0 $! || exit 1; sleep 2; done;
    python3 bench/sd_scale.py $common --json $W/sd15-w8a8.json --stages quantize-w8a8,export-w8a8,build-w8a8,verify-w8a8" \
    > $W/chain2.log 2>&1 < /dev/null &
  echo $! > $W/chain2.pid
fi
running() { kill -0 "$(cat $W/chain.pid)" 2>/dev/null || kill -0 "$(cat $W/chain2.pid)" 2>/dev/null; }
while running && [ $(( $(date +%s) - t0 )) -lt "$LIMIT" ]; do sleep 5; done
running && echo "chains still running" || echo "chains ended"
cp $W/sd15.json $W/sd15-w8a8.json $W/chain.log $W/chain2.log $W/smi.log $OUT/ 2>/dev/null
for f in $W/.gpu-*.json; do [ -f "$f" ] && echo "$(basename $f) $(cat $f)"; done > $OUT/gpu-peaks.txt
for l in chain chain2; do echo "-- $l"; grep -E "^== |error|Error" $W/$l.log | cut -c1-250 | tail -n 20; tail -n 3 $W/$l.log | cut -c1-250; done
awk '{ if ($2 > m) m = $2 } END { print "nvidia-smi max used MiB:", m }' $W/smi.log
