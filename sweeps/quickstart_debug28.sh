#!/usr/bin/env bash
# The plugin's main job on a built-in dataset: Fish and IDGM against ERM on DomainBed's
# Debug28, through DomainBed's own, unmodified sweep and collect_results.
#
#   DOMAINBED_DIR=/path/to/DomainBed bash sweeps/quickstart_debug28.sh [OUTPUT_DIR]
#
# Debug28 is random noise (DomainBed's smoke-test dataset): accuracies are not meaningful,
# the point is that every command, table and results file works. Rerunning the script
# resumes: finished jobs are kept, interrupted ones are deleted and run again.
set -euo pipefail

OUT=${1:-outputs/quickstart_debug28}
SWEEP=(--datasets Debug28 --algorithms ERM Fish IDGM
       --n_hparams 1 --n_trials 1 --single_test_envs --steps 30
       --hparams '{"batch_size": 8, "idgm_penalty_anneal_iters": 10, "gip_every": 5}'
       --data_dir "${TMPDIR:-/tmp}" --output_dir "$OUT" --command_launcher local --skip_confirmation)

mkdir -p "$OUT"
python -m domainbed.scripts.sweep delete_incomplete "${SWEEP[@]}" > /dev/null
echo "Training 9 short runs (3 algorithms x 3 test environments); full logs in $OUT/launch.log"
python -m domainbed.scripts.sweep launch "${SWEEP[@]}" 2>&1 | tee "$OUT/launch.log" \
    | grep --line-buffered -E "jobs|^Launch"
python -m domainbed.scripts.collect_results --input_dir "$OUT"
