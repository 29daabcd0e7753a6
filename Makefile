# One-command set-up and checks. `make test` works on a fresh machine: it creates
# .venv, installs the CPU build of torch first (a plain `pip install torch` would pull
# a multi-GB CUDA build), then the package with its test extras, then runs pytest.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test quickstart demo bench-quality bench-hierarchy bench-cost clean

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

# The id hierarchy's table (README "Quality"): the coarse sets with the drift scenario,
# the full text sets class-incremental and drift in separate runs, merged into one file.
HIER = --seeds 0 1 2 --threads 1 --param max_update_ms=60000 --variant norefine:refine_share=0.0,refine_budget=0.0
bench-hierarchy: $(STAMP)
	$(PY) bench/run_quality.py $(HIER) --scenario both --out bench/results/tmp/h-coarse.json \
		--sets stackoverflow-c4 stackoverflow-c8 stackoverflow-c8s1 stackoverflow-c8s2 banking77-c4 banking77-c8 banking77-c8s1 banking77-c8s2 mnist_test \
		--methods frozen_kmeans mbk_base mbk_all refit_kmeans oracle_2proto stream_dec
	$(PY) bench/run_quality.py $(HIER) --scenario class_incremental --sets stackoverflow \
		--methods frozen_kmeans mbk_all refit_kmeans stream_dec --out bench/results/tmp/h-so.json
	$(PY) bench/run_quality.py $(HIER) --scenario class_incremental --sets banking77 \
		--methods frozen_kmeans mbk_all refit_kmeans stream_dec --out bench/results/tmp/h-b77.json
	$(PY) bench/run_quality.py $(HIER) --scenario gradual_drift --sets stackoverflow banking77 \
		--methods frozen_kmeans mbk_base oracle_2proto stream_dec --out bench/results/tmp/h-drift.json
	$(PY) bench/merge_quality.py bench/results/tmp/h-coarse.json bench/results/tmp/h-so.json bench/results/tmp/h-b77.json \
		bench/results/tmp/h-drift.json --out bench/results/quality_hierarchy.json

bench-cost: $(STAMP)
	$(PY) bench/run_cost.py --out bench/results/cost.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
