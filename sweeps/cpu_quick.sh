#!/usr/bin/env bash
# The CPU preset end to end: ERM and Fish on DomainBed's built-in Debug28 (random data,
# nothing to download), 2 hparams samples x 2 trials x 6 test-environment sets = 48 short
# jobs, all three model-selection methods, then the report.
#
#   DOMAINBED_DIR=/path/to/DomainBed bash sweeps/cpu_quick.sh [OUTPUT_DIR] [WORKERS]
#
# Rerunning resumes: finished jobs are kept, interrupted ones are trained again.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-outputs/cpu_quick}
WORKERS=${2:-$(nproc)}
python -m sweeps launch --preset cpu_quick --output_dir "$OUT" \
    --command_launcher local_parallel --workers "$WORKERS" --skip_confirmation
python -m sweeps report --input_dir "$OUT"
