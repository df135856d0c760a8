# Every target CI or a newcomer needs. `make test` and `make demo` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_STAMP := $(VENV)/.demo-stamp
PYTEST_ARGS ?=

.PHONY: install lint format typecheck test test-unit test-integration test-acceptance demo bench capacity soak docs wheel clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,docs]'
	touch $(STAMP)

install: $(STAMP)

# The demo needs only the package and its bundled server, not the dev and docs tools.
$(DEMO_STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[server]'
	touch $(DEMO_STAMP)

LINTED := $(wildcard durable tests examples benchmarks docs/examples)

lint: install
	$(VENV)/bin/ruff check $(LINTED)

format: install
	$(VENV)/bin/ruff check --fix $(LINTED)
	$(VENV)/bin/ruff format $(LINTED)

typecheck: install
	$(VENV)/bin/mypy --strict durable

test: lint typecheck
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: install
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test-integration: install
	$(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)

test-acceptance: install
	$(VENV)/bin/pytest tests/acceptance $(PYTEST_ARGS)

demo: $(DEMO_STAMP)
	$(VENV)/bin/durable demo

# Benchmarks against the raw-commit baseline measured in the same run; QUICK=1 for < 1 min.
bench: install
	$(PY) -m benchmarks.run $(if $(QUICK),--quick,)

# The capacity model's figures: CPU per step of PostgreSQL and of the worker, with and
# without a streaming standby (needs the local PostgreSQL server binaries); QUICK=1.
capacity: install
	$(PY) -m benchmarks.capacity $(if $(QUICK),--quick,)

# The chaos soak: 2,000 runs, workers SIGKILLed, backends terminated, PostgreSQL restarted.
soak: install
	$(PY) -m tests.soak.chaos --runs 2000

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

wheel: install
	$(PY) -m build --wheel --outdir dist .

clean:
	rm -rf $(VENV) dist build .mypy_cache .pytest_cache .ruff_cache
