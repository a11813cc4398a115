#!/usr/bin/env bash
# One device call (issue 19): QuEST W8A8 on fmnist-cond, `fast` preset, once as one plain process and once under
# torch.distributed's launcher with NCCL (--nproc 1: the one GPU this machine has); wall times and whether the two
# artifacts are bit-identical, into $OUT/dist/.
set -u
LIMIT=${LIMIT:-540}
. tools/gpu_env.sh
R=$OUT/dist; mkdir -p $R
common="quantize --model fmnist-cond --method quest --bits w8a8 --preset ${PRESET:-fast} --device cuda --work /tmp/dw"
python3 -m cli.main --quiet calibrate --model fmnist-cond --preset ${PRESET:-fast} --device cuda --work /tmp/dw > $R/calib.log 2>&1
for v in plain nproc1; do
  extra=""; [ $v = nproc1 ] && extra="--nproc 1"
  s=$(date +%s%N)
  timeout $(( $(left) / 2 )) python3 -m cli.main --quiet $common --out /tmp/q-$v $extra > $R/$v.log 2>&1
  rc=$?
  echo "{\"run\": \"$v\", \"rc\": $rc, \"ms\": $(( ($(date +%s%N) - s) / 1000000 ))}" >> $R/times.jsonl
done
python3 - > $R/compare.json <<'PY'
import json
from safetensors.torch import load_file
a, b = load_file("/tmp/q-plain/quantized.safetensors"), load_file("/tmp/q-nproc1/quantized.safetensors")
diff = [k for k in a if not (a[k] == b[k]).all()]
print(json.dumps({"tensors": len(a), "differ": len(diff), "first": diff[:5],
                  "world_size": json.load(open("/tmp/q-nproc1/manifest.json"))["run"]["report"].get("world_size")}))
PY
cat $R/times.jsonl $R/compare.json; tail -n 3 $R/*.log
