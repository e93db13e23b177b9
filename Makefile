# one2345pp — every target sets up what it needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
CLI         := $(VENV)/bin/one2345pp
# The CPU build of torch (this pin matches the wheel kept on the development machines; an unpinned `torch` pulls a
# multi-GB CUDA build). GPU clusters install through environment.yml instead.
TORCH_SPEC  ?= torch==2.13.0
STAMP       := $(VENV)/.installed
# The Khronos glTF validator (npm) that the texture tests and exports are checked with; kept out of git in .gl/.
GLTF_VALIDATOR ?= gltf-validator@2.0.0-dev.3.10
GL_STAMP    := .gl/.installed
# Blender as a Python module, in a virtualenv of its own (about 1 GB), for `make bench-blender` only.
BLENDER_VENV    ?= .venv-blender
BPY_SPEC        ?= bpy==5.0.1
BLENDER_BASE_PY ?= python3.11
.PHONY: bench-blender

STAGE       ?=
CONFIG      ?=
RUN         ?=
OUT         ?=
ARGS        ?=
N           ?= 64
WORKERS     ?= $(shell nproc 2>/dev/null || echo 2)
DATA_DIR    ?= data/procedural
DEMO_DIR    ?= outputs/demo
GSO_DIR     ?=
PIPELINE    ?=
EVAL_OUT    ?= outputs/eval-gso
# the shipped tiny multi-view model (make ship-multiview) and the held-out objects it is measured on
SHIPPED_MULTIVIEW ?= checkpoints/tiny/multiview
# the training phases, each OBJECTS:STEPS: SHIP_DATA is built (or extended: a rerun skips the objects it holds, and
# object i of a seed is always the same) to OBJECTS objects, then the run trains (resuming ckpts/last.ckpt when it
# holds one) on one cosine schedule recomputed to end at STEPS. "8192:12000 8192:20000 8192:28000" trains to 12000,
# then resumes twice (warm restarts at 0.41 and 0.27 of the peak rate; docs/multiview_conditioning.md section 24)
SHIP_PHASES ?= 8192:12000 8192:20000 8192:28000
SHIP_DATA   ?= data/ship-multiview
FOLLOW_SEED ?= 3000
FOLLOW_DATA ?= data/heldout-follow
FOLLOW_OUT  ?= outputs/bench-multiview-follow
SWEEP       ?=
TRIALS      ?= 4
# What the GPU machine lacks (it reaches no package registry; Python 3.12, x86_64): wheels downloaded here into
# GPU_WHEELS_DIR (ignored by git, carried to the machine; < 64 MiB with the scene file). omegaconf 2.4 vendors its
# antlr4 runtime; diffrp-nvdiffrast is nvdiffrast's source, compiled there with nvcc on first use.
GPU_WHEELS_DIR ?= .whl
GPU_WHEELS  ?= diffusers==0.42.1 omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7 trimesh==5.2.0 \
               xatlas==0.0.11 diffrp-nvdiffrast==0.3.3.1
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
               --platform manylinux2014_x86_64 --platform manylinux1_x86_64

.PHONY: help setup system-deps test test-fast demo data train-stage sweep export eval-gso lint clean \
        bench-data bench-multiview bench-sparse bench-recon bench-texture bench-pipeline bench-multiview-follow \
        bench-view-ceiling bench-retrieval-ceiling \
        ship-multiview
.PHONY: bench-gpu gpu-wheels

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'
	@echo "  variables: STAGE=multiview|coarse|fine|texture CONFIG=path ARGS=\"key=value ...\" N=$(N) WORKERS=$(WORKERS)"

system-deps: ## system libraries the stack needs (libusb-1.0 for open3d)
	@if ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then \
		echo "libusb-1.0: present"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "installing libusb-1.0-0 (needed by open3d)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0 >/dev/null; \
	else \
		echo "error: open3d needs the system library libusb-1.0. Install it as root, e.g." >&2; \
		echo "       sudo apt-get install libusb-1.0-0   (Debian/Ubuntu)   or   conda install -c conda-forge libusb" >&2; \
		exit 1; \
	fi

