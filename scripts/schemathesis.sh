#!/usr/bin/env bash
# Property-based API test: Schemathesis generates requests from openapi/openapi.json against a
# live server (loopback, a bounded number of examples per operation) and checks that nothing
# answers 5xx and every response matches the spec (status, content type, schema, headers).
# `positive_data_acceptance` is off: some limits are configuration (max_tokens, batch sizes,
# context length) and some rules span fields (`prompt` xor `messages`), so a schema-valid body
# can rightly get a documented 422. Applying edits is left out: a schema-valid edit is real
# work (ROME/MEMIT compute key statistics first, minutes on this CPU); tests/edits_http.rs and
# tests/editing.rs cover that route. `use_after_free` is off: DELETE on a job (evaluation, sweep,
# training) cancels it, and the job stays readable as `cancelled` with what it finished, so a GET
# after the DELETE rightly answers 200.
#   scripts/schemathesis.sh [path/to/emend]   (needs `pip install schemathesis`)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/emend}
shift || true
PORT=${PORT:-18097}
EXAMPLES=${EXAMPLES:-25}
DATA=$(mktemp -d)
KEY=schemathesis-key
HASH=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
# Small generation limits keep random requests fast; the limits themselves are exercised.
EMEND_API_KEYS="st:$HASH" EMEND_MAX_NEW_TOKENS=8 EMEND_MAX_BATCH_ITEMS=4 EMEND_MAX_BODY_BYTES=65536 \
  "$BIN" serve --bind 127.0.0.1:$PORT --state-dir "$DATA" > "$DATA/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:$PORT/readyz > /dev/null && break; sleep 0.2; done
curl -sf http://127.0.0.1:$PORT/readyz > /dev/null || { cat "$DATA/server.log"; exit 1; }
# One real session so that path parameters can hit something.
SID=$(curl -sf -XPOST http://127.0.0.1:$PORT/v1/sessions -H "authorization: Bearer $KEY" -H 'content-type: application/json' -d '{}' \
  | python3 -c 'import sys,json; print(json.load(sys.stdin)["id"])')
schemathesis run openapi/openapi.json \
  --url "http://127.0.0.1:$PORT" \
  --header "Authorization: Bearer $KEY" \
  --checks all \
  --exclude-checks positive_data_acceptance,use_after_free \
  --max-examples "$EXAMPLES" \
  --exclude-path /metrics --exclude-path '/v1/sessions/{id}/edits' --max-time ${MAX_TIME:-150} --seed 1 \
  --generation-deterministic \
  --request-timeout 60 \
  "$@"
