#!/usr/bin/env bash
# The GPU part of the big-model work, as one prepared script (run from the repository root
# on a machine with a CUDA GPU; every figure here is "not measured: no GPU" until it runs):
#   1. the full-depth 7B (phi fixed8 and int) through the real CLI, streamed, peak memory by
#      torch.cuda.max_memory_allocated (lrqat's phase meter reads it on a GPU);
#   2. one 7B-shaped layer's LR-QAT/LoRA forward+backward at 512, 2,048 and 8,192 tokens,
#      with the fused kernels among the variants;
#   3. the tests (CUDA paths run where a GPU exists).
# Results land in benchmarks/results/{big_models,layer_tokens}.{json,md} with the machine named.
# Expected: 7b-fixed8 peak <= 16 GiB (paper: 20.5 GB), 7b-int <= 13 GiB; LR-QAT/LoRA falling
# towards 1.15 as tokens grow. Budget: about 10 minutes on an H200 (a 7B checkpoint write
# of 13.5 GB included).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
$PY benchmarks/big_models.py --variants 7b-fixed8,7b-int --steps 4 --output runs/big_models_gpu \
    --checkpoints runs/big_models_gpu/checkpoints
$PY benchmarks/layer_tokens.py --tokens 512,2048,8192 --repeats 5
$PY -m pytest -q -x tests/test_layers.py tests/test_streaming_load.py tests/test_fit.py