$(STAMP): setup.cfg pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[dev,cpu]'
	@touch $(STAMP)
	@echo "virtualenv ready: $(VENV)"

$(GL_STAMP):
	@command -v npm >/dev/null || { echo "error: npm (Node.js >= 18) is needed for the glTF validator (tools/validate_gltf.js); install nodejs and npm, e.g. sudo apt-get install nodejs npm" >&2; exit 1; }
	npm install --prefix .gl --no-audit --no-fund --silent $(GLTF_VALIDATOR)
	@touch $(GL_STAMP)

setup: $(STAMP) $(GL_STAMP) ## virtualenv .venv with the package (editable), CPU torch and dev tools; system libraries when root

test: $(STAMP) $(GL_STAMP) ## the test suite (CPU, a few minutes)
	$(PY) -m pytest -q tests

test-fast: $(STAMP) $(GL_STAMP) ## the suite without the tests marked slow (about 1.5 min on 2 busy cores)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP) ## end to end: procedural data, the 4 tiny stages, pipeline, infer, eval -> DEMO_DIR/index.html [ARGS=--force]
	$(CLI) demo --config experiments/demo.yaml --out $(DEMO_DIR) $(ARGS)

data: $(STAMP) ## build procedural shards: N=64 DATA_DIR=data/procedural WORKERS=nproc ARGS="key=value ..."
	$(CLI) data build --source procedural --num-objects $(N) --out $(DATA_DIR) --workers $(WORKERS) $(ARGS)

train-stage: $(STAMP) ## train one stage: STAGE=... [CONFIG=path, default experiments/STAGE.yaml] [ARGS="k=v ..."]
	@test -n "$(STAGE)" || { echo "usage: make train-stage STAGE=<stage> [CONFIG=path] [ARGS=\"key=value ...\"]" >&2; exit 2; }
	$(CLI) train --stage $(STAGE) --config $(if $(CONFIG),$(CONFIG),experiments/$(STAGE).yaml) $(ARGS)

sweep: $(STAMP) ## W&B sweep (offline: the commands): STAGE=... [SWEEP=file, default experiments/sweeps/STAGE.yaml] [TRIALS=4]
	@test -n "$(STAGE)$(SWEEP)" || { echo "usage: make sweep STAGE=<stage> [SWEEP=file] [TRIALS=n]" >&2; exit 2; }
	@f="$(if $(SWEEP),$(SWEEP),experiments/sweeps/$(STAGE).yaml)"; \
	test -f "$$f" || { echo "error: sweep file not found: $$f" >&2; exit 2; }; \
	if [ -n "$$WANDB_API_KEY" ]; then \
		$(VENV)/bin/wandb sweep "$$f" || exit 1; \
		echo "start agents with the 'wandb agent ENTITY/PROJECT/ID' printed above (one per GPU), or one trial per SLURM array task:"; \
		echo "  sbatch --array=0-$$(( $(TRIALS) - 1 )) experiments/slurm/sweep.slurm ENTITY/PROJECT/ID"; \
	else \
		echo "WANDB_API_KEY is not set: run the trials with the local agent (each trial logs an offline W&B run under its run directory):"; \
		echo "  $(CLI) sweep $$f --trials $(TRIALS)"; \
		echo "on a SLURM cluster, one trial per array task (task i samples with seed i):"; \
		echo "  sbatch --array=0-$$(( $(TRIALS) - 1 )) experiments/slurm/sweep.slurm $$f"; \
		echo "set WANDB_API_KEY and rerun to create the sweep on the W&B server instead"; \
	fi

export: $(STAMP) ## export a trained stage: STAGE=... RUN=checkpoints/STAGE/NAME [OUT=dir, default RUN/export]
	@test -n "$(STAGE)" -a -n "$(RUN)" || { echo "usage: make export STAGE=<stage> RUN=<run dir> [OUT=dir]" >&2; exit 2; }
	$(CLI) export --stage $(STAGE) --run $(RUN) $(if $(OUT),--out $(OUT),)

