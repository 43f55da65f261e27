PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint protos run chat tiny clean mutate certs

# One command: a virtualenv with the package and its dependencies, plus redis-server.
setup: $(VENV)/.installed
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server from Debian"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null; }
	@command -v kubectl >/dev/null || { \
	  echo "installing kubectl (kubernetes-client) from Debian"; \
	  (apt-get update -qq && apt-get install -y -qq kubernetes-client) >/dev/null; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lies in the machine's wheel cache; install it first so the
	# range in pyproject.toml is already satisfied and no CUDA build is downloaded.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q

# Python code for the contracts in protos/ (committed; never edited by hand).
protos:
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/internvl/v1/*.proto

lint:
	$(PY) -m ruff check .

# Mutation testing (mutmut) of the core pure modules, each group against its fast unit tests; not in
# CI (slow). GROUPS picks some (`make mutate GROUPS="sampler security"`, list: python -m tests.mutate
# --list); MUTATE_JOBS sets the parallel workers. Report and kept survivors: docs/testing.md.
GROUPS ?=
MUTATE_JOBS ?= 2
mutate: setup
	$(PY) -m tests.mutate --jobs $(MUTATE_JOBS) $(GROUPS)

MODEL ?=
ENCODER_DEVICE ?=
DECODER_DEVICE ?=
DTYPE ?=
RUN_ARGS ?=

# The whole system on this machine (redis-server, encoder, decoder, gateway): one demo chat, then
# serving in the foreground until Ctrl-C. The tiny random-weight checkpoint unless MODEL is given.
run: setup
	$(PY) -m services.tools.run_local --demo --keep-serving \
	  $(if $(MODEL),--model $(MODEL)) \
	  $(if $(ENCODER_DEVICE),--encoder-device $(ENCODER_DEVICE)) \
	  $(if $(DECODER_DEVICE),--decoder-device $(DECODER_DEVICE)) \
	  $(if $(DTYPE),--dtype $(DTYPE)) $(RUN_ARGS)

# Certificates for mutual TLS between the gateway and the encoder/decoder (a private CA, a server
# certificate per model service, the gateway's client certificate): into deploy/certs for compose;
# for Kubernetes give CERTS_NAMESPACE (docs/deploy.md has the `kubectl create secret` step).
CERTS_DIR ?= deploy/certs
CERTS_NAMESPACE ?=
certs: setup
	$(PY) -m services.tools.make_certs --out $(CERTS_DIR) $(foreach ns,$(CERTS_NAMESPACE),--namespace $(ns))

# A random-weight InternVL2 checkpoint in the real layout (see README).
tiny:
	$(PY) -m services.tools.make_tiny_checkpoint --out .cache/tiny-internvl2

clean:
	rm -rf $(VENV) .cache .pytest_cache
