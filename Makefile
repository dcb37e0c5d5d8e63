# OOS: `make run` runs the daemon in the foreground with ./data; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv run test lint bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: venv
	OOS_DATA_DIR=$${OOS_DATA_DIR:-$(CURDIR)/data} $(PY) oos_service_manager.py

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) scripts/bench_queue.py
	$(PY) scripts/bench_daemon.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
