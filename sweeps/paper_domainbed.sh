#!/usr/bin/env bash
# The paper's DomainBed comparison (Shi et al. 2022, section 6): Fish, IDGM, ERM, CORAL on
# VLCS, PACS, OfficeHome, TerraIncognita, DomainNet, RotatedMNIST, ColoredMNIST; 20 hparams
# samples, 3 trials, all three selection methods (21120 jobs), resnet50_augmix=False,
# freeze_bn=True. On Slurm through submitit; the cluster settings come from the environment:
#
#   export DOMAINBED_DIR=/path/to/DomainBed
#   export DOMAINBED_FISH_SLURM_PARTITION=gpu DOMAINBED_FISH_SLURM_TIME=720 \
#          DOMAINBED_FISH_SLURM_GPUS=1 DOMAINBED_FISH_SLURM_CPUS=8 DOMAINBED_FISH_SLURM_MEM_GB=32 \
#          DOMAINBED_FISH_SLURM_ARRAY_PARALLELISM=64
#   bash sweeps/paper_domainbed.sh DATA_DIR [OUTPUT_DIR] [extra sweep options, e.g. --datasets PACS]
#
# Only training-domain validation? add --selection training: the jobs holding out one
# environment, without leave-one-domain-out's pairs (2.5 times fewer on 4-domain datasets,
# 7,440 jobs instead of 21,120 in all). On one machine: add --command_launcher local_parallel
# (one job per GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${1:?usage: paper_domainbed.sh DATA_DIR [OUTPUT_DIR] [sweep options]}
shift
OUT=outputs/paper_domainbed
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then  # an OUTPUT_DIR, not the first sweep option
    OUT=$1
    shift
fi
python -m sweeps dry_run --preset paper_domainbed --data_dir "$DATA" --output_dir "$OUT" "$@" | tail -n 3
python -m sweeps launch --preset paper_domainbed --data_dir "$DATA" --output_dir "$OUT" \
    --command_launcher submitit --submitit_folder "$OUT/submitit_logs" --submitit_no_wait "$@"
echo "Submitted. Follow with: python -m sweeps status --output_dir $OUT"
echo "Tables and plots when done (or any time): python -m sweeps report --input_dir $OUT"
