# The README's two commands: `make demo` (offline quick-start) and `make test`.
# Both create or reuse the virtualenv at .venv and install the project into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[nlp,dev]"
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline $(VENV)/bin/algos demo

test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check algos tests