eval-gso: $(STAMP) ## score a pipeline on GSO: GSO_DIR=... PIPELINE=... [EVAL_CONFIG=experiments/eval/gso.yaml LIMIT=N]
	@test -n "$(GSO_DIR)" -a -n "$(PIPELINE)" || { echo "usage: make eval-gso GSO_DIR=path PIPELINE=path [EVAL_CONFIG=yaml] [LIMIT=N] [ARGS=\"key=value ...\"]" >&2; exit 2; }
	$(CLI) eval --dataset gso --input $(GSO_DIR) --pipeline $(PIPELINE) --out $(EVAL_OUT) \
		--config $(if $(EVAL_CONFIG),$(EVAL_CONFIG),experiments/eval/gso.yaml) $(if $(LIMIT),--limit $(LIMIT),) $(ARGS)

# lint-imports reads the package from PYTHONPATH=src: this checkout's code, whichever checkout the venv installed
lint: $(STAMP) ## ruff over the code, and the import contract of the layers (.importlinter)
	$(VENV)/bin/ruff check src tests benchmarks data_pipelines
	PYTHONPATH=src $(VENV)/bin/lint-imports --no-cache

bench-data: $(STAMP) ## data pipeline throughput table
	$(PY) benchmarks/bench_data.py $(ARGS)

bench-multiview: $(STAMP) ## multi-view stage: training samples/s, seconds per 28-step sample
	$(PY) benchmarks/bench_multiview.py $(ARGS)

bench-sparse: $(STAMP) ## sparse convolutions (torch backend / torchsparse) against dense conv3d at 128^3
	$(PY) benchmarks/bench_sparse.py $(ARGS)

bench-recon: $(STAMP) ## train tiny coarse+fine, reconstruct 16 held-out objects: F-Score, Chamfer, shell IoU
	$(PY) benchmarks/bench_recon.py $(ARGS)

bench-texture: $(STAMP) $(GL_STAMP) ## texture refinement seconds, bake, held-out PSNR (CPU / nvdiffrast)
	$(PY) benchmarks/bench_texture.py $(ARGS)

bench-blender: $(STAMP) ## Blender (bpy, Cycles CPU) vs the ray caster: silhouette IoU, colour difference, seconds per object
	test -x $(BLENDER_VENV)/bin/python || ($(BLENDER_BASE_PY) -m venv $(BLENDER_VENV) && $(BLENDER_VENV)/bin/pip install $(BPY_SPEC))
	$(PY) benchmarks/bench_blender.py --blender-python $(BLENDER_VENV)/bin/python $(ARGS)

bench-multiview-follow: $(STAMP) ## does stage 1 follow its input: held-out identification, mask IoU, PSNR, cond_gain [PIPELINE=export]
	@# held-out objects built before the tiny data recipe last changed (say, its framing) are built again
	@if [ ! -f $(FOLLOW_DATA)/manifest.jsonl ] || [ experiments/tiny/data.yaml -nt $(FOLLOW_DATA)/manifest.jsonl ]; then \
		rm -rf $(FOLLOW_DATA) && $(CLI) data build --source procedural --num-objects 16 \
		--out $(FOLLOW_DATA) --config experiments/tiny/data.yaml --workers $(WORKERS) \
		data.procedural.seed=$(FOLLOW_SEED) data.cond_samples=1; fi
	$(PY) benchmarks/bench_multiview_follow.py --pipeline $(if $(PIPELINE),$(PIPELINE),$(SHIPPED_MULTIVIEW)/export) \
		--shards '$(FOLLOW_DATA)/shard-*.tar' --out $(FOLLOW_OUT) $(ARGS)

bench-view-ceiling: $(STAMP) ## how much one condition view determines: mask IoU of a perfect sampler (procedural objects)
	$(PY) benchmarks/bench_view_ceiling.py $(ARGS)

