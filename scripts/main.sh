#!/usr/bin/env bash
# The main job on the embedded default: the tiny study (the merging paper's experiments at CPU scale,
# about 13 min on a 2-core AMD EPYC VM with AVX-512, 1.5-2.5x as long on the slower 2-core VMs: see
# docs/results/tiny*/report.md), writing runs/study/report.md. Re-running resumes. Extra arguments go to the command.
source "$(dirname "$0")/_venv.sh" ""
out=${OUT:-runs/study}
.venv/bin/vlmerge study --preset tiny --out "$out" "$@"
echo "report: $out/report.md"
