# make run: set up .venv and calibrate the shipped readings.  make test: set up .venv and run the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: install
	$(BIN)/thermocal run

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) data/runs

bench: install
	$(BIN)/python benchmarks/run.py
