# `make test` and `make demo` work on a fresh machine: they create .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: test docs wheel-check demo bench aot aot-install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,examples]'
	touch $(STAMP)

# Sphinx, MyST and build (the docs and build extras).
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs,build]'
	touch $(DOCS_STAMP)

# Lint, check formatting (ruff format; run `ruff format .` to fix), type-check the package (this checkout's, whatever mabn_jax the venv has
# installed), then every test (slow and multi-process ones included) on two workers.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	MYPYPATH=$(CURDIR) $(PY) -m mypy -p mabn_jax
	$(PY) -m pytest -q -n 2 --dist loadfile

# API reference + docs/*.md pages into docs/_build/html; any warning (nitpicky: any
# unresolved reference to a mabn_jax name) fails.
docs: $(DOCS_STAMP)
	$(PY) -m sphinx -n -W --keep-going -q -b html docs docs/_build/html

# Build sdist and wheel, install the wheel in a fresh venv, run a train step from it.
wheel-check: $(DOCS_STAMP)
	PY=$(PY) bash .ci/check_wheel

# Speed/memory ratios vs nn.BatchNorm (CPU: ~5 min). BENCH_ARGS=--full for more rounds.
bench: $(STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

AOT_STAMP := $(VENV)/.installed-aot
$(AOT_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[aot]'
	touch $(AOT_STAMP)

# The TPU compiler alone (tests/test_aot.py uses it; they skip, saying why, without it).
aot-install: $(AOT_STAMP)

# What the TPU compiler makes of the layers, of a ResNet-50 pod train step (with its
# weight centralization computed in each place it can be) and of folded inference,
# deviceless (no TPU needed). AOT_ARGS=--quick: two layer shapes
# and the ResNet-50 step on 16 v5e chips only. RESNET_ARGS goes to aot_resnet.py
# alone (e.g. RESNET_ARGS='--gens v5e --chips 256 --modes spmd').
aot: $(AOT_STAMP)
	JAX_PLATFORMS=cpu $(PY) benchmarks/aot.py $(AOT_ARGS)
	JAX_PLATFORMS=cpu $(PY) benchmarks/aot_resnet.py $(AOT_ARGS) $(RESNET_ARGS)
	JAX_PLATFORMS=cpu $(PY) benchmarks/aot_centering.py
	JAX_PLATFORMS=cpu $(PY) benchmarks/aot_pallas.py

demo: $(STAMP)
	$(PY) examples/small_batch.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist docs/_build *.egg-info
