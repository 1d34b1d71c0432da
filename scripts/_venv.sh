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

# The BEiT-3 reference (tests/models/refs/beit3_ref.py: torchscale's own BEiT3) for the importer's exactness tests.
# Installed with --no-deps, and not declared in pyproject.toml (whose mtime re-triggers the install above): torchscale
# 0.3.0 requires timm==0.6.13, which pulls torchvision, which pins its own torch build and would replace torch 2.13.0;
# with deps, pip would also be free to touch torch for fairscale (torch>=1.6) and torchscale (torch>=1.8). The only
# other module torchscale's BEiT3 path imports is numpy, already a dependency (no einops in 0.3.0). The test puts a
# stand-in for the one timm function used (timm.models.layers.drop_path) into sys.modules. fairscale 0.4.0 is an sdist
# (built here, pure Python). Own stamp, named after the pins: a pin change reinstalls, and existing venvs pick this up
# without touching pyproject.toml. Not fatal: without it the reference tests skip with the reason.
case ",$extras," in
  *,test,*)
    ref_stamp=".venv/.vlmerge-reference-torchscale-0.3.0-fairscale-0.4.0"
    if [ ! -f "$ref_stamp" ]; then
      if .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
          "torchscale==0.3.0" "fairscale==0.4.0"; then
        touch "$ref_stamp"
      else
        echo "warning: could not install torchscale/fairscale; the BEiT-3 reference tests will be skipped" >&2
      fi
    fi
    ;;
esac
