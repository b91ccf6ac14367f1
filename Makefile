# Two commands do everything on a fresh machine: `make train` and `make test` (see README.md).
# Extra arguments for the Python entry points go in ARGS, e.g. make train ARGS="experiment=quick".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data slurm-deps train quick test bench sample figures lab weights clean

# The venv is rebuilt only when pyproject.toml changes, so every target is idempotent.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# The tests also need pytest and the optional extras they exercise (mlflow: logger=mlflow).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,mlflow,notebook]'
	touch $@

$(VENV)/.installed-lab: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[notebook,lab]'
	touch $@

setup: $(VENV)/.installed

# Offline machines: the Debian package has the real IDX files. Without root/apt, training falls
# back to torchvision's download, so this step never fails. oxygen-icon-theme's 16x16 colour icons
# are the real colour data of the data=folder test (tests/test_sources.py skips without them).
ICONS_DIR := /usr/share/icons/oxygen/base/16x16
data:
	@if [ ! -f $(DATASET_DIR)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null \
		|| echo "note: could not install dataset-fashion-mnist; training will try torchvision's download"; \
	fi
	@if [ ! -d $(ICONS_DIR) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq oxygen-icon-theme || (apt-get update -qq && apt-get install -y -qq oxygen-icon-theme)) >/dev/null \
		|| echo "note: could not install oxygen-icon-theme; the colour icon test will be skipped"; \
	fi

# The SLURM test (tests/test_slurm.py) starts its own one-node cluster from Debian's slurmctld,
# slurmd and munge. .ci/run installs them here (root + apt only); without them the test is skipped
# with its reason, so this step never fails either.
slurm-deps:
	@if ! { [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; } \
		&& [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		(apt-get install -y -qq slurmctld slurmd munge || (apt-get update -qq && apt-get install -y -qq slurmctld slurmd munge)) >/dev/null \
		|| echo "note: could not install slurmctld slurmd munge; the SLURM test will be skipped"; \
	fi

train: setup data
	$(PY) train.py $(ARGS)

quick: setup data
	$(PY) train.py experiment=quick $(ARGS)

# In parallel, one worker per CPU core (pytest-xdist): most tests wait on a python subprocess's start-up.
# loadgroup keeps the tests marked xdist_group together (the SLURM tests share one cluster).
test: setup $(VENV)/.installed-test data
	$(PY) -m pytest -q -n auto --dist loadgroup $(ARGS)

bench: setup data
	$(PY) bench.py $(ARGS)

# docs/masks.png and docs/receptive_field.png, drawn from the real model classes (tests/test_figures.py runs it).
figures: setup
	$(PY) scripts/figures.py

# The lab notebook (notebooks/pixelcnn_lab.ipynb), opened in Jupyter from the venv.
lab: setup $(VENV)/.installed-lab data
	$(PY) -m jupyter lab notebooks/pixelcnn_lab.ipynb

# How weights/quick_gated.ckpt was made: the conditional gated CPU preset (~13 min on 2 cores), exported to
# weights only. It writes outputs/quick_gated.ckpt (never over an existing file); the shipped one is a copy.
weights: setup data
	run=outputs/weights-$$(date +%Y%m%d-%H%M%S) && $(PY) train.py experiment=quick_gated hydra.run.dir=$$run \
		&& $(PY) scripts/export_weights.py $$run outputs/quick_gated.ckpt

clean:
	rm -rf $(VENV) outputs multirun bench.json
