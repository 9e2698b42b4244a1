# The README's two commands: `make demo` (offline quick-start) and `make test`. wandb logs offline unless you have
# configured an API key (then it logs online).
# Both create or reuse the virtualenv at .venv and install the project into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[nlp,dev,heal]"
	touch $(STAMP)

# The offline quick-start: baseline vs Factorize vs FFF on the digits MLP, baseline vs FNet on the digits ViT.
# Its own output folder, runs/quickstart, is replaced on every run.
demo: $(STAMP)
	$(VENV)/bin/algos compare yamls/digits_mlp.yaml recipes/factorize.yaml recipes/fff.yaml \
		yamls/digits_vit.yaml recipes/fnet.yaml trainer.progress_bar=false --out runs/quickstart --overwrite

# --durations: the slowest tests, to keep the README's timings true; tests/conftest.py adds the tests whose `slow`
# marker disagrees with this run's durations.
test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q --durations=15 tests

# Quick local iterations: every test but those marked slow (`make test`, which CI runs, keeps them).
test-fast: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check algos tests
