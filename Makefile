# Two commands a new user needs: `make run` (dashboard on the sample data) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.adlab-installed
PORT   ?= 8501

.PHONY: run test lint bench clean-cache

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,ray]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/adlab dashboard --port $(PORT)

test: $(STAMP)
	@bash scripts/ensure_chromium.sh || true
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check engine dashboard pages tests benchmarks scripts

bench: $(STAMP)
	$(PY) benchmarks/bench_memory_bank.py

clean-cache:
	rm -rf $${ADLAB_CACHE:-$$HOME/.cache/adlab}
