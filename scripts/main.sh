#!/usr/bin/env bash
# The main job on the embedded default: see README.md. Extra arguments go to the command.
source "$(dirname "$0")/_venv.sh" ""
out=${OUT:-runs/main}
mkdir -p "$out"
.venv/bin/vlmerge data preview --out "$out/preview.png"
.venv/bin/vlmerge model info --preset vit-base | tee "$out/model_table.md"
.venv/bin/vlmerge model info --preset tiny --heads itc,itm,mlm --vocab-size 1000
echo "wrote $out/preview.png and $out/model_table.md"
