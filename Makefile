# The two commands of the quick start: `make run` and `make test`. Both create .venv when missing,
# install what requirements*.txt pin, and are safe to run again.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/datacollector
PYTEST_ARGS ?=

.PHONY: install run web scheduler test lint format bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# Web (127.0.0.1:8000: uvicorn serving the ASGI app, pages, API and the live hub /ws) and one scheduler,
# on the embedded defaults: SQLite under var/, the embedded candle store, live updates through the
# database, and the offline `simulated` exchange. Ctrl-C stops both.
run: install
	@export DEBUG=$${DEBUG:-1}; \
	$(PY) manage.py migrate --noinput && \
	$(PY) manage.py ensure_superuser && \
	$(PY) manage.py seed_demo && \
	$(PY) manage.py collectstatic --noinput --verbosity 0 && \
	trap 'kill 0' INT TERM EXIT; \
	$(PY) manage.py run_scheduler & \
	$(PY) -m uvicorn datacollector.asgi:application --host $(HOST) --port $(PORT) --ws websockets-sansio \
		--ws-per-message-deflate false

# Ruff, then the whole pytest suite against PostgreSQL (DATABASE_URL, default the local server).
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	DATABASE_URL=$${DATABASE_URL:-$(TEST_DATABASE_URL)} SECRET_KEY=$${SECRET_KEY:-test-only-secret-key} \
		$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Benchmarks print figures; they assert nothing. Needs the local PostgreSQL.
bench: install
	DATABASE_URL=$${DATABASE_URL:-$(TEST_DATABASE_URL)} SECRET_KEY=$${SECRET_KEY:-bench-only-secret-key} \
		$(PY) -m benchmarks

clean:
	rm -rf $(VENV) var/*.sqlite3 .pytest_cache .ruff_cache
