# catdog: every stage is a target; CI and the self-hosted runner call these same targets.
# `make help` lists them: each target's `##` comment is its line there.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := all

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyPI's torch==2.13.0 is the CUDA build (several GB of nvidia-* wheels). CPU_TORCH=1 takes
# the same release's CPU build from PyTorch's own index (it satisfies the same ==2.13.0 pin):
#   make all CPU_TORCH=1
# PIP_OPTS: more pip options (a mirror: PIP_OPTS="--index-url https://pypi.example/simple").
CPU_TORCH ?=
PIP_OPTS ?=
PIP_INSTALL_OPTS = $(PIP_OPTS) $(if $(CPU_TORCH),--extra-index-url https://download.pytorch.org/whl/cpu)

# Where the photos come from: a Kaggle-style folder or zip, Microsoft's PetImages
# folder or zip, or an http(s) URL of such a zip. The shared 3k sample wins when present.
SHARED_SAMPLE := ../shared/datasets/dogs-vs-cats-3k
DATA_URL ?= https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip
DATA_SOURCE ?= $(if $(wildcard $(SHARED_SAMPLE)),$(SHARED_SAMPLE),$(DATA_URL))

# Containers: `make image DOCKER=podman` where no Docker engine runs.
DOCKER ?= docker
COMPOSE ?= $(DOCKER) compose
REGISTRY ?= 127.0.0.1:5000
IMAGE ?= $(REGISTRY)/catdog
TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
URL ?= http://127.0.0.1:8000

export MLFLOW_DISABLE_TELEMETRY := true
# One progress bar per artifact download floods the training log.
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export DVC_NO_ANALYTICS := 1
export PYTHONDONTWRITEBYTECODE := 1
# Large-batch feature extraction spends half its time in page faults without these.
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 4294967296

.PHONY: all help setup setup-dev system-deps lock data harvest train train-is-current serve test lint bench fuzz image push \
        deploy rollback smoke smoke-model post-eval predict monitor-check mlflow-ui backup restore clean

all:  ## setup -> data -> train: the champion in models/, ready to serve (each stage's time printed)
	@total=$$SECONDS; for stage in setup data train; do \
	  start=$$SECONDS; \
	  if [ $$stage = train ] && $(MAKE) --no-print-directory -s train-is-current; then \
	    echo "train: its inputs are those dvc.lock records and models/ holds the champion: nothing to do"; \
	  else $(MAKE) --no-print-directory $$stage; fi; \
	  echo "== make $$stage: $$((SECONDS - start)) s"; \
	done; echo "== make all: $$((SECONDS - total)) s"

help:  ## this list
	@awk -F ':.*## ' '/^[a-z][a-z-]*:.*## / { printf "  make %-17s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

# ------------------------------------------------------------------ set-up
# The venv takes two of the three locks: requirements.txt trains and serves (make all);
# requirements-dev.txt adds the test and lint tools (make test, make fuzz, make lock), pinned
# as requirements.txt pins whatever both need. requirements-serve.txt is the image's.
setup: $(VENV)/.installed  ## .venv with the pinned packages of requirements.txt (train and serve)

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(PIP_INSTALL_OPTS) -r requirements.txt
	touch $@

setup-dev: $(VENV)/.dev-installed  ## setup, plus the test and lint tools of requirements-dev.txt

$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	$(VENV)/bin/pip install -q $(PIP_INSTALL_OPTS) -r requirements-dev.txt
	touch $@

# Debian packages the tests and the container chain use (browser test, promtool, load
# generator, shell lint, PostgreSQL). Installed only when missing: as root, else through
# `sudo -n` where sudo needs no password (GitHub's hosted runners). What is still missing is
# a note and its tests skip; with REQUIRE_ALL_TOOLS=1 (CI) it is an error, and pytest fails
# every skip that is not about absent data (tests/conftest.py).
APT_PACKAGES ?= chromium prometheus prometheus-alertmanager wrk shellcheck postgresql
APT_GET ?= apt-get
REQUIRE_ALL_TOOLS ?=
system-deps:  ## the Debian packages the tests drive (when missing; as root or sudo -n)
	@missing() { for p in $(APT_PACKAGES); do dpkg -s "$$p" >/dev/null 2>&1 || echo "$$p"; done; }; \
	todo="$$(missing)"; \
	if [ -n "$$todo" ]; then \
	  if [ "$$(id -u)" = 0 ]; then as_root=env; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then as_root="sudo -n env"; \
	  else as_root=; fi; \
	  if [ -n "$$as_root" ] && command -v $(APT_GET) >/dev/null; then \
	    echo "installing" $$todo; \
	    { $$as_root $(APT_GET) update -qq >/dev/null && \
	      $$as_root DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends $$todo >/dev/null; } \
	      || echo "$(APT_GET) could not install" $$todo >&2; \
	    todo="$$(missing)"; \
	  fi; \
	fi; \
	if [ -n "$$todo" ]; then \
	  if [ -n "$(filter-out 0,$(REQUIRE_ALL_TOOLS))" ]; then \
	    echo "missing Debian packages:" $$todo "(REQUIRE_ALL_TOOLS=$(REQUIRE_ALL_TOOLS): not root, no sudo -n, or not installable)" >&2; exit 1; \
	  fi; \
	  echo "missing Debian packages:" $$todo "(tests that need them will skip)"; \
	fi

# Re-pin the three locks after editing a .in file. pip-compile keeps a lock's current pins
# where they still fit; the dev and serve locks are compiled against requirements.txt
# (-c requirements.txt in their .in), so every shared package has one version.
PIP_COMPILE = $(VENV)/bin/pip-compile --quiet --strip-extras --no-emit-find-links --no-emit-index-url
# A local label (torch==2.13.0+cpu, from the wheel installed here) is on no index but the one
# that built it; the plain version matches that build and PyPI's alike.
STRIP_LOCAL_LABELS = sed -i -E 's/^([A-Za-z0-9._-]+==[^ +]+)\+[A-Za-z0-9.]+/\1/'
lock: setup-dev  ## re-pin requirements.txt, requirements-dev.txt, requirements-serve.txt from their .in files
	$(PIP_COMPILE) -o requirements.txt requirements.in
	$(STRIP_LOCAL_LABELS) requirements.txt
	$(PIP_COMPILE) -o requirements-dev.txt requirements-dev.in
	$(STRIP_LOCAL_LABELS) requirements-dev.txt
	$(PIP_COMPILE) --generate-hashes -o requirements-serve.txt requirements-serve.in

# ------------------------------------------------------------------ pipeline
# The pipeline is dvc.yaml's stages, data -> train; dvc.lock (committed) records what each
# last ran on. preprocess.py writes data/processed/, data/manifest.csv, data/quality_report.*
# (the data stage's outputs: `dvc push` uploads them), and data/raw/ when it downloads.
DVC = PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc
# A DATA_SOURCE given on the command line or in the environment forces the stage: DVC hashes
# the code, not the photos behind a folder or URL. data/feedback, an input of the stage, is
# the harvest data/feedback.dvc records (make harvest; committed, so `dvc push` and `dvc pull`
# carry it). First it is checked out when absent: a record of no photos is an empty folder
# (DVC cannot check out a folder whose listing no cache holds yet, as in a fresh clone), photos
# no cache holds stop the run with the command that fetches them. Then `dvc commit` puts it in
# the cache, and refuses when it is not what data/feedback.dvc records: dvc.lock would name a
# harvest nobody can pull.
FEEDBACK_RECORD := data/feedback.dvc
data: setup  ## photos (+ data/feedback) -> validated, deduplicated, split data/ (the DVC data stage)
	@if [ ! -d data/feedback ]; then \
	  if grep -qx '  nfiles: 0' $(FEEDBACK_RECORD); then mkdir data/feedback; \
	  elif ! $(DVC) checkout --quiet $(FEEDBACK_RECORD); then \
	    echo "data/feedback: $(FEEDBACK_RECORD) records harvested photos this DVC cache does not have:" \
	      "$(VENV)/bin/dvc pull $(FEEDBACK_RECORD), then make data again" >&2; exit 1; \
	  fi; \
	  chmod 700 data/feedback; \
	fi
	@$(DVC) commit --quiet $(FEEDBACK_RECORD) </dev/null || { $(DVC) status $(FEEDBACK_RECORD) >&2 || true; \
	  echo "data/feedback is not the harvest $(FEEDBACK_RECORD) records: make harvest (or $(VENV)/bin/dvc add" \
	    "data/feedback) records it; $(VENV)/bin/dvc checkout $(FEEDBACK_RECORD) goes back to the recorded one" >&2; exit 1; }
	DATA_SOURCE="$(DATA_SOURCE)" $(DVC) repro $(if $(filter command line environment,$(origin DATA_SOURCE)),--force) --single-item data

# Kept photos with staff labels from the store the service uses (DB_PATH or DATABASE_URL, and
# PHOTOS_DIR, as serve.py reads them) -> data/feedback/{cat,dog,other}/ + manifest.csv, recorded
# in data/feedback.dvc; the next `make data` takes them into the training split
# (docs/operations.md, "Harvest": run it as the user that runs make data).
harvest: setup  ## kept photos + staff labels from the store (DB_PATH or DATABASE_URL, PHOTOS_DIR) -> data/feedback/ + its .dvc
	$(PY) harvest.py
	$(DVC) add --quiet data/feedback
	@echo "harvest: recorded in $(FEEDBACK_RECORD). Inspect it (docs/operations.md, Harvest), then make data train," \
	  "and version it: git add $(FEEDBACK_RECORD) dvc.lock && git commit && $(VENV)/bin/dvc push"

# Both models -> MLflow (sqlite:///mlflow.db, artifacts in mlruns/) -> gate -> champion in models/,
# always (`make all` skips it when train-is-current). As the DVC train stage, so dvc.lock records
# its inputs; with TRAIN_ARGS it is an experiment dvc.lock does not describe, run directly:
#   make train TRAIN_ARGS="--arch transfer --head-epochs 40"; scale out: torchrun --nproc_per_node N train.py
TRAIN_ARGS ?=
train: setup  ## both models -> MLflow -> gate -> champion in models/
	$(if $(TRAIN_ARGS),$(PY) train.py $(TRAIN_ARGS),$(DVC) repro --force --single-item train)

train-is-current:  ## exit 0 when models/ holds a champion and no train-stage input changed since dvc.lock
	@test -f models/model.onnx && $(DVC) status --quiet train

# The service on 0.0.0.0:8000 (settings from env vars: PORT, MODEL_PATH, DB_PATH, ...: README.md).
serve: setup  ## the service on :8000
	$(PY) serve.py

# serve.py vs a naive Flask + PyTorch-eager service at 1/8/32 clients on the shared photos.
BENCH_ARGS ?=
bench: setup  ## speed figures: serve.py against a naive Flask + PyTorch peer
	$(PY) bench.py $(BENCH_ARGS)

# Hostile inputs against a real serve.py (the champion, else a tiny model), about a minute: mutated
# and lying files, protocol abuse, worst-case uploads. Fails on a 5xx or a dead process; prints
# peak RSS and latency against their targets (FUZZ_ARGS="--strict-memory" fails on those too).
FUZZ_ARGS ?=
fuzz: setup-dev  ## hostile inputs against a real server: 0 5xx, 0 deaths; peak RSS figures
	$(PY) fuzz.py $(FUZZ_ARGS)

test: setup-dev system-deps lint node_modules/axe-core/axe.min.js  ## lint, the whole test suite, then make fuzz
	$(PY) -m pytest
	$(MAKE) --no-print-directory fuzz

# axe-core, the accessibility checker tests/test_browser.py injects into the staff page; from
# the npm registry, pinned, into ./node_modules (git-ignored). Without npm that test skips.
AXE_CORE_VERSION := 4.14.1
node_modules/axe-core/axe.min.js:
	@if command -v npm >/dev/null; then \
	  npm install --prefix . --no-save --no-audit --no-fund --no-package-lock axe-core@$(AXE_CORE_VERSION); \
	else echo "no npm: the accessibility test will skip (apt-get install npm)"; fi

# Pyflakes, pycodestyle errors, import order, bugbear and pyupgrade; zip() without strict= and
# constant path defaults are fine here. RUFF=ruff uses one on PATH and needs no .venv (CI's
# lint job installs requirements-dev.txt's ruff pin alone).
LINT_RULES := --select E4,E7,E9,F,I,B,UP --ignore B008,B905 --target-version py311 --line-length 120 --config 'src = [".", "tests"]'
RUFF ?= $(VENV)/bin/ruff
lint: $(if $(filter $(VENV)/bin/ruff,$(RUFF)),setup-dev)  ## ruff over every Python file
	$(RUFF) check $(LINT_RULES) .

# ------------------------------------------------------------------ monitoring
# Evaluate the running service at URL over HTTP (feedback posted, MLflow run, report in
# reports/post_eval/); fails below 99 % accuracy. Default photos: the held-out test split
# (the original photos when present); or `make post-eval IMAGES="dir-or-files"` (cat.N.jpg,
# other.N.jpg or cat/ dog/ other/). NOT_PETS adds that folder's held-out test part (the split
# train.py makes of it, evaluate.not_pet_photos; --not-pets-part val, train or all for others)
# as "other" and reports per kind (subfolder) how many were answered cat or dog:
#   make post-eval NOT_PETS=../shared/datasets/not-pets POST_EVAL_ARGS="--limit 450"
# --limit takes the classes in turn (and the kinds of non-pet in turn), so it keeps the three
# classes even; POST_EVAL_ARGS takes any other post_eval.py option (--min-accuracy, ...).
IMAGES ?=
NOT_PETS ?=
POST_EVAL_ARGS ?=
post-eval: setup  ## accuracy of the running service at URL from labelled photos (NOT_PETS=dir adds non-pets)
	$(PY) post_eval.py $(URL) $(or $(IMAGES),--manifest data/manifest.csv --split test) \
	  $(if $(NOT_PETS),--not-pets "$(NOT_PETS)") $(POST_EVAL_ARGS)

# Every file under DIR scored offline with the champion (MODEL_PATH and the service's other
# settings from the environment), each answered as POST /predict answers it, into OUT (.csv, or
# .jsonl for JSON lines); accuracy when the names carry labels; photos per second. PREDICT_ARGS:
# more predict.py options ("--compare": the same photos one by one to a local /predict too).
predict: setup  ## score every file under DIR offline into OUT (CSV or JSON lines) as /predict would (PREDICT_ARGS=--compare)
	@test -n "$(DIR)" || { echo "make predict DIR=folder [OUT=predictions.csv]: name the folder of photos" >&2; exit 1; }
	$(PY) predict.py "$(DIR)" --out "$(or $(OUT),predictions.csv)" $(PREDICT_ARGS)

# Debian prometheus on 127.0.0.1 scrapes the service at URL and the request counter is queried.
monitor-check: system-deps  ## a real Prometheus scrapes the service at URL
	monitoring/scrape_check.sh $(URL)

# ------------------------------------------------------------------ containers
# The image is code + champion model, so build it after `make all`. BUILD_FLAGS goes to the
# builder (.ci/run passes the Podman sandbox's flags); EXTRA_TAGS are pushed too (`latest`
# on main); SMOKE_ARGS are smoke.sh's photos: IMAGES_DIR, or CAT_PHOTO DOG_PHOTO.
BUILD_FLAGS ?=
EXTRA_TAGS ?=
SMOKE_ARGS ?=
DEPLOY_ENV = IMAGE="$(IMAGE)" DOCKER="$(DOCKER)" COMPOSE="$(COMPOSE)" URL="$(URL)" SMOKE_ARGS="$(SMOKE_ARGS)"

# MODEL_URI=models:/catdog@champion (or models:/catdog/7): the model comes from the MLflow
# registry at MLFLOW_TRACKING_URI, through build/model/, instead of models/. Either way a model
# whose preprocessing fingerprint is not this code's is refused (catdog.preprocessing_mismatch).
MODEL_URI ?=
MODEL_DIR = $(if $(MODEL_URI),build/model,models)
model_field = $$($(PYTHON) -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]) or "none")' $(MODEL_DIR)/model.json $(1))
image:  ## the serving image (code + champion, or MODEL_URI from the registry), tagged IMAGE:TAG
	@if [ -n "$(MODEL_URI)" ]; then rm -rf build/model && $(PY) registry_model.py "$(MODEL_URI)" build/model; fi
	@test -f $(MODEL_DIR)/model.onnx || { echo "no $(MODEL_DIR)/model.onnx: run 'make all' first" >&2; exit 1; }
	@$(PY) -c 'import sys, catdog; sys.exit(catdog.preprocessing_mismatch(catdog.read_json(sys.argv[1]), sys.argv[2]))' \
	  $(MODEL_DIR)/model.json $(MODEL_DIR)/model.onnx
	$(DOCKER) build $(BUILD_FLAGS) --build-arg MODEL_DIR=$(MODEL_DIR) \
	  --build-arg REVISION="$$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
	  --build-arg MODEL_VERSION="$(call model_field,version)" \
	  --build-arg REGISTRY_VERSION="$(call model_field,registry_version)" \
	  --build-arg RUN_ID="$(call model_field,run_id)" \
	  -t $(IMAGE):$(TAG) .

