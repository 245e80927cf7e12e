# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing and
# install the pinned stack into it; the stamp file makes a re-run on an installed venv cost seconds.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.embq-installed

.PHONY: setup demo test test-slow lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml serving/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	# torchrec's metadata pulls the multi-GB CUDA fbgemm-gpu, and recbole's pulls ray & co: neither
	# needs them (fbgemm-gpu-cpu above serves torchrec; only recbole's bundled data is read).
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . -e serving
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check embq serving tests scripts

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python scripts/bench_quantize.py --quick

clean:
	rm -rf $(VENV) runs
