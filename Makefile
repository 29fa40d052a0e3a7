# sovereign.mlops — developer entry points. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# Unit tests import the collection as ansible_collections.sovereign.mlops from this checkout.
export PYTHONPATH := $(CURDIR)/collections
PYTEST_WORKERS ?= 2
MOLECULE_JOBS ?= 2
# molecule/PENDING lists scenarios that exist but have not yet passed end to end ("name: why" lines): `make test`
# skips them and says so; `make molecule SCENARIOS=name` still runs one.
PENDING_SCENARIOS := $(shell sed -n 's/^\([a-z_0-9]*\):.*/\1/p' molecule/PENDING 2>/dev/null)
SCENARIOS ?= $(filter-out $(PENDING_SCENARIOS),$(notdir $(patsubst %/molecule.yml,%,$(wildcard molecule/*/molecule.yml))))

.PHONY: help bootstrap lab lab-down test test-fast lint ruff ansible-lint sanity unit molecule \
        changelog-lint build constraints clean rules

help: ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

bootstrap: ## install packages, podman config, .venv, base image, wheelhouse (idempotent)
	@bash scripts/bootstrap.sh

lab: bootstrap ## bring up the local lab (containers over SSH), converge site.yml, train and deploy the churn example
	@mkdir -p inventories/lab
	ansible-playbook -i inventories/lab playbooks/lab.yml

lab-down: ## remove everything the lab made: containers, network, keys, inventory, .lab/ (training workspace)
	@if [ -x $(VENV)/bin/ansible-playbook ]; then ansible-playbook -i inventories/lab playbooks/lab_down.yml; \
	 else bash scripts/lab-down-fallback.sh; fi

test: bootstrap ## everything CI runs: lint, sanity, unit, every molecule scenario
	@bash scripts/timed.sh test-fast $(MAKE) --no-print-directory test-fast
	@bash scripts/timed.sh molecule $(MAKE) --no-print-directory molecule

test-fast: lint changelog-lint build sanity unit rules ## everything that needs no container (< 3 min)

lint: ruff ansible-lint ## ruff and ansible-lint (production profile)

ruff:
	ruff check .
	ruff format --check .

ansible-lint:
	ansible-lint --profile production

changelog-lint:
	antsibull-changelog lint

build: ## build the collection tarball and check what went into it
	@bash scripts/build-collection.sh

rules: ## promtool: every role's alert rules parse, every alerts_test.yml passes (ADR 1520)
	@bash scripts/promtool-test.sh

sanity: ## ansible-test sanity on a copy laid out as ansible_collections/sovereign/mlops
	@bash scripts/sanity.sh

# Three processes: importing ansible's module_utils patches sys.intern, which torch's compiler rejects, so the
# collection's tests and the torch-based ones (runtime, examples) never share one; and importing controller code
# (ansible.errors, as filter plugins do) sets ansible's is_controller, after which a module's warnings go to the
# controller's display instead of its result, so filter tests never share a process with module tests.
UNIT_GROUPS := "tests/unit/plugins/modules tests/unit/plugins/module_utils tests/unit/ops tests/unit/playbooks tests/unit/roles" \
               "tests/unit/plugins/filter" "tests/unit/runtime tests/unit/examples tests/unit/benchmarks"

unit: ## pytest unit tests (modules, module_utils, CLI; runtime and examples in a second process)
	@rc=0; for group in $(UNIT_GROUPS); do \
	   paths=$$(for p in $$group; do [ -d $$p ] && echo $$p; done); \
	   [ -n "$$paths" ] || continue; \
	   echo "==> pytest $$paths"; \
	   prc=0; pytest -n $(PYTEST_WORKERS) $$paths || prc=$$?; \
	   if [ $$prc -eq 5 ]; then echo "pytest: no tests collected in $$paths"; prc=0; fi; \
	   [ $$prc -eq 0 ] || rc=$$prc; \
	 done; exit $$rc

molecule: ## every molecule scenario, as parallel independent processes
	@[ ! -s molecule/PENDING ] || { echo "molecule: not run, pending (molecule/PENDING):"; sed 's/^/  /' molecule/PENDING; }
	@bash scripts/molecule-all.sh $(MOLECULE_JOBS) $(SCENARIOS)

constraints: ## re-pin requirements/constraints.txt from a fresh resolve of requirements/dev.in
	@bash scripts/update-constraints.sh

clean: ## remove caches (not the lab: see lab-down)
	rm -rf .cache/build .cache/sanity .pytest_cache .ruff_cache
