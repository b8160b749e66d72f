# warehouse-gdpr — on a fresh machine with python3 >= 3.10:
#   make demo   seed the demo CRM in an embedded PostgreSQL and run the retention sweep
#   make test   run the test suite (real PostgreSQL, real Airflow dag.test())
#   make lint   ruff (style, imports, bugs, complexity) and mypy (types); .ci/run runs it before the tests
#   make ui     (after make demo) Airflow's UI on the demo, with the GDPR page; make stop stops it
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The demo package (demo/warehouse_gdpr_demo) is not installed with the wheel: it is found here.
export PYTHONPATH := $(CURDIR)/demo$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: demo ui test lint stop lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m warehouse_gdpr_demo

# Airflow's api-server, scheduler, dag-processor and triggerer on the demo (SimpleAuthManager); prints the URL
# and the logins. `make stop` stops them.
ui: $(STAMP)
	$(PY) -m warehouse_gdpr_demo ui

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Settings in pyproject.toml ([tool.ruff], [tool.mypy]). Never `ruff format` the repository.
lint: $(STAMP)
	$(VENV)/bin/ruff check
	$(PY) -m mypy

# Benchmark against raw SQL at BENCH_CONTACTS contacts (default 1000000); see bench/README.md.
.PHONY: bench
bench: $(STAMP)
	$(PY) bench/run.py

# Regenerate docs/policy.schema.json (the policy file's JSON Schema, for editors and CI) after changing
# plugins/warehouse_gdpr/engine/policy.py; tests/test_docs.py fails while it is stale.
.PHONY: schema
schema: $(STAMP)
	$(VENV)/bin/warehouse-gdpr policy schema > docs/policy.schema.json

# Stop the demo's Airflow UI (make ui), downstream services and embedded PostgreSQL (data stays under .demo/pg).
stop: $(STAMP)
	$(PY) -m warehouse_gdpr_demo stop

# Refresh constraints.txt from a clean venv after changing dependencies in pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet ".[dev]"
	( echo "# Exact versions of every dependency, as installed and tested (pip freeze of a fresh .venv)."; \
	  echo "# Regenerate with \`make lock\` after changing pyproject.toml."; \
	  .lock-venv/bin/pip freeze --exclude warehouse-gdpr ) > constraints.txt
	rm -rf .lock-venv

clean:
	-$(MAKE) stop
	rm -rf .demo $(VENV)
