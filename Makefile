# The two commands: `make run` and `make test`. Both go through `make venv`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 50051
# torch first and pinned, so that nothing resolves an unpinned (CUDA, multi-GB) build.
TORCH := torch==2.13.0
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
PROTO_FILES := $(wildcard protos/embedserve/v1/*.proto)

.PHONY: venv test-deps run test lint typecheck protos check-protos buf-lint buf clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[server]'
	touch $@

test-deps: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: venv
	$(BIN)/embedserve serve --host $(HOST) --port $(PORT)

test: test-deps redis-deps lint typecheck check-protos buf-lint go-check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow the editable install's package mapping, so it reads the code
# through a tree of links that spells the import names (embedserve.service, ...).
typecheck: test-deps
	mkdir -p build/typecheck/embedserve
	ln -sfn ../../../service build/typecheck/embedserve/service
	ln -sfn ../../../client build/typecheck/embedserve/client
	ln -sfn ../../../envoy build/typecheck/embedserve/envoy
	ln -sfn ../../../protos/embedserve/v1 build/typecheck/embedserve/v1
	ln -sfn ../../tests build/typecheck/tests
	cd build/typecheck && MYPYPATH=.:tests ../../$(BIN)/mypy --config-file ../../pyproject.toml \
	  --explicit-package-bases embedserve/service embedserve/client embedserve/envoy tests

# Regenerate the Envoy configs under deploy/ (compose, Kubernetes ConfigMap) from
# envoy/render.py; tests/test_envoy.py fails when the committed ones drift.
.PHONY: deploy-configs
deploy-configs: test-deps
	$(BIN)/python -m embedserve.envoy.deploy

# Regenerate the Python stubs (and their typed .pyi) from protos/.
protos: test-deps
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iprotos \
	  --python_out=protos --grpc_python_out=protos --mypy_out=quiet:protos --mypy_grpc_out=quiet:protos \
	  $(PROTO_FILES)

# Fails when the committed stubs drift from the protos.
check-protos: test-deps
	rm -rf build/stubs && mkdir -p build/stubs
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iprotos \
	  --python_out=build/stubs --grpc_python_out=build/stubs --mypy_out=quiet:build/stubs --mypy_grpc_out=quiet:build/stubs \
	  $(PROTO_FILES) >/dev/null
	diff -r -x __init__.py -x py.typed -x '*.proto' -x __pycache__ build/stubs/embedserve/v1 protos/embedserve/v1 \
	  || (echo "generated stubs drifted from protos/: run 'make protos' and commit" >&2; exit 1)

$(BUF):
	mkdir -p .tools && npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

buf: $(BUF)

buf-lint: $(BUF)
	$(BUF) lint

clean:
	rm -rf $(VENV) .tools build .mypy_cache .ruff_cache .pytest_cache

# --- Redis (the embedding cache's shared tier) -------------------------------------------------
# tests/test_cache.py starts its own redis-server on a free port of 127.0.0.1 (under CI, CI=true,
# they fail rather than skip without one). `make redis-deps` installs the Debian package when
# redis-server is missing; quiet no-op when it is there. The package's own service is not used.
REDIS_SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: redis-deps
redis-deps:
	@if command -v redis-server >/dev/null; then :; \
	else \
	  echo "installing redis-server"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(REDIS_SUDO) apt-get install -y -q --no-install-recommends redis-server \
	  || { $(REDIS_SUDO) apt-get update -q && $(REDIS_SUDO) apt-get install -y -q --no-install-recommends redis-server; }; \
	fi

# --- Go client (client/go/) ----------------------------------------------------------------
# Everything comes from Debian packages (Go 1.19, grpc-go 1.33, genproto 2020-04) and builds in
# GOPATH mode: no module proxy is needed. `make go-deps` installs them when missing.
GO_IMPORT := github.com/embedserve/embedserve
GO_STUBS_IMPORT := $(GO_IMPORT)/client/go/embedserve/v1
GO_STUBS_DIR := client/go/embedserve/v1
GO_CLIENT_IMPORT := $(GO_IMPORT)/client/go/embedserve
GO_GOPATH := build/gopath
GO_ENV := GO111MODULE=off GOFLAGS= GOPATH=$(CURDIR)/$(GO_GOPATH):/usr/share/gocode
GO_DEBS := golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev \
  golang-google-genproto-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
GO_SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The protos carry no go_package option: map each file to the Go package here.
GO_PROTO_MAP := $(foreach f,$(PROTO_FILES:protos/%=%),M$(f)=$(GO_STUBS_IMPORT);embedservev1) \
  Mgoogle/rpc/status.proto=google.golang.org/genproto/googleapis/rpc/status
GO_PROTOC = protoc -Iprotos -I/usr/include \
  --go_out=$(1) --go_opt=paths=source_relative $(foreach m,$(GO_PROTO_MAP),'--go_opt=$(m)') \
  --go-grpc_out=$(1) --go-grpc_opt=paths=source_relative $(foreach m,$(GO_PROTO_MAP),'--go-grpc_opt=$(m)') \
  $(PROTO_FILES)

.PHONY: go-deps go-stubs go-check-stubs go-gopath go-example go-goload go-vet go-test go-check

# Installs the Go toolchain, protoc, its Go plugins and the Go libraries (offline-capable
# Debian packages); quiet no-op when they are already there.
go-deps:
	@if command -v go >/dev/null && command -v protoc >/dev/null \
	  && command -v protoc-gen-go >/dev/null && command -v protoc-gen-go-grpc >/dev/null \
	  && test -d /usr/share/gocode/src/google.golang.org/grpc/health/grpc_health_v1 \
	  && test -d /usr/share/gocode/src/google.golang.org/genproto/googleapis/rpc/errdetails \
	  && test -d /usr/share/gocode/src/google.golang.org/protobuf/types/known/durationpb; then :; \
	else \
	  echo "installing Go packages: $(GO_DEBS)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(GO_SUDO) apt-get install -y -q --no-install-recommends $(GO_DEBS) \
	  || { $(GO_SUDO) apt-get update -q && $(GO_SUDO) apt-get install -y -q --no-install-recommends $(GO_DEBS); }; \
	fi

# Regenerate the Go stubs (client/go/embedserve/v1) from protos/.
go-stubs: go-deps
	rm -f $(GO_STUBS_DIR)/*.pb.go
	$(call GO_PROTOC,client/go)

# Fails when the committed Go stubs drift from the protos.
go-check-stubs: go-deps
	rm -rf build/go-stubs && mkdir -p build/go-stubs
	$(call GO_PROTOC,build/go-stubs)
	diff -r build/go-stubs/embedserve/v1 $(GO_STUBS_DIR) \
	  || (echo "generated Go stubs drifted from protos/: run 'make go-stubs' and commit" >&2; exit 1)

# A GOPATH whose src/github.com/embedserve/embedserve is this checkout.
go-gopath:
	mkdir -p $(GO_GOPATH)/src/github.com/embedserve
	ln -sfn ../../../../.. $(GO_GOPATH)/src/github.com/embedserve/embedserve

go-example: go-deps go-gopath
	mkdir -p build/go
	$(GO_ENV) go build -o build/go/embedserve-example $(GO_IMPORT)/client/go/example

# The Go load generator of bench/go_coalesce.py (closed loop, raw or coalescing client).
go-goload: go-deps go-gopath
	mkdir -p build/go
	$(GO_ENV) go build -o build/go/embedserve-goload $(GO_IMPORT)/bench/goload

go-vet: go-deps go-gopath
	test -z "$$(gofmt -l client/go bench/goload)" || (gofmt -l client/go bench/goload >&2; echo "gofmt: run 'gofmt -w client/go bench/goload'" >&2; exit 1)
	$(GO_ENV) go vet $(GO_STUBS_IMPORT) $(GO_CLIENT_IMPORT) $(GO_IMPORT)/client/go/example $(GO_IMPORT)/bench/goload

# The Go client library's own tests (a scripted gRPC server on loopback), under the race detector.
go-test: go-deps go-gopath
	$(GO_ENV) go test -race -count=1 $(GO_CLIENT_IMPORT)

go-check: go-check-stubs go-vet go-test go-example

# --- Benchmarks (bench/, never part of `make test`) -------------------------------------------
# `make bench` runs the default suite (about 15 minutes); BENCH_ARGS='--quick' or '--full'.
# infinity-emb, the peer, lives in its own venv (it pins its own transformers and numpy).
.PHONY: bench
bench: venv
	$(BIN)/pip install --quiet -e '.[bench]'
	test -x bench/.venv-infinity/bin/infinity_emb || { $(PYTHON) -m venv bench/.venv-infinity \
	  && bench/.venv-infinity/bin/pip install --quiet $(TORCH) 'infinity-emb[server,torch]==0.0.78'; } \
	  || echo "infinity-emb could not be installed: its scenario is skipped" >&2
	$(BIN)/python -m bench.run $(BENCH_ARGS)
