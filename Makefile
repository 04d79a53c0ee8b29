# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch installs from local wheels in seconds; GPU clusters bring their own CUDA torch.
TORCH  ?= torch==2.13.0

.PHONY: demo test test-sweeps test-fast install browser clean

# Stamps of the two installs: the runtime alone (the demo), and the runtime with the test extras.
RUNTIME := $(VENV)/.runtime-installed
TESTING := $(VENV)/.test-installed

$(TESTING): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TESTING) $(RUNTIME)

install: $(TESTING)

# What the demo runs and nothing more (no test extras); the time it took is printed on its own line.
$(RUNTIME): pyproject.toml
	@start=$$(date +%s); \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/python -m pip install --quiet "$(TORCH)" && $(BIN)/python -m pip install --quiet -e . && \
	touch $@ && echo "install: $$(( $$(date +%s) - start )) s (once; not part of the demo's time)"

# The playground's browser test drives Debian's chromium through Playwright (Playwright's own
# browser download is not used). Installed with apt-get when missing (root, or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

demo: $(RUNTIME)
	@start=$$(date +%s); $(BIN)/llm-ray pipeline --config demo && \
	echo "demo: $$(( $$(date +%s) - start )) s from the command to its evaluation (install not included)"

# The import layers (pyproject.toml's import-linter contracts) first: seconds, and a broken layer fails fast.
test: install browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=10 -m "not sweep"

# Ray Tune sweeps of the debug model (several minutes); CI runs them after `make test`.
test-sweeps: install
	$(BIN)/python -m pytest -q --durations=5 -m sweep

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration"

clean:
	rm -rf runs .pytest_cache
