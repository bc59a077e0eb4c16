#!/usr/bin/env bash
# Set up .venv, start the single-node SLURM cluster the SLURM tests submit to, type-check, run the test suite.
# Starting SLURM needs root (apt-get, daemons); elsewhere, or with SKIP_SLURM=1, the SLURM cluster
# tests are skipped. Extra arguments go to pytest. The cluster is left running: stop it with
# bash scripts/slurm/stop-local-slurm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
if [ "$(id -u)" = 0 ] && [ "${SKIP_SLURM:-0}" != 1 ]; then
  # --clean: a test cluster starts with no saved jobs (held or finished ones count against MaxJobCount)
  bash scripts/slurm/start-local-slurm.sh --accounting --clean
  export REQUIRE_SLURM=1  # from here on, a missing cluster fails the SLURM tests instead of skipping them
fi
.venv/bin/python -m mypy orchestrator stages  # types (config: pyproject.toml, with pydantic's plugin)
exec .venv/bin/python -m pytest -q "$@"
