# Two commands do everything on a fresh machine:
#   make demo   set up .venv and train the default model on the embedded corpus
#   make test   set up .venv and run the test suite
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= /tmp/bigjax_demo
DEMO_CONFIG ?= configs/lm_moe.py:demo
# Test processes (pytest-xdist). Each test file stays in one process, so a file's
# shared fixtures compile once. On 2 cores, 2 processes run the suite in ~25-29 minutes
# (README); XLA compiles on one thread, so one process would leave a core idle.
TEST_WORKERS ?= 2

# orbax-checkpoint needs Python >= 3.12; take the first interpreter that qualifies.
find_python = $(shell for p in python3.12 python3.13 python3 /root/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { echo $$p; break; }; done)

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: setup.py
	@test -x $(PY) || { p="$(find_python)"; test -n "$$p" || { echo "need Python >= 3.12"; exit 1; }; $$p -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m bigjax.main --config=$(DEMO_CONFIG) --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

clean:
	rm -rf $(VENV) build *.egg-info
