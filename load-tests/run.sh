#!/usr/bin/env bash
# Starts the server on the default model (release build, loopback), drives generate and
# loglikelihood at concurrency 1, 8 and 32, then an overload run with a 4-slot queue, and writes
# the tables into BENCHMARKS.md. SECONDS_PER_RUN (default 20) sets each run's length.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECONDS_PER_RUN:-20}
PORT=${PORT:-18099}
cargo build --release --quiet --bin emend --example loadgen
DATA=$(mktemp -d)
start() {
  ./target/release/emend serve --bind 127.0.0.1:$PORT --state-dir "$DATA" "$@" > "$DATA/server.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 300); do curl -sf http://127.0.0.1:$PORT/readyz > /dev/null && return; sleep 0.2; done
  echo "server did not start"; cat "$DATA/server.log"; exit 1
}
stop() { kill -TERM $PID; wait $PID || true; }
session() { curl -sf -XPOST http://127.0.0.1:$PORT/v1/sessions -H 'content-type: application/json' -d '{"name":"load"}' | python3 -c 'import sys,json; print(json.load(sys.stdin)["id"])'; }
OUT=$(mktemp)
start
SID=$(session)
{
  echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores. Command: \`load-tests/run.sh\` (${SECS} s per row, default model, f32 CPU, max_tokens 32, greedy)."
  echo
  ./target/release/examples/loadgen --url http://127.0.0.1:$PORT --session "$SID" --endpoint generate --concurrency 1,8,32 --seconds "$SECS"
  ./target/release/examples/loadgen --url http://127.0.0.1:$PORT --session "$SID" --endpoint loglikelihood --concurrency 1,8,32 --seconds "$SECS" | tail -n +3
} >> "$OUT"
stop
EMEND_QUEUE_INTERACTIVE=4 start
SID=$(session)
{
  echo
  echo "Overload: the same server with \`queue_interactive = 4\`, 32 clients; excess requests get 429 + Retry-After, never a timeout:"
  echo
  ./target/release/examples/loadgen --url http://127.0.0.1:$PORT --session "$SID" --endpoint generate --concurrency 32 --seconds "$SECS"
} >> "$OUT"
stop
python3 load-tests/put_section.py load-bench "$OUT"
cat "$OUT"
