#!/usr/bin/env bash
# Drives the real lm-evaluation-harness (`local-completions`) against a running emend session,
# on a LAMBADA slice read from ../shared/data (no dataset download), and compares its accuracy
# with emend's own /loglikelihood on the same items.
#   PY=/path/to/python-with-lm-eval scripts/lm_eval_check.sh [LIMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LIMIT=${1:-20}
PORT=${PORT:-18098}
SHARED=${EMEND_SHARED_DIR:-$(cd .. && pwd)/shared}
cargo build --release --quiet --bin emend
DATA=$(mktemp -d)
./target/release/emend serve --bind 127.0.0.1:$PORT --state-dir "$DATA" > "$DATA/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:$PORT/readyz > /dev/null && break; sleep 0.2; done
SID=$(curl -sf -XPOST http://127.0.0.1:$PORT/v1/sessions -H 'content-type: application/json' -d '{"name":"lm-eval"}' \
  | "$PY" -c 'import sys,json; print(json.load(sys.stdin)["id"])')
TASKS=$(mktemp -d)
sed "s|@LAMBADA@|$SHARED/data/lambada/lambada_test.jsonl|" scripts/lm_eval_tasks/lambada_local.yaml > "$TASKS/lambada_local.yaml"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -m lm_eval --model local-completions \
  --model_args "model=session:$SID,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=remote,tokenized_requests=True,num_concurrent=1,max_retries=3" \
  --include_path "$TASKS" --tasks lambada_local --limit "$LIMIT" --output_path "$DATA/out" 2>&1 | tail -n 25
# The same items through emend's own route.
"$PY" - "$SHARED/data/lambada/lambada_test.jsonl" "$LIMIT" "http://127.0.0.1:$PORT/v1/sessions/$SID/loglikelihood" <<'PY'
import json, sys, urllib.request
path, limit, url = sys.argv[1], int(sys.argv[2]), sys.argv[3]
docs = [json.loads(l) for l in open(path)][:limit]
reqs = [{"context": d["text"].rsplit(" ", 1)[0], "continuation": " " + d["text"].rsplit(" ", 1)[1]} for d in docs]
body = json.dumps({"requests": reqs}).encode()
res = json.load(urllib.request.urlopen(urllib.request.Request(url, body, {"content-type": "application/json"})))["results"]
print(f"emend /loglikelihood on the same {limit} items: acc = {sum(r['is_greedy'] for r in res) / len(res):.4f}")
PY
