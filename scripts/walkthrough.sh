#!/usr/bin/env bash
# The README's command-line walkthrough, run in order: each example makes what the next needs.
#
#   scripts/walkthrough.sh [WORKDIR]          shrunk sizes (seconds; what CI and tests/test_walkthrough.py run)
#   FULL=1 scripts/walkthrough.sh [WORKDIR]   the README's sizes (minutes)
#
# WORKDIR (default: a new temporary folder) receives runs/; BASTION names the command
# (default: bastion). Every command is the README's, plus the shrink options in fast mode
# (argparse keeps the last value of a repeated option, so they override the README's sizes).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-$(mktemp -d -t bastion-walkthrough.XXXXXX)}"
B="${BASTION:-bastion}"
mkdir -p "$WORK" && cd "$WORK"

if [[ "${FULL:-0}" == "1" ]]; then
  TRAIN=() EVAL=() CERT=() MAX=200 STEPS=""
else
  TRAIN=(--epochs 1 --max 128) EVAL=(--max 20 --steps 2) CERT=(--n 200 --max 4) MAX=20 STEPS="steps = 2"
fi
step() { echo "+ $*" >&2; $B "$@"; }

# 1. train: a standard model, a PGD-trained model and a Gaussian-noise model (rerun to resume)
step train --objective standard --epochs 15 --out runs/std --quiet "${TRAIN[@]}"
step train --objective pgd --eps 0.2 --steps 7 --alpha 0.05 --epochs 15 --out runs/pgd --quiet "${TRAIN[@]}"
step train --objective gaussian --sigma 0.25 --epochs 15 --out runs/gauss --quiet "${TRAIN[@]}"

# 2. evaluate: clean + a suite of attacks at two radii, per class (resumable)
step evaluate --model runs/pgd/model.safetensors --attacks pgd,apgd-ce --eps 0.1,0.2 --out runs/eval-pgd --quiet "${EVAL[@]}"
step evaluate --model runs/std/model.safetensors --attacks pgd,apgd-ce --eps 0.1,0.2 --out runs/eval-std --quiet "${EVAL[@]}"

# 3. certify with randomized smoothing: the Gaussian model and, as a baseline, the standard one
#    (default --out names differ by model and sigma, so the two runs do not collide)
step certify --model runs/gauss/model.safetensors --sigma 0.25 --n0 100 --n 10000 --alpha 0.001 --skip 5 --quiet "${CERT[@]}"
step certify --model runs/std/model.safetensors --sigma 0.25 --n0 100 --n 10000 --alpha 0.001 --skip 5 --quiet "${CERT[@]}"

# 4. a TOML config (the README's example: evaluate the PGD model again, into its own run directory)
cat > eval-pgd.toml <<TOML
command = "evaluate"
model = "runs/pgd/model.safetensors"
attacks = "pgd,apgd-ce"
eps = "0.1,0.2"
max = $MAX
$STEPS
out = "runs/eval-from-config"
TOML
step run eval-pgd.toml --quiet
if [[ "${FULL:-0}" == "1" ]]; then
  step run "$REPO/experiments/configs/digits_pgd.toml" --quiet
  step quickstart --out runs/quickstart
fi

# 5. (re)write a run's report from its metrics.json
step report runs/eval-pgd --quiet

for f in runs/std/model.safetensors runs/pgd/model.safetensors runs/gauss/model.safetensors \
         runs/eval-pgd/report.html runs/eval-std/metrics.json runs/eval-from-config/metrics.json; do
  [[ -f "$f" ]] || { echo "walkthrough: missing $f" >&2; exit 1; }
done
[[ "$(ls -d runs/certify-* | wc -l)" -ge 2 ]] || { echo "walkthrough: certify runs collided" >&2; exit 1; }
echo "walkthrough: all examples ran in $WORK" >&2
