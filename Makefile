# Set-up is part of every target: a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STORE  ?= stores/digits.zarr
CKPT   ?= stores/digits_cnn.safetensors

.PHONY: demo test bench venv clean

venv: $(VENV)/.installed

# The tested versions are pinned in constraints.txt; pyproject.toml keeps loose ranges for users.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

$(CKPT): | venv
	$(PY) -m oodcli train classifier --out $(CKPT)

demo: venv $(CKPT)
	$(PY) -m oodcli extract --model digits_cnn --weights $(CKPT) --benchmark digits --store $(STORE) --overwrite
	$(PY) -m oodcli score all --store $(STORE)
	$(PY) -m oodcli report --store $(STORE)

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/extract.py

clean:
	rm -rf $(STORE) $(CKPT)
