# quest-export developer targets. `make demo` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow test-gpu test-trt lint bench runtime golden clean distclean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch by exact pin first, so the CPU wheel on disk is used and no CUDA packages are pulled
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled default model: off the device this ends with a Jetson bundle.
demo: $(STAMP)
	$(BIN)/quest-export build --target jetson

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not trt and not gpu"

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

test-trt: $(STAMP)
	$(BIN)/python -m pytest -q -m trt -rs

lint: $(STAMP)
	$(BIN)/ruff check quest_export cli tests bench tools
	$(BIN)/ruff format --check quest_export cli tests bench tools
	$(BIN)/python -m pytest -q tests/test_import_hygiene.py

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

runtime:
	cmake -S runtime/cpp -B build/runtime -DCMAKE_BUILD_TYPE=Release && cmake --build build/runtime -j2

golden: $(STAMP)
	$(BIN)/python -m tests.golden.regenerate

clean:
	rm -rf engines/out build runs .pytest_cache .ruff_cache

distclean: clean
	rm -rf $(VENV) calib/cache
