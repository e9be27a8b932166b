VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qdrop_mm_installed

.PHONY: setup test demo
setup: $(STAMP)

$(STAMP): setup.py requirements/lock.txt tools/setup_env.sh
	VENV=$(VENV) bash tools/setup_env.sh
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

demo: $(STAMP)
	$(PY) tools/demo.py
