#!/usr/bin/env bash
# Creates the reference trainer's own virtual environment (never the project's):
#   bash benchmarks/setup_reference_env.sh [VENV_DIR]      (default: benchmarks/.venv-trl)
# TRL 0.11.4 (the legacy PPOTrainer behind the published gpt2-sentiment results) needs
# transformers 4.x; the project runs on transformers 5, so the two cannot share one env.
# torch 2.13.0 is the CPU build (on this machine pip takes it from a local wheel); on a GPU
# machine set TORCH_SPEC to the CUDA build you want, e.g. TORCH_SPEC='torch==2.13.0'.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.venv-trl}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

"$python" -m venv "$venv"
# torch first, alone, so the resolver never swaps in another build for it.
"$venv/bin/python" -m pip install --quiet "$torch_spec"
# trl 0.11.4 requires accelerate, datasets, numpy, torch, transformers, tyro; rich is its
# optional console output; pyarrow and PyYAML are read by reference_trl.py itself.
"$venv/bin/python" -m pip install --quiet "$torch_spec" "transformers==4.46.3" "trl==0.11.4" \
    accelerate rich pyarrow PyYAML
"$venv/bin/python" -m pip check
HF_HUB_OFFLINE=1 "$venv/bin/python" - <<'PY'
import warnings
warnings.simplefilter("ignore")
import accelerate, numpy, torch, transformers, trl
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: F401  (the legacy API)
print(f"reference env ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}, accelerate {accelerate.__version__}, numpy {numpy.__version__}")
PY
echo "python: $venv/bin/python"
