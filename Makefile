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
        changelog-lint build constraints clean rules unit-1 unit-2 unit-3 shellcheck

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

# scripts/test-fast.sh: one quoted list of steps per lane, lanes side by side; every step runs, each step's log is
# printed whole when it ends, the exit status is the first failure's. One lane by default: two lanes
# ("unit-1 unit-2 unit-3" "ruff ansible-lint changelog-lint build sanity rules") measured 7 unit failures at load
# 12-18 (load-sensitive tests, docs/benchmarks.md "Test suite"); they go first.
TEST_FAST_LANES ?= "ruff shellcheck ansible-lint changelog-lint build sanity unit-1 unit-2 unit-3 rules"

test-fast: ## everything that needs no container (each step's log printed whole, a summary)
	@bash scripts/test-fast.sh $(TEST_FAST_LANES)

lint: ruff ansible-lint ## ruff and ansible-lint (production profile)

ruff:
	ruff check .
	ruff format --check .

ansible-lint:
	ansible-lint --profile production

changelog-lint:
	antsibull-changelog lint

# ansible-test's shellcheck covers the collection's scripts; the repo's own (scripts/, .ci/) are left out of it.
shellcheck: ## shellcheck (warnings and errors) on every tracked shell script
	shellcheck -S warning .ci/run $$(git ls-files '*.sh')

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
UNIT_GROUP_1 := tests/unit/plugins/modules tests/unit/plugins/module_utils tests/unit/ops tests/unit/playbooks tests/unit/roles
UNIT_GROUP_2 := tests/unit/plugins/filter
UNIT_GROUP_3 := tests/unit/runtime tests/unit/examples tests/unit/benchmarks
UNIT_GROUPS := "$(UNIT_GROUP_1)" "$(UNIT_GROUP_2)" "$(UNIT_GROUP_3)"
UNIT_TARGETS := unit-1 unit-2 unit-3

unit: ## pytest unit tests (modules, module_utils, CLI; runtime and examples in a second process)
	@PYTEST_WORKERS=$(PYTEST_WORKERS) bash scripts/unit.sh $(UNIT_GROUPS)

$(UNIT_TARGETS): unit-%: ## one group of UNIT_GROUPS (unit-1, unit-2, unit-3)
	@PYTEST_WORKERS=$(PYTEST_WORKERS) bash scripts/unit.sh "$(UNIT_GROUP_$*)"

molecule: ## every molecule scenario, as parallel independent processes
	@[ ! -s molecule/PENDING ] || { echo "molecule: not run, pending (molecule/PENDING):"; sed 's/^/  /' molecule/PENDING; }
	@bash scripts/molecule-all.sh $(MOLECULE_JOBS) $(SCENARIOS)

constraints: ## re-pin requirements/constraints.txt from a fresh resolve of requirements/dev.in
	@bash scripts/update-constraints.sh

clean: ## remove caches (not the lab: see lab-down)
	rm -rf .cache/build .cache/sanity .pytest_cache .ruff_cache
