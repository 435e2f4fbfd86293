# rayrec: `make demo` runs the whole flow on generated data and serves it; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= .rayrec/demo
CONFIG ?= configs/demo.yaml
BENCH_PLOTS ?= .rayrec/bench/plots

.DEFAULT_GOAL := help
.PHONY: help install mariadb demo serve test stop bench lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[dev]"
	# torchrec declares the CUDA fbgemm-gpu, which would overwrite fbgemm-gpu-cpu: install it alone.
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	touch $(STAMP)

install: $(STAMP) ## create .venv with the pinned stack

mariadb: ## install MariaDB (Debian package mariadb-server) when missing; needs root
	@if ! command -v mariadbd >/dev/null && [ ! -x /usr/sbin/mariadbd ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mariadb-server; \
	  else \
	    echo "MariaDB is missing: run 'sudo apt-get install -y mariadb-server' (or make as root)"; exit 1; \
	  fi; \
	fi

demo: install mariadb ## run the pipeline on generated H&M data into $(WORKDIR) and serve it on 127.0.0.1:8000
	$(BIN)/rayrec serve stop --workdir $(WORKDIR)
	$(BIN)/rayrec pipeline --workdir $(WORKDIR) --config $(CONFIG)
	$(BIN)/rayrec serve start --workdir $(WORKDIR)

serve: install ## serve an existing run ($(WORKDIR))
	$(BIN)/rayrec serve start --workdir $(WORKDIR)

test: install mariadb ## run the test suite (unit + integration on real MariaDB and Ray)
	$(BIN)/python -m pytest -q tests --durations=15

stop: ## stop the app, Ray and the local database
	@if [ -x $(BIN)/rayrec ]; then $(BIN)/rayrec stop --workdir $(WORKDIR); fi

bench: ## run the benchmarks (JSON lines on stdout, nothing else; each script's time on stderr; latency plots in $(BENCH_PLOTS))
	@$(MAKE) --no-print-directory install mariadb >&2
	@export RAYREC_BENCH_PLOTS=$${RAYREC_BENCH_PLOTS:-$(BENCH_PLOTS)}; \
	t0=$$(date +%s); for b in benchmarks/[!_]*.py; do \
	  s=$$(date +%s); echo "# $$b" >&2; $(BIN)/python $$b || exit 1; \
	  echo "# $$b took $$(( $$(date +%s) - s )) s" >&2; \
	done; echo "# make bench took $$(( $$(date +%s) - t0 )) s" >&2

lint: install ## ruff
	$(BIN)/ruff check .

clean: stop ## remove the demo workdir
	rm -rf $(WORKDIR)
