# distft: `make train` runs the default job, `make test` the whole suite; both install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install system-deps train test test-all test-quick lint bench docs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,docs]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/distft-launch $(ARGS)

# What the tests need beyond Python: a real single-node SLURM cluster (slurm-wlm + munge,
# started here; fails loudly if it cannot start) and headless Chromium for the report-page check.
system-deps:
	bash slurm/local_cluster.sh
	command -v chromium >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check distft launch tests bench
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not extended" $(PYTEST_ARGS)

# Everything, including the extended tier (tests marked `extended`: long runs kept out of CI).
test-all: $(STAMP) system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(PY) -m pytest -q -m quick $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check distft launch tests bench
	$(VENV)/bin/ruff format --check distft launch tests bench
	$(VENV)/bin/lint-imports

# distft vs TRL's SFTTrainer on the same work (full, LoRA, QLoRA; alternating, repeated); the other
# benchmarks and their results: bench/RESULTS.md. ARGS are passed on, e.g. ARGS="--repeats 5".
bench: $(STAMP)
	$(PY) bench/trl_compare.py $(ARGS)

# The documentation site (docs/, mkdocs.yml) into site/; warnings are errors.
docs: $(STAMP)
	$(PY) -m distft.docs_ref --check
	$(VENV)/bin/mkdocs build --strict --site-dir site
