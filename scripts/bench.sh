#!/usr/bin/env bash
# Runtime benchmark: emend vs HF transformers on the default model, written into BENCHMARKS.md.
#   PY=/tmp/ref/bin/python scripts/bench.sh    (PY: a Python with scripts/requirements-reference.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
cargo build --release --quiet
MODEL=$(./target/release/emend fetch-model)
"$PY" scripts/bench_hf.py --gguf "$MODEL" > target/bench-peer.json
./target/release/emend bench --model "$MODEL" --peer target/bench-peer.json --write-md BENCHMARKS.md
