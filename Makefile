# The two commands of the README, on a fresh machine:
#   make demo   # creates .venv (~3 min, ~6 GB: torch + torchvision from PyPI), trains + evaluates the quickstart
#   make test   # the test suite (tiny models, CPU)
# Use another environment with e.g. `make demo VENV=/path/to/venv`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint

$(VENV)/.complete:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.complete

# a second `make demo` continues (or re-evaluates) the first run instead of refusing its output_dir
demo: install
	$(PY) run.py train --config configs/quickstart.yaml $$([ -d outputs/quickstart/checkpoints ] && echo --resume)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check hybrid_reid tests run.py
