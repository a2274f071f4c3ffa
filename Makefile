# Every target sets itself up: a fresh clone needs only Python 3.11, make and the package index.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-scale lint reliability clean screenshots docs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tidings demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# How cost grows with the log, 10^5 to 10^7 events (benchmarks/scale.py); never part of `bench`.
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/run.py --scale

screenshots: $(STAMP)
	TIDINGS_SCREENSHOTS=1 $(BIN)/python -m pytest tests/console/test_browser.py

# The reliability suite at full scale (about 30 minutes), then its report. The same
# scenarios run small in `make test`.
reliability: $(STAMP)
	rm -f .reliability.jsonl; started=$$(date +%s); \
	TIDINGS_RELIABILITY=long TIDINGS_RELIABILITY_RESULTS=$(CURDIR)/.reliability.jsonl \
	TIDINGS_REQUIRE_SERVICES=1 $(BIN)/python -m pytest tests/reliability -m reliability \
		-o timeout=1800 -p no:cacheprovider; status=$$?; \
	$(BIN)/python -m tests.reliability.report .reliability.jsonl reliability-report.md \
		$$(( $$(date +%s) - started )); exit $$status

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .hypothesis
