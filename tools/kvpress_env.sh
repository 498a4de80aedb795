#!/usr/bin/env bash
# NVIDIA kvpress on this machine's CPU, in its own venv, for the side-by-side
# compression harness (bench/kvpress_side_by_side.py) and the tests marked
# `kvpress` (tests/integration/test_kvpress_decisions.py).
#
#   tools/kvpress_env.sh install     make (or reuse) the venv; prints its python
#
# The venv lives outside the repository, in ${KVSCOPE_KVPRESS_VENV:-~/.cache/kvscope/kvpress}
# (~1 GB, ~2 minutes; reused while its stamp matches KVPRESS_VERSION).
# Recipe (verified on a 2-core CPU machine, 2026-12-07): kvpress 0.5.5 from PyPI asks
# for transformers>=4.56,<5.3 and any torch; pinning torch==2.13.0+cpu (the CPU build the
# vLLM venv uses, so pip reuses the same wheel) resolves to transformers 5.2.0.
set -euo pipefail
cd "$(dirname "$0")/.."

KVPRESS_VERSION=${KVPRESS_VERSION:-0.5.5}
TORCH_VERSION=${KVSCOPE_KVPRESS_TORCH:-2.13.0+cpu}
VENV=${KVSCOPE_KVPRESS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvscope/kvpress}
PY=${PYTHON:-python3}

install() {
  local stamp="$VENV/.kvscope-kvpress"
  local want="kvpress==$KVPRESS_VERSION torch==$TORCH_VERSION"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    echo "$VENV/bin/python"
    return 0
  fi
  echo "kvpress_env.sh: installing $want into $VENV (a few minutes)" >&2
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  nice -n 10 "$VENV/bin/python" -m pip install -q "kvpress==$KVPRESS_VERSION" "torch==$TORCH_VERSION" pytest >&2
  "$VENV/bin/python" -c "import kvpress, torch, transformers; print('kvpress', '$KVPRESS_VERSION', 'torch', torch.__version__, 'transformers', transformers.__version__)" >&2
  echo "$want" > "$stamp"
  echo "$VENV/bin/python"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  install) install ;;
  *) echo "usage: tools/kvpress_env.sh install" >&2; exit 2 ;;
esac
