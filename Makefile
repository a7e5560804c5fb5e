# Two entry points (see README): `make train` runs the main job, `make test` runs the tests.
# Both create the virtual environment .venv on first use.

VENV ?= .venv
PY := $(VENV)/bin/python
SLURM_DIR ?= /tmp/mds-slurm

.PHONY: train test lint cluster-up cluster-down

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch (on a GPU machine, install your CUDA build of torch first instead).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,mpi]"
	touch $@

# The main job: pre-train the `tiny` preset on 2 local CPU processes, on the Python standard library
# tokenized into shards on first use. Running it again resumes from its checkpoint.
train: $(VENV)/.installed
	$(VENV)/bin/mds train

# The tests, with a one-node Slurm cluster on localhost for the Slurm tests (started if we can).
test: $(VENV)/.installed
	@bash slurm/localcluster.sh up || echo "no local Slurm cluster: Slurm tests will skip"
	@set -e; if [ -f $(SLURM_DIR)/env.sh ]; then . $(SLURM_DIR)/env.sh; fi; \
		PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/ruff check . && \
		PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/ruff format --check . && \
		PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

cluster-up:
	bash slurm/localcluster.sh up
cluster-down:
	bash slurm/localcluster.sh down
