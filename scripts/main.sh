#!/usr/bin/env bash
# The main job on the embedded default: the tiny study (the merging paper's experiments at CPU scale,
# about 10 min on a 2-core AMD EPYC VM with AVX-512, 26 on one without, 15-20 on the slower Intel Xeon ones: see
# docs/results/tiny*/report.md), writing runs/study/report.md. Re-running resumes. Extra arguments go to the command.
source "$(dirname "$0")/_venv.sh" ""
out=${OUT:-runs/study}
.venv/bin/vlmerge study --preset tiny --out "$out" "$@"
echo "report: $out/report.md"
