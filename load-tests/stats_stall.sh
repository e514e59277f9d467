#!/usr/bin/env bash
# Generation latency on one session while another session's first ROME edit computes its key
# statistics from an empty cache, against the same server idle. Writes the rows into
# BENCHMARKS.md (marker `stats-stall`). SECONDS_PER_RUN (default 30) sets the idle row's
# length; the loaded row lasts as long as the edit. PROFILE=dev uses the dev build.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECONDS_PER_RUN:-30}
PORT=${PORT:-18098}
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then
  cargo build --release --quiet --bin emend --example loadgen; BIN=target/release
else
  cargo build --quiet --bin emend --example loadgen; BIN=target/debug
fi
DATA=$(mktemp -d)
EMEND_STATS_DIR="$DATA/stats" ./$BIN/emend serve --bind 127.0.0.1:$PORT --state-dir "$DATA" > "$DATA/server.log" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:$PORT/readyz > /dev/null && break; sleep 0.2; done
session() { curl -sf -XPOST http://127.0.0.1:$PORT/v1/sessions -H 'content-type: application/json' -d "{\"name\":\"$1\"}" | python3 -c 'import sys,json; print(json.load(sys.stdin)["id"])'; }
GEN=$(session chat)
EDIT=$(session editor)
load() { ./$BIN/examples/loadgen --url http://127.0.0.1:$PORT --session "$GEN" --endpoint generate --concurrency 1 --max-tokens 8 --seconds "$1"; }
IDLE=$(load "$SECS")
# The edit runs in the background; the loaded row lasts until it answers.
T0=$(date +%s.%N)
curl -sf -XPOST http://127.0.0.1:$PORT/v1/sessions/$EDIT/edits -H 'content-type: application/json' \
  -d '{"method":"rome","edits":[{"dataset":"counterfact","id":0}]}' > "$DATA/edit.json" &
CURL=$!
ROWS=""
# Windows while the statistics compute: until layer 4's file is written.
while kill -0 $CURL 2>/dev/null && ! ls "$DATA"/stats/mom2-*-L4-* > /dev/null 2>&1; do
  ROWS+=$(load 2 | tail -n 1)$'\n'
done
wait $CURL
printf "%s" "$ROWS" >&2
T1=$(date +%s.%N)
EDIT_S=$(python3 -c "print(f'{$T1 - $T0:.1f}')")
STATS_S=$(python3 -c "
import json, glob, struct
f = open(glob.glob('$DATA/stats/mom2-*-L4-*.safetensors')[0], 'rb'); n = struct.unpack('<Q', f.read(8))[0]
print(f\"{json.loads(json.loads(f.read(n))['__metadata__']['provenance'])['seconds']:.1f}\")")
OUT=$(mktemp)
{
  echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores. Command: \`PROFILE=$PROFILE load-tests/stats_stall.sh\`: one client generating 8 tokens back to back on one session, idle for ${SECS} s, then while another session's first ROME edit (CounterFact record 0, layer 4, 1000 samples) computes its statistics from an empty cache. The edit took ${EDIT_S} s in all; its statistics pass ${STATS_S} s of engine time, in slices of one layer of one batch. Before slicing, one 8-token generate waited 44.0 s behind a first edit's statistics (layer 5)."
  echo
  echo "$IDLE" | head -n 2
  echo "$IDLE" | tail -n 1 | sed 's/^| generate |/| generate, idle |/'
  # The loaded rows, 2 s each. The last one saw the statistics stored and the edit itself
  # start (k*, v*, Δ are not sliced): it is left out.
  printf '%s' "$ROWS" | python3 -c "
import sys, statistics as st
rows = [l.split('|')[1:-1] for l in sys.stdin if l.startswith('| generate')][:-1]
col = lambda i: [float(r[i]) for r in rows]
med = lambda i: st.median(col(i))
print(f'| generate, during the statistics pass: median of {len(rows)} windows of 2 s | 1 | {med(2):.2f} | {med(3):.3f} | {med(4):.3f} | {med(5):.3f} | {med(6):.3f} | {med(7):.1f} | {int(sum(col(8)))} | {int(sum(col(9)))} |')
print(f'| generate, during the statistics pass: worst window | 1 | {min(col(2)):.2f} | {max(col(3)):.3f} | {max(col(4)):.3f} | {max(col(5)):.3f} | {max(col(6)):.3f} | {min(col(7)):.1f} | | |')
"
} > "$OUT"
python3 load-tests/put_section.py stats-stall "$OUT"
cat "$OUT"