push:  ## push the image (and EXTRA_TAGS) to the registry
	$(DOCKER) push $(IMAGE):$(TAG)
	for tag in $(EXTRA_TAGS); do $(DOCKER) tag $(IMAGE):$(TAG) $(IMAGE):$$tag; $(DOCKER) push $(IMAGE):$$tag; done

# Pull TAG, Compose up, wait for /health, smoke.sh; on failure the last good tag comes back
# and the target fails. `make rollback` steps back one good tag.
deploy:  ## pull TAG, Compose up, smoke; roll back on failure
	$(DEPLOY_ENV) ./deploy.sh $(TAG)

rollback:  ## step back to the previous good tag
	$(DEPLOY_ENV) ./deploy.sh --rollback

smoke:  ## smoke-test the service at URL
	./smoke.sh $(URL) $(SMOKE_ARGS)

# A model and two photos for the image and smoke.sh without any dataset (CI's image job): the
# red/blue rule of harness.export_tiny_model (reddish = cat, bluish = dog) as
# model.onnx, model.json, reference_profile.json and MODEL_CARD.md in SMOKE_MODEL_DIR, and a red cat.jpg and
# a blue dog.jpg in SMOKE_PHOTOS:  ./smoke.sh URL reports/smoke/cat.jpg reports/smoke/dog.jpg
# A trained model already in SMOKE_MODEL_DIR is never overwritten.
SMOKE_MODEL_DIR ?= models
SMOKE_PHOTOS ?= reports/smoke
smoke-model: setup  ## a tiny model (red cat, blue dog) in models/ + two smoke photos: no dataset needed
	$(PY) -c 'import os, sys; import catdog, harness; from PIL import Image; \
	  models, photos = sys.argv[1:]; meta = os.path.join(models, "model.json"); \
	  version = catdog.read_json(meta).get("version", "") if os.path.exists(meta) else "smoke"; \
	  version.startswith("smoke") or sys.exit(f"{meta} is the trained model {version}: not overwriting it"); \
	  harness.export_tiny_model(models, version="smoke-1", card=True); \
	  os.makedirs(photos, exist_ok=True); \
	  [Image.new("RGB", (200, 160), rgb).save(os.path.join(photos, f"{name}.jpg"), "JPEG", quality=90) \
	   for name, rgb in (("cat", (230, 60, 40)), ("dog", (40, 60, 230)))]' \
	  "$(SMOKE_MODEL_DIR)" "$(SMOKE_PHOTOS)"

MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
mlflow-ui: setup  ## MLflow UI on 127.0.0.1:5001
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5001 --backend-store-uri "$(MLFLOW_TRACKING_URI)"

# ------------------------------------------------------------------ backups
# The store of DB_PATH or DATABASE_URL (as the service reads them) and MLflow (the database of
# MLFLOW_TRACKING_URI, the artifacts in MLFLOW_ARTIFACTS_DIR, default mlruns/ beside a sqlite
# database) into the new folder DEST, with manifest.json; restore puts back what FROM holds.
# BACKUP_ARGS: "--only store" (a host without MLflow), "--only mlflow"; restore's "--force"
# overwrites a store in use. Check a backup: $(PY) backup.py check FROM (docs/operations.md).
DEST ?=
FROM ?=
BACKUP_ARGS ?=
backup:  ## store + MLflow database and artifacts into the new folder DEST, with a manifest
	@test -n "$(DEST)" || { echo "make backup DEST=dir: name a new folder" >&2; exit 1; }
	MLFLOW_TRACKING_URI="$(MLFLOW_TRACKING_URI)" $(PY) backup.py backup "$(DEST)" $(BACKUP_ARGS)

restore:  ## put back what the backup in FROM holds (refuses a store in use without --force)
	@test -n "$(FROM)" || { echo "make restore FROM=dir: name the backup folder" >&2; exit 1; }
	MLFLOW_TRACKING_URI="$(MLFLOW_TRACKING_URI)" $(PY) backup.py restore "$(FROM)" $(BACKUP_ARGS)

clean:  ## remove caches
	rm -rf .pytest_cache __pycache__ tests/__pycache__
