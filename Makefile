# quest-export developer targets. `make demo` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

ORT_CPP := $(abspath $(VENV))/onnxruntime

# Python 3.10, the floor requires-python claims, where one is installed (Debian 12 packages none; pyenv builds may be
# there): a venv with tomli only, for tests/test_python_floor.py. The full suite runs on 3.11 (docs/dependencies.md).
PY310 ?= $(shell for p in $(HOME)/.pyenv/versions/3.10*/bin/python3.10 python3.10; do \
  $$p -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null && { command -v $$p; break; }; done)
VENV310 := .venv310

.PHONY: setup floor system-deps demo test test-gpu test-trt lint bench runtime ort-cpp golden clean distclean

$(STAMP): pyproject.toml runtime/python/pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch by exact pin first, so the CPU wheel on disk is used and no CUDA packages are pulled
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e "runtime/python[text]" -e ".[dev,text]"
	touch $(STAMP)

setup: $(STAMP)
	-@$(MAKE) -s floor

floor:
	@if [ -x $(VENV310)/bin/python ]; then :; \
	elif [ -n "$(PY310)" ]; then $(PY310) -m venv $(VENV310) && $(VENV310)/bin/python -m pip install -q -c requirements/constraints.txt "tomli>=1.1" \
	  || { rm -rf $(VENV310); echo "note: could not create $(VENV310); tests/test_python_floor.py will skip"; }; \
	else echo "note: no Python 3.10 interpreter; tests/test_python_floor.py will skip"; fi

# The main job on the bundled default model: off the device this ends with a Jetson bundle.
demo: $(STAMP)
	$(BIN)/quest-export build --target jetson

# What the C++ runtime (runtime/cpp) builds with, from the OS packages (Debian/Ubuntu; JetPack is Ubuntu):
# each entry is "file that must exist : apt package". Installed only when something is missing, and said so.
SYSTEM_DEPS := /usr/include/nlohmann/json.hpp:nlohmann-json3-dev /usr/include/openssl/evp.h:libssl-dev \
  /usr/include/png.h:libpng-dev cmd/cmake:cmake cmd/c++:g++
system-deps:
	@missing=""; for d in $(SYSTEM_DEPS); do f=$${d%%:*}; p=$${d##*:}; \
	  case $$f in cmd/*) command -v $${f#cmd/} >/dev/null 2>&1 || missing="$$missing $$p";; \
	              *) test -e $$f || missing="$$missing $$p";; esac; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "system-deps: the C++ runtime needs$$missing (not installed); installing with apt-get"; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	  echo "system-deps: not root and no passwordless sudo: run  sudo apt-get install -y$$missing" >&2; exit 1; fi; \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing >/dev/null && \
	echo "system-deps: installed$$missing"

# The C++ runtime's ONNX Runtime backend needs ORT headers, which no registry packages for this Debian
# (runtime/cpp/README.md); the helper assembles them from Debian trixie headers and the onnxruntime wheel; the
# C++ ORT tests skip (saying so) only when that fails, e.g. without access to deb.debian.org.
ort-cpp: $(STAMP)
	@test -f $(ORT_CPP)/.ready || { PYTHON=$(BIN)/python bash runtime/cpp/scripts/setup_onnxruntime.sh $(ORT_CPP) \
	  && touch $(ORT_CPP)/.ready; } || echo "note: no ONNX Runtime C++ prefix; the C++ ORT backend tests will skip"

test: $(STAMP)
	-@$(MAKE) -s system-deps
	-@$(MAKE) -s ort-cpp
	-@$(MAKE) -s floor
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

runtime: system-deps
	cmake -S runtime/cpp -B build/runtime -DCMAKE_BUILD_TYPE=Release -DONNXRUNTIME_ROOT=$(ORT_CPP) \
	  && cmake --build build/runtime -j2

# regenerate reference files (trtexec command lines per profile); review the diff
golden: $(STAMP)
	QUEST_EXPORT_UPDATE_GOLDEN=1 $(BIN)/python -m pytest -q tests/deploy/test_trt_plan.py -k golden

clean:
	rm -rf engines/out build runs .pytest_cache .ruff_cache

distclean: clean
	rm -rf $(VENV) $(VENV310) calib/cache
