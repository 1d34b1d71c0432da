# Shared by scripts/main.sh and scripts/test.sh: create or reuse .venv and install vlmerge into it.
# Usage: source scripts/_venv.sh "EXTRAS"   (e.g. "" or "test")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extras=${1:-}
spec="."
[ -n "$extras" ] && spec=".[$extras]"
stamp=".venv/.vlmerge-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch is pinned here: a CPU wheel of 2.13.0 is what this project is developed and tested on.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e "$spec"
  touch "$stamp"
fi
