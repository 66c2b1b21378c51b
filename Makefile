# One command for each routine job. Everything lives in .venv (Python) and .venv/buf (the buf CLI).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BUF    := $(VENV)/buf/node_modules/.bin/buf
BUF_VERSION := 1.75.0
STAMP  := $(VENV)/.installed

.PHONY: install run test lint proto proto-check bench clean

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./clients/python -e '.[dev]'
	npm install --silent --no-save --no-audit --no-fund --prefix $(VENV)/buf @bufbuild/buf@$(BUF_VERSION)
	touch $@

run: install
	$(BIN)/otp-service serve --dev

# Regenerate the client stubs from proto/ (messages, gRPC stubs and their .pyi).
proto: install
	rm -rf clients/python/src/otp/v1 && mkdir -p clients/python/src/otp/v1
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I proto \
	  --python_out=clients/python/src --grpc_python_out=clients/python/src \
	  --mypy_out=clients/python/src --mypy_grpc_out=clients/python/src \
	  otp/v1/otp.proto
	touch clients/python/src/otp/__init__.py clients/python/src/otp/v1/__init__.py

# Fails when the committed stubs differ from what `make proto` produces.
proto-check: install
	@tmp=$$(mktemp -d) && cp -r clients/python/src "$$tmp/before" && $(MAKE) --no-print-directory proto >/dev/null && \
	  if diff -r -x __pycache__ "$$tmp/before" clients/python/src >/dev/null; then echo "stubs are fresh"; rm -rf "$$tmp"; \
	  else diff -r -x __pycache__ "$$tmp/before" clients/python/src | head -40; rm -rf "$$tmp"; \
	       echo "generated stubs are stale: run 'make proto' and commit"; exit 1; fi

lint: install
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench
	$(BIN)/mypy service
	$(BUF) lint
	$(BUF) format --diff --exit-code

test: install lint proto-check
	$(BIN)/python -m pytest

# The benchmark (bench/README.md). h2load comes from apt when it is missing; without it the
# bench falls back to its Python load client.
bench: install
	@command -v h2load >/dev/null || apt-get install -y -qq nghttp2-client >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nghttp2-client >/dev/null 2>&1; } || \
	  echo "h2load could not be installed: using the Python load client"
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