bench-retrieval-ceiling: $(STAMP) ## mask IoU of copying the nearest training examples (SHIP_DATA) on held-out objects (FOLLOW_DATA)
	$(PY) benchmarks/bench_retrieval_ceiling.py --train '$(SHIP_DATA)/shard-*.tar' --heldout '$(FOLLOW_DATA)/shard-*.tar' \
		--pipeline $(if $(PIPELINE),$(PIPELINE),$(SHIPPED_MULTIVIEW)/export) $(ARGS)

ship-multiview: $(STAMP) ## retrain the shipped tiny multi-view model -> checkpoints/tiny/multiview (+ MODEL_CARD.md)
	@test -n "$(strip $(SHIP_PHASES))" || { echo "error: SHIP_PHASES is empty (OBJECTS:STEPS entries)" >&2; exit 1; }; \
	for phase in $(SHIP_PHASES); do \
		case "$$phase" in *[!0-9:]*|*:*:*|:*|*:) bad=1;; *:*) bad=;; *) bad=1;; esac; \
		test -z "$$bad" || { echo "error: SHIP_PHASES entry '$$phase' is not OBJECTS:STEPS (two whole numbers)" >&2; exit 1; }; \
	done
	@run=checkpoints/multiview/ship; start=$$(date +%s); \
	for phase in $(SHIP_PHASES); do \
		objects=$${phase%%:*}; steps=$${phase##*:}; \
		$(CLI) data build --source procedural --num-objects $$objects --out $(SHIP_DATA) \
			--config experiments/tiny/data.yaml --workers $(WORKERS) || exit 1; \
		resume=$$(test -f $$run/ckpts/last.ckpt && echo run.resume=last); \
		$(CLI) train --stage multiview --config experiments/tiny/multiview.yaml data.train_shards=$(SHIP_DATA) \
			run.name=ship trainer.max_steps=$$steps $$resume $(ARGS) || exit 1; \
	done; \
	seconds=$$(( $$(date +%s) - start )); \
	$(CLI) export --stage multiview --run $$run || exit 1; \
	$(MAKE) --no-print-directory bench-multiview-follow PIPELINE=$$run/export ARGS= || exit 1; \
	$(PY) tools/ship_run.py --run $$run --data $(SHIP_DATA) --bench $(FOLLOW_OUT)/follow.json \
		--train-seconds $$seconds --out $(SHIPPED_MULTIVIEW) \
		--command "make ship-multiview SHIP_PHASES='$(SHIP_PHASES)'$(if $(ARGS), ARGS='$(ARGS)',)"

bench-pipeline: $(STAMP) ## seconds per stage for one image: the demo's tiny pipeline (CPU), full preset (CUDA)
	$(PY) benchmarks/bench_pipeline.py $(ARGS)

bench-gpu: ## every GPU row in one call -> outputs/bench-gpu/bench_gpu.{json,md} (ARGS=--dry-run: CPU, tiny sizes)
	$(PY) benchmarks/bench_gpu.py $(ARGS)

gpu-wheels: ## GPU_WHEELS_DIR=.whl: the wheels the GPU machine lacks + bench-gpu's CPU-rendered scene (< 64 MiB)
	rm -f $(GPU_WHEELS_DIR)/*.whl  # one version of each: two stop the install there
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_WHEELS_DIR) $(GPU_WHEELS)
	@test -x $(PY) || { echo "error: $(PY) is missing: the scene file needs the virtualenv (make setup)" >&2; exit 1; }
	$(PY) benchmarks/bench_gpu.py --write-scene $(GPU_WHEELS_DIR)/bench_gpu_scene.npz
	@ls -l $(GPU_WHEELS_DIR); size=$$(du -sb $(GPU_WHEELS_DIR) | cut -f1); \
	echo "$(GPU_WHEELS_DIR): $$((size / 1048576)) MiB ($$size bytes; the device carries at most 64 MiB)"; \
	test $$size -lt 67108864 || { echo "error: $(GPU_WHEELS_DIR) is over 64 MiB" >&2; exit 1; }

clean: ## remove build outputs (keeps .venv and data)
	rm -rf build dist src/*.egg-info .pytest_cache .ruff_cache
