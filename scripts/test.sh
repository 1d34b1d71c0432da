#!/usr/bin/env bash
# The test suite: installs vlmerge with its test extra into .venv, then runs ruff and pytest.
source "$(dirname "$0")/_venv.sh" "test"
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
