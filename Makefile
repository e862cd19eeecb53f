# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test test-slow test-all bench proto clean venv

venv: $(STAMP)

# torch goes in first and pinned: the CPU wheel lies on this machine's disk, while letting a
# later requirement resolve torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ktfed demo

# The fast default suite; `make test-all` adds the cases marked slow.
test: $(STAMP)
	$(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(VPY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) -m bench $(BENCH_ARGS)

proto: $(STAMP)
	$(VPY) tools/gen_proto.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
