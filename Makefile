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

test: test-deps lint typecheck check-protos buf-lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow the editable install's package mapping, so it reads the code
# through a tree of links that spells the import names (embedserve.service, ...).
typecheck: test-deps
	rm -rf build/typecheck && mkdir -p build/typecheck/embedserve
	ln -s ../../../service build/typecheck/embedserve/service
	ln -s ../../../client build/typecheck/embedserve/client
	ln -s ../../../protos/embedserve/v1 build/typecheck/embedserve/v1
	ln -s ../../tests build/typecheck/tests
	cd build/typecheck && MYPYPATH=.:tests ../../$(BIN)/mypy --config-file ../../pyproject.toml \
	  --explicit-package-bases embedserve/service embedserve/client tests

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
