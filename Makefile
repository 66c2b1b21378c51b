# One command for each routine job. Every version installed comes from a committed lock:
# uv.lock for .venv (Python), tools/package-lock.json for the buf CLI, clients/node's for the Node
# client; requirements-uv.txt pins uv itself, which pip puts in .tools (README "Development").
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV     := .tools/bin/uv
BUF    := tools/node_modules/.bin/buf
STAMP  := $(VENV)/.installed
PY_STAMP := $(VENV)/.installed-python
# Two make commands at once (`make run` beside `make test`) take turns at installing.
SERIAL := flock .install.lock
# uv uses this machine's Python and certificates, never a Python of its own.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
export UV_SYSTEM_CERTS := 1
export UV_NO_PROGRESS := 1
UV_SYNC := $(SERIAL) $(UV) sync --locked --quiet
STALE_LOCK := uv.lock does not match pyproject.toml: run '$(UV) lock' (or 'make upgrade') and commit uv.lock

.PHONY: install run test pytest test-clients test-latest upgrade chaos lint proto \
	proto-check bench clean

# Everything the tests, lint, proto and the clients need.
install: $(STAMP)

$(UV): requirements-uv.txt
	$(SERIAL) sh -c 'test $(UV) -nt requirements-uv.txt || $(PYTHON) -m pip install --quiet \
	  --disable-pip-version-check --root-user-action=ignore --require-hashes --no-deps \
	  --upgrade --target .tools -r requirements-uv.txt'
	touch $@

# .venv: the service with its tests', lint's and tools' packages (grpcurl among them), exactly as
# uv.lock has them. It is all `make run` needs.
$(PY_STAMP): $(UV) pyproject.toml uv.lock clients/python/pyproject.toml
	@$(UV) lock --check --offline --quiet 2>/dev/null || { echo "$(STALE_LOCK)" >&2; exit 1; }
	$(UV_SYNC) --extra dev
	touch $@

$(STAMP): $(PY_STAMP) tools/package-lock.json clients/node/package-lock.json
	$(SERIAL) npm ci --silent --no-audit --no-fund --prefix tools
	$(SERIAL) npm ci --silent --no-audit --no-fund --prefix clients/node
	touch $@

# The dev server, with dev.env's settings: the test number clients/README.md's examples use, and
# per-number limits that let them run again and again. `make run NAME=value` changes one.
include dev.env
DEV_SETTINGS := $(shell sed -n 's/^\([A-Z_]*\)=.*/\1/p' dev.env)
run: $(PY_STAMP)
	$(foreach name,$(DEV_SETTINGS),$(name)='$($(name))') $(BIN)/otp-service serve --dev

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

# BIN names the environment lint and the suite run in: .venv, or test-latest's throwaway one.
lint: install
	$(BIN)/ruff check service tests bench ops clients/python clients/run_contract.py proto
	$(BIN)/ruff format --check service tests bench ops clients/python clients/run_contract.py proto
	$(BIN)/mypy service
	$(BIN)/mypy --strict clients/python/src/otp_client clients/python/tests clients/run_contract.py
	$(BUF) lint
	$(BUF) format --diff --exit-code
	@$(LUACHECK)

# The store's Lua scripts, by luacheck (Debian's lua-check) with .luacheckrc's Redis globals. Outside
# CI a machine without it skips them with a line saying so; with CI=true that fails.
LUACHECK := if command -v luacheck >/dev/null; then luacheck --quiet service/otp_service/store/lua; \
	elif [ "$$CI" = true ]; then echo "luacheck not installed (Debian: lua-check)" >&2; exit 1; \
	else echo "luacheck not installed (Debian: lua-check): Lua scripts not linted" >&2; fi

pytest: install
	$(BIN)/python -m pytest

test: install lint proto-check pytest
	$(MAKE) --no-print-directory test-clients

# Each client's contract test (clients/*/) and clients/README.md's examples against a live server:
# the one OTP_TARGET names, else one clients/run_contract.py starts. The Python client runs on the
# lock's versions and on the lowest its pyproject.toml allows. Outside CI a missing Go or Node
# toolchain skips that client with a line saying so; with CI=true nothing skips.
test-clients: install
	$(BIN)/python clients/run_contract.py

# What the next upgrade would break: lint, the suite and the clients on the newest versions
# pyproject.toml allows, in a throwaway environment. The lock and .venv are not touched.
test-latest: install
	@$(UV) lock --upgrade --dry-run 2>&1 | sed 's/^/test-latest: /'
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(UV) venv --quiet "$$tmp" && \
	  VIRTUAL_ENV="$$tmp" $(UV) pip install --quiet --upgrade -e ./clients/python -e '.[dev]' && \
	  $(MAKE) --no-print-directory lint pytest BIN="$$tmp/bin" && \
	  OTP_PYTHON_CLIENT=newest $(MAKE) --no-print-directory test-clients BIN="$$tmp/bin"

# Refresh uv.lock to the newest versions pyproject.toml allows, install them, and run the tests.
# Commit the new lock on its own (README "Development").
upgrade: $(UV)
	$(SERIAL) $(UV) lock --upgrade
	$(MAKE) --no-print-directory test

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
	$(UV_SYNC) --extra dev --extra bench
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .tools .install.lock .pytest_cache .mypy_cache .ruff_cache tools/node_modules \
	  clients/node/node_modules clients/node/dist
