# `make test` and `make demo` work on a fresh machine: they create .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,examples]'
	touch $(STAMP)

# Lint, type-check the package (this checkout's, whatever mabn_jax the venv has
# installed), then every test (slow and multi-process ones included) on two workers.
test: $(STAMP)
	$(PY) -m ruff check .
	MYPYPATH=$(CURDIR) $(PY) -m mypy -p mabn_jax
	$(PY) -m pytest -q -n 2 --dist loadfile

# Speed/memory ratios vs nn.BatchNorm (CPU: ~5 min). BENCH_ARGS=--full for more rounds.
bench: $(STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

demo: $(STAMP)
	$(PY) examples/small_batch.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
