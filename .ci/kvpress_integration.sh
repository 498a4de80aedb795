#!/usr/bin/env bash
# kvscope's presses against NVIDIA kvpress itself: install kvpress + CPU torch in
# their own venv (cached outside the repo, ~1 GB, a few minutes the first time,
# reused after), then run the tests marked `kvpress`
# (tests/integration/test_kvpress_live.py): kvpress re-run on the fixture's
# episode must still make the decisions tests/fixtures/kvpress-*.json records,
# the decisions the default suite holds kvscope to.
#   KVSCOPE_KVPRESS_VENV   where the venv lives (default ~/.cache/kvscope/kvpress)
#   KVSCOPE_SKIP_KVPRESS=1 skip this step
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${KVSCOPE_SKIP_KVPRESS:-0}" = 1 ]; then echo "kvpress_integration: skipped (KVSCOPE_SKIP_KVPRESS=1)"; exit 0; fi
KVPRESS_PY=$(nice -n 10 tools/kvpress_env.sh install 2> >(grep -v "is ignored" >&2))
echo "== kvpress integration (kvpress at $KVPRESS_PY)"
KVSCOPE_KVPRESS_PYTHON="$KVPRESS_PY" exec .venv/bin/python -m pytest -q -m kvpress -p no:cacheprovider tests/integration/test_kvpress_live.py
