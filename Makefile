# One-command set-up and checks. `make test` works on a fresh machine: it creates
# .venv, installs the CPU build of torch first (a plain `pip install torch` would pull
# a multi-GB CUDA build), then the package with its test extras, then runs pytest.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test quickstart demo bench-quality bench-cost clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# One seed of the stream protocol on a real
# set, StreamDEC beside frozen k-means and MiniBatchKMeans, both scenarios (~1 minute).
quickstart: $(STAMP)
	$(PY) bench/run_quality.py --sets stackoverflow --seeds 0 --scenario both \
		--methods frozen_kmeans mbk_all oracle_2proto stream_dec --out bench/results/tmp/quickstart.json

# The main job on an embedded Kafka broker: train on the known intents of the shipped
# Banking77 sample, stream the rest through the service, print the report (~30 s).
demo: $(STAMP)
	$(PY) -m stream_dec.cli demo

bench-quality: $(STAMP)
	$(PY) bench/run_quality.py --sets stackoverflow banking77 mnist_test --seeds 0 1 2 --scenario both \
		--methods frozen_kmeans mbk_base mbk_all refit_kmeans oracle_2proto stream_dec \
		--variant 'dec_rule:centre_rule="dec",ewc_lambda=1.0' --out bench/results/quality.json

bench-cost: $(STAMP)
	$(PY) bench/run_cost.py --out bench/results/cost.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
