# t2i_train: `make train` (the main job on the embedded shapes data, CPU, minutes) and `make test`.
# Both create .venv and install everything on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch wheels: a CUDA build that also runs on CPU. Override for other platforms, e.g.
#   make install TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
OUT ?= outputs/make_train
DATA ?= data/shapes32
PYTEST_ARGS ?=
export PYTHONUNBUFFERED := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: help install train train-galip train-diffusion train-dalle3 train-gill train-cm3leon test test-install test-slow test-all lint format bench clean slurm-up slurm-down

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its dev tools

train: $(STAMP)  ## shapes data -> VQGAN -> tokens -> Muse -> samples -> prompt-following score (CPU, ~13 min)
	$(BIN)/python -m t2i_train.pipeline --data $(DATA) --out $(OUT)

train-galip: $(STAMP)  ## shapes data -> CLIP -> GALIP through it -> samples -> prompt-following score (CPU, ~12 min)
	$(BIN)/python -m t2i_train.pipeline --recipe galip --data $(DATA) --out outputs/make_train_galip

train-diffusion: $(STAMP)  ## shapes data -> VAE -> latents -> latent diffusion on descriptive captions -> samples -> score
	$(BIN)/python -m t2i_train.pipeline --recipe diffusion --data $(DATA) --out outputs/make_train_diffusion

train-dalle3: $(STAMP)  ## the DALL-E 3 ablation: CLIP, captioner, recaptioned shards, VAE, diffusion on 3 caption blends, table
	$(BIN)/python -m t2i_train.pipeline --recipe dalle3 --data $(DATA) --out outputs/make_train_dalle3

train-gill: $(STAMP)  ## GILL: CLIP, LM, VAE, diffusion -> GILL -> retrieval index -> decision head -> scores
	$(BIN)/python -m t2i_train.pipeline --recipe gill --data $(DATA) --out outputs/make_train_gill

train-cm3leon: $(STAMP)  ## CM3leon: VQGAN -> tokens -> CM3leon (text <-> image, CM3 objective) -> samples -> scores -> captions
	$(BIN)/python -m t2i_train.pipeline --recipe cm3leon --data $(DATA) --out outputs/make_train_cm3leon

test: $(STAMP)  ## the test suite CI runs (excludes slow/gpu tests; tests marked slurm use a local cluster)
	@bash slurm/local_cluster.sh install && bash slurm/local_cluster.sh start \
		|| echo "make: no local SLURM cluster here; tests marked slurm will be skipped"
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

slurm-up:  ## install slurm-wlm + munge when missing (apt, root) and start the local one-node SLURM cluster
	bash slurm/local_cluster.sh install && bash slurm/local_cluster.sh start

slurm-down:  ## stop the local SLURM cluster
	bash slurm/local_cluster.sh stop

test-install: $(STAMP)  ## pip install (not editable) into a fresh folder, then train from another directory (part of make test)
	$(BIN)/python -m pytest tests/integration/test_install.py $(PYTEST_ARGS)

test-slow: $(STAMP)  ## only the slow tests
	$(BIN)/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)  ## every CPU test
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check t2i_train tests benchmarks
	$(BIN)/ruff format --check t2i_train tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format t2i_train tests benchmarks
	$(BIN)/ruff check --fix t2i_train tests benchmarks

bench: $(STAMP)  ## benchmarks (speed/quality ratios, printed side by side)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
