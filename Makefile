# Set-up, demo and tests. `make demo` and `make test` each create the
# environments first if they are missing or out of date.
PYTHON ?= python3.11
VENV := .venv
VENV_MACE := .venv-mace
PIP_QUIET := -q --disable-pip-version-check

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed $(VENV_MACE)/.installed

# Main environment: the JAX package plus the torch packages the parity tests
# compare against (nequip / sevenn need e3nn 0.6).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) -e ".[torch,test]"
	touch $@

# MACE reference environment: mace-torch pins e3nn 0.4.4, whose wigner_3j
# signs and codegen state differ from e3nn 0.6, so it lives apart.
$(VENV_MACE)/.installed: Makefile
	$(PYTHON) -m venv $(VENV_MACE)
	$(VENV_MACE)/bin/pip install $(PIP_QUIET) torch==2.13.0 mace-torch==0.3.16
	touch $@

# The demo needs only the main environment (SevenNet-0 is bundled in sevenn).
demo: $(VENV)/.installed
	$(VENV)/bin/sparse-eqv demo

test: setup
	$(VENV)/bin/python -m pytest -q -ra tests

test-fast: setup
	$(VENV)/bin/python -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV) $(VENV_MACE)
