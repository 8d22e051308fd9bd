# Two set-up commands on a fresh machine: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
PY ?= python3.11
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
FHIR_PEER := peers/fhir-server
OIDC_PEER := peers/oidc-provider
MESH_PEER := peers/mesh-sandbox
BROWSER_PEER := peers/browser

.PHONY: install debian demo test lint typecheck pytest bench clean

$(UV):
	$(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(BIN)/schoolslink: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --python $(PY) --quiet --compile-bytecode
	@touch $@

$(FHIR_PEER)/node_modules/.installed: $(FHIR_PEER)/package.json $(FHIR_PEER)/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	cd $(FHIR_PEER) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(OIDC_PEER)/node_modules/.installed: $(OIDC_PEER)/package.json $(OIDC_PEER)/package-lock.json $(FHIR_PEER)/node_modules/.installed
	cd $(OIDC_PEER) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Debian packages the tests drive for real: headless Chromium (HTML feeds and summaries, axe-core) and OpenSSH's
# sshd + sftp-server (SFTP delivery to chrooted school accounts). Installed only when missing.
debian:
	@command -v chromium >/dev/null && test -x /usr/sbin/sshd && test -x /usr/lib/openssh/sftp-server || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium openssh-server \
	     openssh-sftp-server)

# mesh-sandbox pins a newer FastAPI than Airflow allows: it runs as a peer from its own locked environment.
$(MESH_PEER)/.venv/.installed: $(UV) $(MESH_PEER)/pyproject.toml $(MESH_PEER)/uv.lock
	$(UV) sync --frozen --project $(MESH_PEER) --python $(PY) --quiet
	@touch $@

# playwright-core and axe-core drive Debian's Chromium in the accessibility tests (screenshots in artifacts/).
$(BROWSER_PEER)/node_modules/.installed: $(BROWSER_PEER)/package.json $(BROWSER_PEER)/package-lock.json \
		$(FHIR_PEER)/node_modules/.installed
	cd $(BROWSER_PEER) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

install: $(BIN)/schoolslink $(FHIR_PEER)/node_modules/.installed $(OIDC_PEER)/node_modules/.installed \
	$(MESH_PEER)/.venv/.installed $(BROWSER_PEER)/node_modules/.installed debian

demo: install
	$(BIN)/schoolslink demo

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy schoolslink/

pytest: install
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: install
	$(BIN)/python -m benchmarks.mapping
	$(BIN)/python -m benchmarks.ctf_stream
	$(BIN)/python -m benchmarks.fhir_io
	$(BIN)/python -m benchmarks.mllp
	$(BIN)/python -m benchmarks.events
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf .schoolslink .pytest_cache .mypy_cache .ruff_cache
