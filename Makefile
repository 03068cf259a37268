# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both install the exact
# versions of requirements.lock; `make lock` re-resolves it (see its header).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.9
# The CPU build of the locked torch (where the machine's pip finds one); on a GPU machine install
# your CUDA torch into the venv first and run with TORCH_SPEC= (empty) to keep it.
TORCH_SPEC ?= torch==$(shell $(PYTHON) tools/lockfile.py pin torch)
# make lock UPGRADE="transformers peft" moves those pins to the newest allowed release; UPGRADE=all every pin.
UPGRADE ?=
# The drift job: the lock, but the newest releases pyproject.toml allows of these.
DRIFT_VENV ?= .venv-drift
DRIFT ?= transformers peft torch
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# pytest-xdist processes for `make test`, one test file each at a time: the end-to-end tests mostly
# wait on process start-up, so two share a 2-core machine well.
TEST_WORKERS ?= 2

.PHONY: demo test test-fast lint venv lock drift gpu-bundle clean

# The lock is checked against pyproject.toml before anything is installed. torch comes through pip,
# which honours the machine's own indexes (a CPU wheel where it has one), every other package
# through uv, exactly as locked; then a consistency check of the result.
$(BIN)/.installed: pyproject.toml requirements.lock
	@$(PYTHON) tools/lockfile.py check
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q --no-deps "$(TORCH_SPEC)")
	$(PYTHON) tools/lockfile.py cpu > $(VENV)/requirements-cpu.txt
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -r $(VENV)/requirements-cpu.txt -e .
	$(BIN)/uv pip check -q --python $(BIN)/python
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/adaptune run sweeps/demo.yaml --new

test: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo --cache-dir .cache/import-linter
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# Everything but the end-to-end tests (DeepSpeed subprocesses, torchrun, Ray, servers, kill/resume).
test-fast: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo --cache-dir .cache/import-linter
	$(BIN)/python -m pytest -q -m "not slow" --durations=5 tests

# Style (ruff) and layering: the import contracts of pyproject.toml's [tool.importlinter].
lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo --cache-dir .cache/import-linter

# Re-resolve requirements.lock from pyproject.toml, keeping every current pin that still fits.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	sed '/^#/d' requirements.lock > $(VENV)/lock.txt 2>/dev/null || true
	$(BIN)/uv pip compile -q pyproject.toml --all-extras --universal --python-version 3.11 --no-header \
		$(if $(filter all,$(UPGRADE)),--upgrade,$(foreach p,$(UPGRADE),--upgrade-package $(p))) -o $(VENV)/lock.txt
	$(PYTHON) tools/lockfile.py stamp $(VENV)/lock.txt

# The adapter-family tests (every method on every family) in a second environment: the lock with
# $(DRIFT) at their newest allowed releases, so an upstream rename fails CI before it fails a user.
# torch comes with its own dependencies here: a newer torch may exist only as a CUDA build (it runs on CPU).
drift:
	@$(PYTHON) tools/lockfile.py check
	rm -rf $(DRIFT_VENV) && $(PYTHON) -m venv $(DRIFT_VENV)
	$(DRIFT_VENV)/bin/python -m pip install -q "uv==$(UV_VERSION)"
	sed '/^#/d' requirements.lock > $(DRIFT_VENV)/lock.txt
	$(DRIFT_VENV)/bin/uv pip compile -q pyproject.toml --all-extras --universal --python-version 3.11 --no-header \
		$(foreach p,$(DRIFT),--upgrade-package $(p)) -o $(DRIFT_VENV)/lock.txt
	$(DRIFT_VENV)/bin/python -m pip install -q "torch==$$($(PYTHON) tools/lockfile.py pin torch $(DRIFT_VENV)/lock.txt)"
	$(PYTHON) tools/lockfile.py cpu $(DRIFT_VENV)/lock.txt > $(DRIFT_VENV)/requirements-cpu.txt
	$(DRIFT_VENV)/bin/uv pip install -q --python $(DRIFT_VENV)/bin/python --no-deps -r $(DRIFT_VENV)/requirements-cpu.txt -e .
	$(DRIFT_VENV)/bin/uv pip check -q --python $(DRIFT_VENV)/bin/python
	$(DRIFT_VENV)/bin/python -c "import torch, transformers, peft; print('drift: torch', torch.__version__, \
		'transformers', transformers.__version__, 'peft', peft.__version__)"
	$(DRIFT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_adapters*.py

# What bench/gpu_run.sh installs on a lent GPU machine with no network: the lock's wheels for its Python (3.12)
# of what the suite imports beside its own torch, and the GSM8K test set, in .gpu-run/ (about 38 MiB).
gpu-bundle: venv
	$(BIN)/python bench/gpu_bundle.py

clean:
	rm -rf $(VENV) $(DRIFT_VENV) .cache .pytest_cache mlflow.db mlartifacts runs .gpu-run
