# One-command set-up and checks. `make test` works on a fresh machine: it creates
# .venv, installs the CPU build of torch first (a plain `pip install torch` would pull
# a multi-GB CUDA build), then the package with its test extras, then runs pytest.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test bench-quality bench-cost clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench-quality: $(STAMP)
	$(PY) bench/run_quality.py --sets stackoverflow banking77 mnist_test --seeds 0 1 2 --scenario both --out bench/results/quality.json

bench-cost: $(STAMP)
	$(PY) bench/run_cost.py --out bench/results/cost.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
