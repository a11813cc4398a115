# quest-export developer targets. `make demo` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

ORT_CPP := $(abspath $(VENV))/onnxruntime

.PHONY: setup demo test test-gpu test-trt lint bench runtime ort-cpp golden clean distclean

$(STAMP): pyproject.toml runtime/python/pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch by exact pin first, so the CPU wheel on disk is used and no CUDA packages are pulled
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e runtime/python -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled default model: off the device this ends with a Jetson bundle.
demo: $(STAMP)
	$(BIN)/quest-export build --target jetson

# The C++ runtime's ONNX Runtime backend needs ORT headers, which no registry packages for this Debian
# (runtime/cpp/README.md); the helper assembles them best-effort, and the C++ ORT tests skip without them.
ort-cpp: $(STAMP)
	@test -f $(ORT_CPP)/.ready || { PYTHON=$(BIN)/python bash runtime/cpp/scripts/setup_onnxruntime.sh $(ORT_CPP) \
	  && touch $(ORT_CPP)/.ready; } || echo "note: no ONNX Runtime C++ prefix; the C++ ORT backend tests will skip"

test: $(STAMP)
	-@$(MAKE) -s ort-cpp
	ONNXRUNTIME_ROOT=$(ORT_CPP) $(BIN)/python -m pytest -q -m "not trt and not gpu"

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

test-trt: $(STAMP)
	$(BIN)/python -m pytest -q -m trt -rs

lint: $(STAMP)
	$(BIN)/ruff check quest_export runtime/python cli tests bench tools
	$(BIN)/ruff format --check quest_export runtime/python cli tests bench tools
	$(BIN)/python -m pytest -q tests/test_import_hygiene.py

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

runtime:
	cmake -S runtime/cpp -B build/runtime -DCMAKE_BUILD_TYPE=Release -DONNXRUNTIME_ROOT=$(ORT_CPP) \
	  && cmake --build build/runtime -j2

# regenerate reference files (trtexec command lines per profile); review the diff
golden: $(STAMP)
	QUEST_EXPORT_UPDATE_GOLDEN=1 $(BIN)/python -m pytest -q tests/build/test_trt_plan.py -k golden

clean:
	rm -rf engines/out build runs .pytest_cache .ruff_cache

distclean: clean
	rm -rf $(VENV) calib/cache
