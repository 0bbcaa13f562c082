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

.PHONY: help install train test test-slow test-all lint format bench clean slurm-up slurm-down

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its dev tools

train: $(STAMP)  ## shapes data -> VQGAN -> tokens -> Muse -> samples -> prompt-following score (CPU, ~15 min)
	@start=$$(date +%s); \
	test -f $(DATA)/dataset.json || $(BIN)/python -m t2i_train.shards synthetic --out $(DATA) \
		--count 20000 --val-count 512 --holdout-fraction 0.1 --seed 0 || exit 1; \
	$(BIN)/python -m t2i_train experiment=shapes_vqgan data.train_urls=$(DATA) hydra.run.dir=$(OUT)/vqgan || exit 1; \
	$(BIN)/python -m t2i_train.evaluate reconstruction checkpoint=$(OUT)/vqgan/checkpoints/last.ckpt \
		urls=$(DATA)/val output=$(OUT)/vqgan/psnr.json || exit 1; \
	for split in . val; do \
		$(BIN)/python -m t2i_train.encode checkpoint=$(OUT)/vqgan/checkpoints/last.ckpt \
			input_urls=$(DATA)/$$split output_dir=$(OUT)/tokens/$$split > /dev/null || exit 1; \
	done; \
	$(BIN)/python -m t2i_train experiment=shapes_muse data.train_urls=$(OUT)/tokens data.val_urls=$(OUT)/tokens/val \
		data.fields=[image_tokens] data.load_images=false \
		model.tokenizer_checkpoint=$(OUT)/vqgan/checkpoints/last.ckpt hydra.run.dir=$(OUT)/muse || exit 1; \
	for split in seen heldout; do \
		$(BIN)/python -m t2i_train.sample checkpoint=$(OUT)/muse/checkpoints/last.ckpt \
			prompts_file=$(DATA)/prompts_$$split.txt images_per_prompt=4 output_dir=$(OUT)/samples_$$split \
			> /dev/null || exit 1; \
		$(BIN)/python -m t2i_train.evaluate prompt_following samples_dir=$(OUT)/samples_$$split > /dev/null || exit 1; \
	done; \
	$(BIN)/python -m t2i_train.cli.report $(OUT) --seconds $$(( $$(date +%s) - start ))

test: $(STAMP)  ## the test suite CI runs (excludes slow/gpu tests; tests marked slurm use a local cluster)
	@bash slurm/local_cluster.sh install && bash slurm/local_cluster.sh start \
		|| echo "make: no local SLURM cluster here; tests marked slurm will be skipped"
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

slurm-up:  ## install slurm-wlm + munge when missing (apt, root) and start the local one-node SLURM cluster
	bash slurm/local_cluster.sh install && bash slurm/local_cluster.sh start

slurm-down:  ## stop the local SLURM cluster
	bash slurm/local_cluster.sh stop

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
