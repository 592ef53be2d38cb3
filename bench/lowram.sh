#!/bin/bash
# Issue 13 on the GPU machine (root; wheels in .whl/ as bench/README.md says): 8 GB emulated card, 1024², 20 steps,
# the engine as `drawbot run` starts it (bench.startup, host_ram_budget_gb = "auto", which sees the cgroup's limit).
# Two parts, each under the device's 10-minute limit; files live under models/ (git-ignored, kept between calls):
#   bash bench/lowram.sh a   full-size files; first weight-cache build from a float8 DiT file (10 GiB cgroup);
#                            read rates of the cache (warm, dropped page cache); the file-backed engine in a 10 GiB
#                            cgroup with a warm, then a dropped page cache
#   bash bench/lowram.sh b   (a fresh machine) the files again; the pinned engine (no limit, every size); the
#                            file-backed engine at 8 GB in 10 GiB (warm, cold) and at 12 GB in an 8 GiB cgroup
#   bash bench/lowram.sh c   the first build from a bf16 DiT file (10 GiB cgroup); any machine
#   bash bench/lowram.sh f   (a fresh machine) the files; read rates mapped and O_DIRECT; the file-backed engine in
#                            10 GiB, warm page cache and empty compile cache, then dropped page cache; the first
#                            build from a bf16 DiT file if time is left (else `c` on the same files)
#   bash bench/lowram.sh g   (a fresh machine) the 12 GB card: the pinned engine, then the file-backed one in an
#                            8 GiB cgroup from a dropped, then a warm page cache
#   bash bench/lowram.sh i   (a fresh machine) the pinned engine at 12 GB (fills the compile cache); the 8 GB card's
#                            start-up from a dropped page cache; the 12 GB card in an 8 GiB cgroup from a dropped,
#                            then a warm page cache
#   bash bench/lowram.sh j   (a fresh machine) the weightless start-up: a tiny-model check on the GPU, then as i
#                            with one picture after the 8 GB card's cold start-up
#   bash bench/lowram.sh k   (a fresh machine) the 12 GB card cold, then its resident units read again and the
#                            picture drawn again (the same bytes?)
#   bash bench/lowram.sh e   (a fresh machine) the files again; every size twice on the pinned engine from an empty
#                            compile cache; the file-backed engine in 10 GiB from a dropped page cache
# Each cgroup run writes NAME.mem.json: the largest anon / file / shmem of its memory.stat (polled every 0.2 s,
# loading included), memory.peak and OOM kills. JSON to $OUT; `python -m bench.lowram_report $OUT` prints the table.
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH || exit 1
export PYTHONUNBUFFERED=1
FS=$PWD/models/fs; WC=$PWD/models/wc
log() { echo "== $(date +%T) $*"; }
# in_cgroup NAME GIB CMD...: CMD in a fresh memory cgroup of GIB GiB (swap 0); its memory.stat polled to
# $OUT/NAME.mem.json; a py-spy dump of the process 120 s in (where it is, if it stalls)
in_cgroup() {
  local name=$1 gib=$2; shift 2; local G=/sys/fs/cgroup/db_$name
  mkdir -p $G; echo ${gib}G > $G/memory.max; echo 0 > $G/memory.swap.max
  ( while true; do awk '$1~/^(anon|file|shmem|unevictable)$/{printf "%s %s ", $1, $2} END{print ""}' $G/memory.stat
      sleep 0.2; done > /tmp/$name.poll ) & local poller=$!
  ( sleep 120; for p in $(cat $G/cgroup.procs); do py-spy dump --pid $p 2>&1 | head -60; done > $OUT/$name.pyspy.txt ) &
  local spy=$!
  local t0=$(date +%s.%N)
  ( echo $BASHPID > $G/cgroup.procs; exec "$@" ) 2>&1 | grep -E '^\{|Killed|Error|error|weight cache|page cache|packed|stream plan|compiled|ready' | tee $OUT/$name.log
  local t1=$(date +%s.%N)
  kill $poller $spy 2>/dev/null; wait $poller 2>/dev/null
  awk -v n=$name -v s=$(awk -v a=$t0 -v b=$t1 "BEGIN{print b-a}") -v peak=$(cat $G/memory.peak) -v oom=$(awk '$1=="oom_kill"{print $2}' $G/memory.events) \
    '{for(i=1;i<NF;i+=2) if($(i+1)>m[$i]) m[$i]=$(i+1)} END{printf "{\"run\": \"%s\", \"wall_s\": %.1f, \"anon_max_gib\": %.3f, \"file_max_gib\": %.3f, \"shmem_max_gib\": %.3f, \"unevictable_max_gib\": %.3f, \"cgroup_peak_gib\": %.3f, \"oom_kill\": %d}\n", n, s, m["anon"]/2^30, m["file"]/2^30, m["shmem"]/2^30, m["unevictable"]/2^30, peak/2^30, oom}' \
    /tmp/$name.poll | tee $OUT/$name.mem.json
}
S="python3 -m bench.startup --models-dir $FS --budget 8"
nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader
build() {
  log weights; python3 -m bench.weights --models-dir $FS 2>&1 | tail -1
  log build-float8; in_cgroup build_float8 10 timeout 100 python3 -m bench.cache_build --models-dir $FS \
    --cache-dir $WC --label float8 | grep '^{' > $OUT/build_float8.json
}
build_bf16() {  # the first weight-cache build from a bf16 DiT file (bench.weights rewrites a DiT of another dtype)
  log bf16-dit; timeout 150 python3 -m bench.weights --models-dir $FS --dit-dtype bf16 2>&1 | tail -1
  sync; echo 3 > /proc/sys/vm/drop_caches
  log build-bf16; in_cgroup build_bf16 10 timeout 120 python3 -m bench.cache_build --models-dir $FS \
    --cache-dir $PWD/models/wc16 --label bf16 | grep '^{' > $OUT/build_bf16.json
}
S12="python3 -m bench.startup --models-dir $FS --budget 12"
direct_rates() {  # the weight cache's read rates: a warm page cache, then a dropped one with O_DIRECT
  cat $WC/dit.weights > /dev/null
  python3 -m bench.read_rate $WC/dit.weights --label warm --gib 4 | tee $OUT/read_warm.json
  sync; echo 3 > /proc/sys/vm/drop_caches
  python3 -m bench.read_rate $WC/dit.weights --label cold-direct --gib 4 --direct | tee $OUT/read_cold_direct.json
}
pinned12() {  # pinned12 TIMEOUT: the pinned engine at 12 GB, no memory limit, one picture
  log pinned12; timeout $1 $S12 --host-ram-budget 64 --pictures 1 --out $OUT/pinned12.json 2>&1 \
    | grep -E '^\{|compiled|ready' | cut -c1-300 | tee $OUT/pinned12.log
}
file12_runs() {  # file12_runs TIMEOUT [BEFORE]: the 12 GB card in an 8 GiB cgroup from a dropped page cache, then
  # from a warm one if the call is still under BEFORE seconds
  sync; echo 3 > /proc/sys/vm/drop_caches
  log file12-cold-cgroup8; in_cgroup file12_cold 8 timeout $1 $S12 --pictures 1 --weight-cache-dir $WC \
    --out $OUT/file12_cold.json
  [ $SECONDS -lt ${2:-100000} ] || { log "no time left for the warm 12 GB run"; return; }
  cat $WC/*.weights > /dev/null
  log file12-warm-cgroup8; in_cgroup file12_warm 8 timeout 120 $S12 --pictures 1 --weight-cache-dir $WC \
    --out $OUT/file12_warm.json
}
file_runs() {  # file_runs PICTURES: the file-backed engine at 8 GB in a 10 GiB cgroup, warm then dropped page cache
  cat $WC/*.weights > /dev/null  # a warm page cache (as after a previous run of the bot)
  log file-warm-cgroup10; in_cgroup file_warm 10 timeout 170 $S --pictures $1 --weight-cache-dir $WC \
    --out $OUT/file8_warm.json
  sync; echo 3 > /proc/sys/vm/drop_caches
  log file-cold-cgroup10; in_cgroup file_cold 10 timeout 200 $S --pictures $1 --weight-cache-dir $WC \
    --out $OUT/file8_cold.json
}
cold_starts() {  # cold_starts PICTURES TIMEOUT WARM12_BEFORE: the read rates; the pinned engine at 12 GB (fills the
  # compile cache); the 8 GB card from a dropped page cache in 10 GiB with PICTURES pictures; the 12 GB card in 8 GiB
  direct_rates
  pinned12 120
  sync; echo 3 > /proc/sys/vm/drop_caches
  log file-cold-cgroup10; in_cgroup file_cold 10 timeout $2 $S --pictures $1 --weight-cache-dir $WC \
    --out $OUT/file8_cold.json
  file12_runs 120 $3
}
if [ "$1" = a ]; then
  build
  log read-warm; cat $WC/dit.weights > /dev/null
  python3 -m bench.read_rate $WC/dit.weights --label warm --gib 4 | tee $OUT/read_warm.json
  sync; echo 3 > /proc/sys/vm/drop_caches
  log read-cold; python3 -m bench.read_rate $WC/dit.weights --label cold --gib 4 | tee $OUT/read_cold.json
  file_runs 2
elif [ "$1" = b ]; then  # on a fresh machine: the files again, then the pinned engine and both file-backed budgets
  build
  log pinned; timeout 150 $S --host-ram-budget 64 --out $OUT/pinned8.json 2>&1 | grep -E '^\{|compiled|ready' | tee $OUT/pinned.log
  file_runs 1
  cat $WC/*.weights > /dev/null
  log file12-warm-cgroup8; in_cgroup file12_warm 8 timeout 120 python3 -m bench.startup --models-dir $FS --budget 12 \
    --pictures 1 --weight-cache-dir $WC --out $OUT/file12_warm.json
elif [ "$1" = e ]; then  # a fresh machine: the files; every size twice on the pinned engine from an empty compile
  # cache (a first start); then the file-backed engine in 10 GiB from a dropped page cache, the compile cache now
  # warm (every later start: the unit keeps it in /var/cache/drawbot)
  export TORCHINDUCTOR_CACHE_DIR=$PWD/models/inductor TRITON_CACHE_DIR=$PWD/models/triton
  rm -rf $TORCHINDUCTOR_CACHE_DIR $TRITON_CACHE_DIR
  build
  cat $WC/dit.weights > /dev/null
  python3 -m bench.read_rate $WC/dit.weights --label warm --gib 4 | tee $OUT/read_warm.json
  sync; echo 3 > /proc/sys/vm/drop_caches
  python3 -m bench.read_rate $WC/dit.weights --label cold --gib 4 | tee $OUT/read_cold.json
  log pinned-sizes; TORCH_LOGS=recompiles timeout 270 $S --host-ram-budget 64 --pictures 14 --out $OUT/pinned8.json \
    2>&1 | grep -E '^\{|^\||compiled|ready|ecompil|start-up' | tee $OUT/pinned.log
  sync; echo 3 > /proc/sys/vm/drop_caches
  log file-cold-cgroup10; in_cgroup file_cold 10 timeout 200 $S --pictures 2 --weight-cache-dir $WC \
    --out $OUT/file8_cold.json
elif [ "$1" = f ]; then  # a fresh machine: the files; read rates (mapped and O_DIRECT); the file-backed engine in
  # 10 GiB, first from a warm page cache and an empty compile cache (a first start), then from a dropped page cache
  # with the compile cache warm (every later start: the unit keeps it in /var/cache/drawbot), disk units read with
  # O_DIRECT; then, if time is left, the first build from a bf16 DiT file
  export TORCHINDUCTOR_CACHE_DIR=$PWD/models/inductor TRITON_CACHE_DIR=$PWD/models/triton
  build
  cat $WC/dit.weights > /dev/null
  python3 -m bench.read_rate $WC/dit.weights --label warm --gib 4 | tee $OUT/read_warm.json
  sync; echo 3 > /proc/sys/vm/drop_caches
  python3 -m bench.read_rate $WC/dit.weights --label cold --gib 4 | tee $OUT/read_cold.json
  sync; echo 3 > /proc/sys/vm/drop_caches
  python3 -m bench.read_rate $WC/dit.weights --label cold-direct --gib 4 --direct | tee $OUT/read_cold_direct.json
  cat $WC/*.weights > /dev/null
  log file-warm-cgroup10; in_cgroup file_warm 10 timeout 170 $S --pictures 1 --weight-cache-dir $WC \
    --out $OUT/file8_warm.json
  sync; echo 3 > /proc/sys/vm/drop_caches
  log file-cold-cgroup10; in_cgroup file_cold 10 timeout 170 $S --pictures ${PICTURES:-1} --weight-cache-dir $WC \
    --out $OUT/file8_cold.json
  [ $SECONDS -lt ${BF16_BEFORE:-400} ] || { log "no time left for the bf16 build"; exit 0; }
  build_bf16
elif [ "$1" = g ]; then  # a fresh machine: the 12 GB card (8 GiB cgroup) beside the pinned engine at 12 GB, the
  # file-backed one from a dropped page cache, then warm (compile cache warm from the pinned run for both)
  build
  direct_rates
  pinned12 150
  file12_runs 150
elif [ "$1" = i ]; then  # a fresh machine: the pinned engine at 12 GB (a first start: fills the compile cache);
  # the 8 GB card's start-up from a dropped page cache; the 12 GB card in an 8 GiB cgroup from a dropped, then (time
  # allowing) a warm page cache. (Runs 7 and 8 also ran a start-up read-ahead with and without: bench/README.md.)
  export TORCHINDUCTOR_CACHE_DIR=$PWD/models/inductor TRITON_CACHE_DIR=$PWD/models/triton
  build
  cold_starts 0 100 ${WARM12_BEFORE:-440}
elif [ "$1" = j ]; then  # a fresh machine: the weightless start-up (engine.streaming.enable_streaming) checked on
  # the GPU with the tiny model first (the same picture pinned and file-backed, else stop); then the pinned engine
  # at 12 GB (a first start: fills the compile cache); the 8 GB card from a dropped page cache in 10 GiB with one
  # picture; the 12 GB card in 8 GiB from a dropped, then (time allowing) a warm page cache
  export TORCHINDUCTOR_CACHE_DIR=$PWD/models/inductor TRITON_CACHE_DIR=$PWD/models/triton
  T="python3 -m bench.startup --tiny --device cuda --compile eager --pictures 2"
  log tiny-gpu; timeout 90 $T --host-ram-budget 64 --out $OUT/tiny_pinned.json 2>&1 | grep -E '^\{"event": "picture|Error|ready' | cut -c1-400
  timeout 90 $T --host-ram-budget 0.3 --weight-cache-dir /tmp/wc_tiny --out $OUT/tiny_file.json 2>&1 | grep -E '^\{"event": "picture|Error|ready|read' | cut -c1-400
  a=$(grep -o '"png_md5": "[0-9a-f]*"' $OUT/tiny_pinned.json | sort | md5sum); b=$(grep -o '"png_md5": "[0-9a-f]*"' $OUT/tiny_file.json | sort | md5sum)
  [ -n "$(grep -o png_md5 $OUT/tiny_file.json)" ] && [ "$a" = "$b" ] || { log "tiny GPU check failed: pictures differ or missing"; exit 1; }
  build
  cold_starts 1 150 ${WARM12_BEFORE:-470}
elif [ "$1" = k ]; then  # a fresh machine: the 12 GB card's file-backed engine from a dropped page cache in 8 GiB
  # (compile cache empty: a first start), one picture, then its resident units read again synchronously and the
  # picture drawn again: the same bytes say the start-up's background fill put the right weights on the GPU
  export TORCHINDUCTOR_CACHE_DIR=$PWD/models/inductor TRITON_CACHE_DIR=$PWD/models/triton
  build
  sync; echo 3 > /proc/sys/vm/drop_caches
  log file12-cold-cgroup8; in_cgroup file12_cold 8 timeout 170 $S12 --pictures 1 --refill-check --weight-cache-dir $WC \
    --out $OUT/file12_cold.json
  python3 -c "import json, sys; [print(f.split('/')[-1], e['event'], e.get('size'), e['png_md5'], e.get('same', '')) for f in sys.argv[1:] for e in json.load(open(f)) if 'png_md5' in e]" \
    $OUT/file12_cold.json
elif [ "$1" = d ]; then  # on a fresh machine: the files again, the file-backed engine from a dropped page cache
  build
  sync; echo 3 > /proc/sys/vm/drop_caches
  log file-cold-cgroup10; in_cgroup file_cold 10 timeout 200 $S --pictures 2 --weight-cache-dir $WC \
    --out $OUT/file8_cold.json
else  # c: the first build from a bf16 DiT file (the other files written too on a fresh machine)
  build_bf16
fi
log end
