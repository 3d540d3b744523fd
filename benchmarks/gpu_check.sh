#!/usr/bin/env bash
# The GPU check (issue 17) in one call: benchmarks/gpu_check.sh OUTDIR [--device cuda|cpu] [--quick] [--full] [...]
#
# Run from anywhere; it works in the repository root. Needs the kit made by
# `python benchmarks/gpu_check.py prepare` (gpu-kit/, or $GPU_KIT). Where the Python lacks the packages the
# core imports (pydantic, orjson, universal-pathlib, ...: the lent GPU machine, which has no network), it
# installs the kit's wheels with pip --no-index into a temporary folder and puts that on PYTHONPATH.
# Writes OUTDIR/gpu_check.json, OUTDIR/summary.txt and OUTDIR/gpu_check.log; stops within 8 minutes.
# Other options pass through to `gpu_check.py run` (see its --help). Environment: PYTHON (default: the
# repository's .venv/bin/python if there is one, else python3), GPU_KIT, GPU_CHECK_WORK (scratch, default
# /tmp/embedpipe-gpu-check), GPU_CHECK_WHEELS=auto|always|never, GPU_CHECK_TIMEOUT_S (default 480; 1200
# with --full).
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: $0 OUTDIR [--device cuda|cpu] [--quick] [--full] [gpu_check.py run options]" >&2
    exit 2
fi
OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd)
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
KIT=${GPU_KIT:-$REPO/gpu-kit}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0

has_core_packages() {
    "$PYTHON" - <<'EOF' 2>/dev/null
import importlib, sys
sys.path.insert(0, "benchmarks")
from gpu_kit.image import CARRIED_MODULES
for name in CARRIED_MODULES:
    importlib.import_module(name)
import pydantic, typing_extensions
assert int(pydantic.VERSION.split(".")[0]) >= 2
EOF
}

install=no
case ${GPU_CHECK_WHEELS:-auto} in
    always) install=yes ;;
    never) ;;
    *) has_core_packages || install=yes ;;
esac
if [[ $install == yes ]]; then
    shopt -s nullglob
    wheels=("$KIT"/wheels/*.whl)
    if [[ ${#wheels[@]} -eq 0 ]]; then
        echo "gpu_check.sh: $PYTHON lacks the core's packages and $KIT/wheels has no wheels:" \
             "run 'python benchmarks/gpu_check.py prepare' (with wheels) and carry $(basename "$KIT")" >&2
        exit 2
    fi
    SITE_ROOT=$(mktemp -d)
    trap 'rm -rf "$SITE_ROOT"' EXIT
    SITE=$SITE_ROOT/site
    echo "gpu_check.sh: installing ${#wheels[@]} carried wheels into $SITE (no network)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" "${wheels[@]}"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

limit=480  # the lent machine's 8 minutes; --full (a normal install: real MiniLM, Ray) gets 20
for arg in "$@"; do
    if [[ $arg == --full ]]; then limit=1200; fi
done
set +e
timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT_S:-$limit}" \
    "$PYTHON" "$REPO/benchmarks/gpu_check.py" run "$OUTDIR" --kit "$KIT" "$@" 2>&1 | tee "$OUTDIR/gpu_check.log"
status=${PIPESTATUS[0]}
set -e
if [[ $status -eq 124 ]]; then
    echo "gpu_check.sh: stopped at the time limit; $OUTDIR/gpu_check.json holds every section finished" >&2
fi
exit "$status"
