# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch; on a GPU machine install your CUDA torch into the venv first
# and run with TORCH_SPEC= (empty) to keep it.
TORCH_SPEC ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: demo test lint venv clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q "$(TORCH_SPEC)")
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/adaptune run sweeps/demo.yaml --new

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache .pytest_cache mlflow.db runs
