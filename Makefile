# Two commands on a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
CONFIG ?= $(if $(wildcard config.toml),config.toml,)

.PHONY: run test install clean

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU-only machines: take the CPU torch first, then keep pip on it (see constraints.txt).
	# A machine that already has a CUDA torch in this venv keeps it.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/drawbot run $(if $(CONFIG),--config $(CONFIG),)

test: $(STAMP)
	$(PY) -m mypy
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
