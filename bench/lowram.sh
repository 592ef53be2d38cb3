#!/bin/bash
# Issue 13 on the GPU machine, one call (root; wheels in .whl/ as bench/README.md says). Writes JSON to $OUT:
# the pinned engine, the file-backed engine building its weight cache, read rates of the cache file (warm page cache,
# dropped page cache), and the file-backed engine after dropping the page cache inside a 10 GiB memory cgroup.
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*"; }
log weights; python3 -m bench.weights --models-dir /tmp/fs 2>&1 | tail -2
S="timeout 200 python3 -m bench.startup --models-dir /tmp/fs --budget 8"
log pinned; $S --host-ram-budget 64 --pictures 2 --out $OUT/pinned8.json 2>&1 | grep '^{'
log file-build; $S --host-ram-budget 4 --weight-cache-dir /tmp/wc --pictures 2 \
  --out $OUT/file8.json 2>&1 | grep -E "^\{|weight cache"
ls -la /tmp/wc
log read-warm; python3 -m bench.read_rate /tmp/wc/dit.weights --label warm | tee $OUT/read_warm.json
sync; echo 3 > /proc/sys/vm/drop_caches
log read-cold; python3 -m bench.read_rate /tmp/wc/dit.weights --label cold | tee $OUT/read_cold.json
sync; echo 3 > /proc/sys/vm/drop_caches
log cgroup-10G-cold
G=/sys/fs/cgroup/db; mkdir -p $G; echo 10G > $G/memory.max; echo 0 > $G/memory.swap.max
( echo $BASHPID > $G/cgroup.procs; exec $S --host-ram-budget 4 --weight-cache-dir /tmp/wc --pictures 2 \
  --out $OUT/file8_cgroup10.json ) 2>&1 | grep -E '^\{|Killed|weight cache|Error'
log cgroup: peak $(cat $G/memory.peak) events $(tr '\n' ' ' < $G/memory.events)
grep -E '^(anon|file|shmem|unevictable) ' $G/memory.stat
