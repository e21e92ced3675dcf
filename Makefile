# Two commands: `make test` and `make demo`. Both create venv/ and install
# requirements.txt once (re-installed when requirements.txt changes).
PYTHON ?= python3
VENV := venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp
SMOKE := models/smoke-tiny
SMOKE_K := models/smoke-k256
DEMO_ADAPTER := models/demo-adapter

.PHONY: test demo smoke-model serve bench bench-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

smoke-model: $(STAMP)
	$(PY) -m fishtune.smoke_model --output $(SMOKE) --size tiny
	$(PY) -m fishtune.smoke_model --output $(SMOKE_K) --size k256

demo: smoke-model
	$(PY) scripts/demo.py

# The demo adapter (trained by `make demo`) on its recorded base model.
$(DEMO_ADAPTER)/adapters.safetensors: | smoke-model
	$(PY) scripts/demo.py

serve: $(DEMO_ADAPTER)/adapters.safetensors
	$(PY) server.py --adapter-path $(DEMO_ADAPTER)

BENCH_STAMP := $(VENV)/.bench-requirements.stamp

$(BENCH_STAMP): bench/requirements.txt $(STAMP)
	$(PY) -m pip install -r bench/requirements.txt
	touch $(BENCH_STAMP)

bench: smoke-model $(BENCH_STAMP)
	$(PY) bench/run_all.py

bench-quick: smoke-model $(BENCH_STAMP)
	$(PY) bench/run_all.py --quick

clean:
	rm -rf models huggingface_model ollama_model tests/artifacts
