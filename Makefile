# One command for each routine job. Everything lives in .venv (Python) and .venv/buf (the buf CLI),
# the Node client's packages in clients/node/node_modules.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BUF    := $(VENV)/buf/node_modules/.bin/buf
BUF_VERSION := 1.75.0
STAMP  := $(VENV)/.installed

.PHONY: install run test test-clients chaos lint proto proto-check bench clean

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml clients/node/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./clients/python -e '.[dev]'
	npm install --silent --no-save --no-audit --no-fund --prefix $(VENV)/buf @bufbuild/buf@$(BUF_VERSION)
	npm ci --silent --no-audit --no-fund --prefix clients/node
	touch $@

# The dev server, with the test number the client examples use (clients/README.md).
OTP_TEST_NUMBERS ?= +919999900001:246810
run: install
	OTP_TEST_NUMBERS='$(OTP_TEST_NUMBERS)' $(BIN)/otp-service serve --dev

# What is generated from proto/: buf.gen.yaml's Python, TypeScript and Go, and the descriptor set.
GENERATED := clients/python/src/otp clients/node/src/gen clients/go/otp proto/otp.binpb
# Go's plugins come from Debian (protoc-gen-go, protoc-gen-go-grpc); outside CI, a machine without
# them regenerates the rest (buf.gen.yaml's Go plugins come last, after the "# Go" line).
GO_PLUGINS := command -v protoc-gen-go >/dev/null && command -v protoc-gen-go-grpc >/dev/null

# Regenerate everything in GENERATED from proto/.
proto: install
	rm -rf clients/python/src/otp/v1 clients/python/src/otp/admin clients/node/src/gen
	@if $(GO_PLUGINS) || [ "$$CI" = true ]; then rm -rf clients/go/otp && $(BUF) generate; \
	else echo "protoc-gen-go/protoc-gen-go-grpc not installed: Go code not regenerated" >&2; \
	     $(BUF) generate --template "$$(sed '/^  # Go/,$$d' buf.gen.yaml)"; fi
	$(BUF) build --path proto/otp -o proto/otp.binpb
	touch clients/python/src/otp/__init__.py clients/python/src/otp/v1/__init__.py \
	    clients/python/src/otp/admin/__init__.py clients/python/src/otp/admin/v1/__init__.py

# Fails when what is committed differs from what `make proto` produces.
proto-check: install
	@tmp=$$(mktemp -d) && for path in $(GENERATED); do mkdir -p "$$tmp/$$(dirname $$path)" && \
	    cp -r $$path "$$tmp/$$path"; done && $(MAKE) --no-print-directory proto >/dev/null && \
	  stale=0 && for path in $(GENERATED); do \
	    diff -r -x __pycache__ "$$tmp/$$path" $$path | head -20 | grep . && stale=1; done; rm -rf "$$tmp"; \
	  if [ $$stale = 0 ]; then echo "generated code is fresh"; \
	  else echo "generated code is stale: run 'make proto' and commit"; exit 1; fi

lint: install
	$(BIN)/ruff check service tests bench ops clients/python clients/run_contract.py proto
	$(BIN)/ruff format --check service tests bench ops clients/python clients/run_contract.py proto
	$(BIN)/mypy service
	$(BIN)/mypy --strict clients/python/src/otp_client clients/python/tests clients/run_contract.py
	$(BUF) lint
	$(BUF) format --diff --exit-code

test: install lint proto-check
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-clients

# Each client's contract test (clients/*/) and clients/README.md's examples against a live server:
# the one OTP_TARGET names, else one clients/run_contract.py starts. Outside CI a missing Go or
# Node toolchain skips that client with a line saying so; with CI=true nothing skips.
test-clients: install
	$(BIN)/python clients/run_contract.py

# The fault suite's long tests (tests/test_chaos.py): a storm under each network fault, Interakt
# faults, SIGKILL during a burst of sends, a soak of OTP_SOAK_SECONDS (180) on two replicas.
chaos: install
	$(BIN)/python -m pytest -m chaos

# The benchmark (bench/README.md). h2load comes from apt when it is missing; without it the
# bench falls back to its Python load client.
bench: install
	@command -v h2load >/dev/null || apt-get install -y -qq nghttp2-client >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nghttp2-client >/dev/null 2>&1; } || \
	  echo "h2load could not be installed: using the Python load client"
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache clients/node/node_modules clients/node/dist
