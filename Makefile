# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo demo-llm test lint docs clean

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned inside requirements.txt (its CPU wheel is on disk).
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedlora run configs/default.toml --out runs/demo

# The language-model default: SmolLM2-135M-Instruct on bbc-news-mc (docs/language-models.md).
demo-llm: install
	$(BIN)/fedlora run configs/llm.toml --out runs/demo-llm

# pytest-xdist workers, each with one torch thread (OMP_NUM_THREADS, also inherited by the runs
# the tests start); tests that compare runs bit for bit pin their thread count themselves. One
# worker more than there are cores: the Flower and torch.distributed tests spend much of their
# time waiting on their subprocesses (a Flower test uses about a third of its wall time in CPU),
# and the extra worker fills that idle time.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(len(os.sched_getaffinity(0)) + 1)")
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# The documentation site (mkdocs-material) into site/; --strict fails it on a broken link or anchor.
docs: install
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs report site .pytest_cache
