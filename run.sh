#!/usr/bin/env bash
# kvscope's one entry point for a fresh checkout.
#   ./run.sh           set everything up, then open the window on the bundled demo model
#                      (no display: run the headless demo chat instead)
#   ./run.sh test      set up if needed, then lint, type-check, the engine-imports-no-Qt contract, tests
#   ./run.sh setup     only set up
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=${PYTHON:-python3}

system_packages() {
  # Optimized BLAS for MLX's CPU matmuls (~10x prefill) and the libraries Qt needs
  # even offscreen; Xvfb + xdotool for the real-input window tests. Debian/Ubuntu as root only; elsewhere kvscope still runs.
  [ "$(uname -s)" = Linux ] || return 0
  command -v apt-get >/dev/null || { echo "run.sh: no apt-get; install OpenBLAS yourself for faster CPU prefill" >&2; return 0; }
  local sudo=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null && sudo="sudo -n" || return 0; }
  local pkgs="libopenblas0-pthread libgl1 libegl1 libxkbcommon0 libxkbcommon-x11-0 libfontconfig1 libdbus-1-3 libglib2.0-0 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libxcb-render-util0 libxcb-image0 xvfb xdotool"
  if ! dpkg -s $pkgs >/dev/null 2>&1; then
    echo "run.sh: installing system packages: $pkgs" >&2
    $sudo apt-get update -qq >/dev/null 2>&1 || true
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null 2>&1 \
      || echo "run.sh: could not install $pkgs (continuing; kvscope info shows the BLAS in use)" >&2
  fi
}

setup() {
  local stamp="$VENV/.kvscope-setup"
  local want
  want=$(cat pyproject.toml | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  system_packages
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
}

run_tests() {
  export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
  local bin="$VENV/bin"
  echo "== ruff"; "$bin/ruff" check . && "$bin/ruff" format --check .
  echo "== mypy (engine/)"; "$bin/mypy"
  echo "== mypy (every package, against the real types of what it imports)"; "$bin/python" tools/typecheck.py engine ui app server attach lab
  echo "== import contracts"; "$bin/python" tools/lint_imports.py
  echo "== pytest"; "$bin/python" -m pytest -q "$@"
}

cmd=${1:-run}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  test) setup; run_tests "$@" ;;
  run)
    setup
    if [ "$(uname -s)" = Darwin ] || [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] || [ "${QT_QPA_PLATFORM:-}" = offscreen ]; then
      exec "$VENV/bin/kvscope" "$@"
    fi
    echo "run.sh: no display found; running the headless demo chat instead of the window" >&2
    exec "$VENV/bin/kvscope" chat \
      --prompt $'Notes:\nThe code for locker 7 is 4821.\nTeam Falcon meets in room 212.' \
      --prompt "What is the code for locker 7?" \
      --prompt "Which room does team Falcon meet in?" "$@"
    ;;
  *) echo "usage: ./run.sh [run|test|setup] [args...]" >&2; exit 2 ;;
esac
