# Developer entry points.  `make test` is what CI runs (via .ci/run).
VENV := .venv
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: venv test lint demo bench clean

venv:
	bash scripts/setup-test-env.sh

test:
	bash scripts/run-tests.sh $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check proxy tests
	$(VENV)/bin/ruff format --check proxy tests
	$(VENV)/bin/mypy --strict proxy

demo: venv
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e .
	$(VENV)/bin/pos-proxy demo $(DEMO_ARGS)

# Proxy vs PgBouncer vs direct PostgreSQL; e.g. make bench BENCH_ARGS=--quick (see bench/README.md).
bench: venv
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
