# Two entry points (see README): `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, where none is installed: a bare range would pull a CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/autolabel demo

test: $(STAMP)
	# bytecode for our own modules (pip compiled the rest), also where PYTHONDONTWRITEBYTECODE is
	# set: the suite starts hundreds of Python processes (CLI, flow runs), each ~0.4 s faster with it
	$(BIN)/python -m compileall -q autolabel models storage tasks flows >/dev/null
	$(BIN)/python -m pytest -m "not gpu" -q --durations=15 -n 2 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache demo-output
