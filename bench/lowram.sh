#!/bin/bash
# Issue 13 on the GPU machine, one call (root; wheels in .whl/ as bench/README.md says), 8 GB emulated card, 1024²,
# 20 steps. Side by side: the first build of the weight cache from a float8
# DiT file; read rates of the cache file (warm, dropped page cache); the file-backed engine inside a 10 GiB memory
# cgroup with a warm and with a dropped page cache (memory.stat anon/file polled every 0.2 s); the pinned engine
# (no memory limit); the first build from a bf16 DiT file. JSON to $OUT; `python -m bench.lowram_report $OUT` prints the table.
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*"; }
# in_cgroup NAME CMD...: run CMD in a fresh 10 GiB memory cgroup (swap 0); the largest anon / file / shmem /
# unevictable of its memory.stat (polled every 0.2 s), its memory.peak and oom kills go to $OUT/NAME.mem.json
in_cgroup() {
  local name=$1; shift; local G=/sys/fs/cgroup/db_$name
  mkdir -p $G; echo 10G > $G/memory.max; echo 0 > $G/memory.swap.max
  ( while true; do awk '$1~/^(anon|file|shmem|unevictable)$/{printf "%s %s ", $1, $2} END{print ""}' $G/memory.stat
      sleep 0.2; done > /tmp/$name.poll ) & local poller=$!
  ( echo $BASHPID > $G/cgroup.procs; exec "$@" ) 2>&1 | grep -E '^\{|Killed|Error|error|weight cache|packed' | tee $OUT/$name.log
  kill $poller; wait $poller 2>/dev/null
  awk -v n=$name -v peak=$(cat $G/memory.peak) -v oom=$(awk '$1=="oom_kill"{print $2}' $G/memory.events) \
    '{for(i=1;i<NF;i+=2) if($(i+1)>m[$i]) m[$i]=$(i+1)} END{printf "{\"run\": \"%s\", \"anon_max_gib\": %.3f, \"file_max_gib\": %.3f, \"shmem_max_gib\": %.3f, \"unevictable_max_gib\": %.3f, \"cgroup_peak_gib\": %.3f, \"oom_kill\": %d}\n", n, m["anon"]/2^30, m["file"]/2^30, m["shmem"]/2^30, m["unevictable"]/2^30, peak/2^30, oom}' \
    /tmp/$name.poll | tee $OUT/$name.mem.json
}
log weights; python3 -m bench.weights --models-dir /tmp/fs 2>&1 | tail -1
S="python3 -m bench.startup --models-dir /tmp/fs --budget 8 --pictures 1"
log build-float8; in_cgroup build_float8 timeout 100 python3 -m bench.cache_build --models-dir /tmp/fs \
  --cache-dir /tmp/wc --label float8 | tee $OUT/build_float8.json
ls -la /tmp/wc
log read-warm; python3 -m bench.read_rate /tmp/wc/dit.weights --label warm --gib 4 | tee $OUT/read_warm.json
sync; echo 3 > /proc/sys/vm/drop_caches
log read-cold; python3 -m bench.read_rate /tmp/wc/dit.weights --label cold --gib 4 | tee $OUT/read_cold.json
cat /tmp/wc/*.weights > /dev/null  # warm page cache for the next run
log file-warm-cgroup10; in_cgroup file_warm timeout 150 $S --host-ram-budget 4 --weight-cache-dir /tmp/wc \
  --out $OUT/file8_warm.json
sync; echo 3 > /proc/sys/vm/drop_caches
log file-cold-cgroup10; in_cgroup file_cold timeout 150 $S --host-ram-budget 4 --weight-cache-dir /tmp/wc \
  --out $OUT/file8_cold.json
log pinned; timeout 120 $S --host-ram-budget 64 --out $OUT/pinned8.json 2>&1 | grep '^{' | tee $OUT/pinned.log
log bf16-dit; rm -f /tmp/fs/MAILAND/majicflus_v1/majicflus_v134.safetensors
python3 -m bench.weights --models-dir /tmp/fs --parts dit --dit-dtype bf16 2>&1 | tail -1
sync; echo 3 > /proc/sys/vm/drop_caches
log build-bf16; in_cgroup build_bf16 timeout 100 python3 -m bench.cache_build --models-dir /tmp/fs \
  --cache-dir /tmp/wc --label bf16 | tee $OUT/build_bf16.json
log report; python3 -m bench.lowram_report $OUT --json $OUT/summary.json | tee $OUT/report.txt
