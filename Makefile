# Set-up and the two commands of the README. Everything runs in a local virtual environment.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test test-fast test-oldest install quality

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir --upgrade pip
	# torch first, pinned: the wheels timm and torchvision need (see docs/installation.md)
	$(BIN)/pip install --quiet --no-cache-dir torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet --no-cache-dir -e ".[test]"
	touch $@

install: $(BIN)/.installed

# The main job on the embedded default, offline. Repeatable: each run replaces the previous demo's
# output in $(DEMO_DIR) (git-ignored), and prints where it went.
DEMO_DIR ?= demo_output/deelbo-digits
demo: $(BIN)/.installed
	$(BIN)/hf-deelbo train --output_dir $(DEMO_DIR) --overwrite_output_dir true

# The whole test suite, slow tests included.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations=10

# Lint and formatting (ruff, pinned in setup.cfg's test extra; the rules are pyproject.toml's).
QUALITY_PATHS = hf_deelbo benchmarks tests examples
quality: $(BIN)/.installed
	$(BIN)/ruff check $(QUALITY_PATHS)
	$(BIN)/ruff format --check $(QUALITY_PATHS)

# Without the slow tests.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not slow"

# The oldest releases setup.cfg declares (.ci/oldest.txt), in an environment of their own: the fast suite.
OLDEST_VENV ?= .venv-oldest
$(OLDEST_VENV)/bin/.installed: setup.cfg pyproject.toml .ci/oldest.txt
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --quiet --no-cache-dir --upgrade pip
	$(OLDEST_VENV)/bin/pip install --quiet --no-cache-dir -c .ci/oldest.txt -e ".[test]"
	touch $@

test-oldest: $(OLDEST_VENV)/bin/.installed
	$(OLDEST_VENV)/bin/python -m pytest -n 2 --dist worksteal -m "not slow"
