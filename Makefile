# Two commands on a fresh machine:
#   make demo   — set up and run the demo (real Envoy + simulated vLLM fleet + scheduler + workload)
#   make test   — set up and run every test tier (unit, real-Envoy integration, real vLLM)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.extproc-installed

.PHONY: demo test test-fast setup system-deps real-vllm aiperf postgres bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || (echo "python3 -m venv failed: installing python3-venv" && apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV))
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/extproc demo --pods 4 --requests 200 --report demo-report.json

real-vllm:
	bash scripts/real_vllm_setup.sh

aiperf:
	bash scripts/aiperf_setup.sh

postgres:
	bash scripts/postgres_setup.sh

system-deps:
	bash scripts/system_deps.sh

test: $(STAMP) system-deps real-vllm aiperf postgres
	bash scripts/run_tests.sh

test-fast: $(STAMP) system-deps
	bash scripts/run_tests.sh -m "not real_vllm"

bench: $(STAMP)
	$(VENV)/bin/extproc bench --workload shared-prefix --virtual --out out/bench

clean:
	rm -rf $(VENV) .venv-vllm .venv-aiperf out demo-report.json
