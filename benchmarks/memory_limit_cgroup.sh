#!/usr/bin/env bash
# Issue 24, must-show 4: memllm inside a memory-limited cgroup (as a container would run it) refuses
# with a clear error naming the limit, never the kernel's kill.
#   sudo-less root in a container with a writable cgroup v1 memory controller (or cgroup v2):
#   bash benchmarks/memory_limit_cgroup.sh [LIMIT_GIB] [CHAT_LIMIT_GIB] > benchmarks/results/memory_limit_cgroup.txt
# Runs, each in a fresh cgroup with memory.limit = LIMIT_GIB (default 4; the chat: CHAT_LIMIT_GIB,
# default 1.5, so that a CPU reaches it in minutes, not hours):
#   1. memllm ask BIG.txt -q ... --mode kv     (BIG.txt: 200 MB of Paul Graham essays, repeated)
#   2. memllm ask BIG.txt -q ... --mode text
#   3. memllm chat --user U --memory kv        (piped 20,000-character lines until it stops)
# and prints the exit code, the last stderr line, the wall time and the cgroup's peak memory.
set -euo pipefail
LIMIT_GIB=${1:-4}
CHAT_LIMIT_GIB=${2:-1.5}
PY=${PY:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$PY - "$work/big.txt" <<'PYEOF'
import json, sys
from memllm.bench import qa_data
text = json.load(open(qa_data.data_dir() / "PaulGrahamEssays.json"))["text"]
with open(sys.argv[1], "w") as fh:
    n = 0
    while n < 200_000_000:
        fh.write(text); n += len(text)
PYEOF
echo "document: $(du -m "$work/big.txt" | cut -f1) MB; limit ${LIMIT_GIB} GiB; $(uname -r)"
if [ -d /sys/fs/cgroup/memory ]; then v=1; base=/sys/fs/cgroup/memory; else v=2; base=/sys/fs/cgroup; fi
run() {  # name, limit in GiB, command...
  local name=$1 gib=$2; shift 2
  local bytes=$(echo "$gib * 1073741824 / 1" | bc)
  local cg=$base/memllm-limit-$$-$name
  mkdir "$cg"
  if [ $v = 1 ]; then echo $bytes > "$cg/memory.limit_in_bytes"; else echo $bytes > "$cg/memory.max"; fi
  local t0=$(date +%s.%N) rc=0
  bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$cg" "$@" > "$work/out" 2> "$work/err" || rc=$?
  local t1=$(date +%s.%N)
  local peak
  if [ $v = 1 ]; then peak=$(cat "$cg/memory.max_usage_in_bytes"); else peak=$(cat "$cg/memory.peak" 2>/dev/null || echo 0); fi
  local oom=$(grep -E '^(oom_kill|oom_kill_disable|under_oom) ' "$cg/memory.oom_control" 2>/dev/null | tr '\n' ' ' || true)
  printf '%-10s limit %4s GiB  exit %3d  %6.1f s  peak %5.2f GiB  %s\n' "$name" "$gib" "$rc" "$(echo "$t1 - $t0" | bc)" \
    "$(echo "scale=2; $peak / 1073741824" | bc)" "$oom"
  echo "    stderr (last line): $(grep -v '^\s*$' "$work/err" | tail -1)"
  rmdir "$cg" 2>/dev/null || true
}
run ask-kv $LIMIT_GIB $PY -m memllm.cli.app ask "$work/big.txt" -q "What did the author work on?" --mode kv
run ask-text $LIMIT_GIB $PY -m memllm.cli.app ask "$work/big.txt" -q "What did the author work on?" --mode text
line=$($PY -c "print(('The meeting notes say the budget was approved. ' * 500)[:20000])")
run chat-kv $CHAT_LIMIT_GIB bash -c "for i in \$(seq 1 400); do echo 'Turn '\$i': $line'; done | $PY -m memllm.cli.app chat --user U --store $work/store --memory kv --max-new-tokens 4 --json > $work/chat.jsonl"
echo "    chat answers before the refusal: $(wc -l < "$work/chat.jsonl")"
