# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# pytest-xdist workers: the suite mostly waits on real processes and sockets, so 3 workers
# on 2 cores roughly halve its wall time; TEST_JOBS=0 runs it in one process.
TEST_JOBS ?= 3
# A test that fails is run once more before the run fails (a timing-sensitive end-to-end test
# on a loaded 2-core machine); every such rerun is listed in the summary (-r R), never hidden.
TEST_RERUNS ?= 1

.PHONY: demo test lint unit bench soak deps system-deps native clean container-test

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

deps: $(BIN)/.installed system-deps native

# the native tunnel engine, rebuilt when its source changes (pip install builds it too)
native: $(BIN)/.installed
	$(BIN)/python build_ext.py

system-deps:
	./scripts/system-deps.sh

demo: deps
	$(BIN)/lbproxy demo

lint: $(BIN)/.installed
	$(BIN)/ruff check lbproxy tests bench build_ext.py hatch_build.py
	$(BIN)/ruff format --check lbproxy tests bench build_ext.py hatch_build.py
	$(BIN)/mypy lbproxy
	$(BIN)/hadolint --failure-threshold error Dockerfile

test: deps lint
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_JOBS) --reruns $(TEST_RERUNS) -r R

# builds the image (Dockerfile) with podman on a Debian base made by mmdebstrap; minutes
container-test: deps
	LBPROXY_CONTAINER_TESTS=1 ./scripts/system-deps.sh
	LBPROXY_CONTAINER_TESTS=1 $(BIN)/pytest -q -p no:cacheprovider tests/e2e/test_deploy_container.py

bench: deps
	$(BIN)/python -m bench --out bench/out

# the chat fault run (README, "The reference chat backend"); SOAK_ARGS for its options
soak: deps
	$(BIN)/python -m bench.chat_soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) lbproxy/*.so .mypy_cache .ruff_cache .pytest_cache bench/out
