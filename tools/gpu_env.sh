# Sourced by the tools/gpu_*.sh scripts on the device machine: installs the carried wheels (.whl/) into /tmp/site,
# sets the environment, and defines `left` (seconds until LIMIT, counted from sourcing).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/runtime/python PYTHONUNBUFFERED=1 QUEST_EXPORT_NO_PROGRESS=1
t0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - t0) )); }
