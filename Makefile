# batchgen: `make demo` runs a demo batch on this machine; `make test` runs the tests.
# Both create .venv and install what they need on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= out/demo
FAMILY ?= mochi
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: PyPI's build (CUDA, which also runs on the CPU). Installing xfuser first would pull
	# another torch. No other index is used: the project's machines reach PyPI only.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP) ## create the virtual environment and install batchgen with dev extras

demo: $(STAMP) ## demo batch run: tiny model (FAMILY=mochi or wan), 6 prompts, local folder output (run twice to resume)
	$(BIN)/python -m tools.demo --out $(DEMO_OUT) --family $(FAMILY)

test: $(STAMP) ## run the test suite (the real control plane's tests are `make test-kube`)
	$(BIN)/python -m pytest -q --ignore=tests/realk8s $(PYTEST_ARGS)

test-fast: $(STAMP) ## the test suite without the slow end-to-end tests (marked slow)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check, ruff format --check and mypy (its settings: pyproject.toml [tool.mypy])
	$(BIN)/ruff check batchgen tests bench tools
	$(BIN)/ruff format --check batchgen tests bench tools
	$(BIN)/mypy batchgen

bench: $(STAMP) ## CPU benchmarks -> bench/results/
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/usp_cpu.py
	$(BIN)/python bench/quality_gate.py
	$(BIN)/python bench/gallery.py

device-wheels: $(STAMP) ## wheels a lent GPU machine lacks (it has no network) -> .device/wheels, for bench/gpu_device.sh
	$(BIN)/pip download -q --no-deps --only-binary=:all: -d .device/wheels \
		"diffusers==$$($(BIN)/python -c 'import diffusers; print(diffusers.__version__)')" importlib_metadata zipp

perf-tables: $(STAMP) ## regenerate README.md's performance tables from the files in bench/results/
	$(BIN)/python bench/perf_tables.py --write

jobs: $(STAMP) ## regenerate the example PyTorchJobs in jobs/ with `batchgen render`
	$(BIN)/python -m tools.k8s_examples --write jobs

chart-schema: $(STAMP) ## regenerate the chart's worker values schema from ParallelConfig (tools/chart_schema.py)
	$(BIN)/python -m tools.chart_schema --write

# A real control plane built from Go modules (tools/kube/; README "A real control plane"). Needs Go 1.26.
KUBE_DIR ?= $(HOME)/.cache/batchgen/kube-up

kube-bin: ## build etcd, kube-apiserver/-controller-manager/-scheduler, kubectl, helm, JobSet, Trainer, Kueue, training operator (cached)
	@$(PY) tools/kube/kubebin.py build

kube-up: $(STAMP) kube-bin ## start the local control plane (KUEUE=1 adds Kueue); prints export lines: eval "$$(make -s kube-up)"
	@$(BIN)/python tools/kube/controlplane.py up --dir $(KUBE_DIR) $(if $(KUEUE),--kueue)

kube-down: $(STAMP) ## stop what kube-up started (each process by its PID)
	@$(BIN)/python tools/kube/controlplane.py down --dir $(KUBE_DIR)

test-kube: $(STAMP) kube-bin ## the tests against the real control plane (tests/realk8s)
	BATCHGEN_KUBE_TESTS=required $(BIN)/python -m pytest -q tests/realk8s $(PYTEST_ARGS)

clean: ## remove outputs and caches (keeps .venv)
	rm -rf out .pytest_cache

.PHONY: help venv demo test test-fast lint bench device-wheels perf-tables jobs chart-schema clean kube-bin kube-up kube-down test-kube
