# Two commands for a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
FMNIST := .data/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: demo test install data bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[models,test,tvm]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package, unpacked into .data/ (no root install).
$(FMNIST):
	@mkdir -p .data/deb
	@cd .data/deb && { apt-get download dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get download dataset-fashion-mnist >/dev/null 2>&1; }; } && \
	  dpkg-deb -x dataset-fashion-mnist_*.deb x && mkdir -p ../fashion-mnist && \
	  cp x/usr/share/datasets/fashion-mnist/*.gz ../fashion-mnist/ && rm -rf x *.deb || \
	  echo "note: could not fetch Fashion-MNIST (apt-get download dataset-fashion-mnist); tests that need it will skip"

data: $(FMNIST)

demo: install
	HF_HUB_OFFLINE=1 $(PY) bench/demo.py

test: install
	-@$(MAKE) --no-print-directory data
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not gpu" tests

bench: install data
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	HF_HUB_OFFLINE=1 $(PY) bench/accuracy.py

clean:
	rm -rf $(VENV) .data out
