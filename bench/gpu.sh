#!/usr/bin/env bash
# Every GPU figure of the project in one run of under 8 minutes (bench/gpu_run.py, one JSON).
#   bench/gpu.sh --fetch-wheels   here, with the registry: the wheels the GPU machine lacks
#                                 (bench/gpu-requirements.txt, cp312 manylinux) -> bench/wheels
#   bench/gpu.sh [--sections S]   on the GPU machine (carry bench/wheels): installs them
#                                 offline, checks every import, runs; writes $OUT/gpu.json
#   bench/gpu.sh --rehearse       anywhere: the same run end to end on the CPU, tiny model (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/wheels
REQUIREMENTS=bench/gpu-requirements.txt
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

requirements() { grep -v '^\s*#' "$REQUIREMENTS" | grep -v '^\s*$'; }

case "${1:-}" in
  --fetch-wheels)
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    platforms=()
    for n in $(seq 17 35); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$WHEELS" \
      $(requirements)
    ls "$WHEELS"
    exit 0
    ;;
  --rehearse)
    shift
    exec timeout 900 "${PYTHON:-.venv/bin/python}" bench/gpu_run.py --rehearse \
      --out "$OUT/gpu-rehearsal.json" "$@"
    ;;
esac

# On the GPU machine: every carried wheel present, or stop now, naming what lacks.
missing=()
for requirement in $(requirements); do
  name=${requirement%%==*}
  version=${requirement##*==}
  wheel=$(echo "${name//-/_}" | tr '[:upper:]' '[:lower:]')
  compgen -G "$WHEELS/${wheel}-${version}-*.whl" >/dev/null || missing+=("$requirement")
done
if ((${#missing[@]})); then
  echo "bench/gpu.sh: no wheel in $WHEELS for: ${missing[*]}" >&2
  echo "  run 'bench/gpu.sh --fetch-wheels' where the registry is reachable, and carry $WHEELS" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/crce-site "$WHEELS"/*.whl
export PYTHONPATH=/tmp/crce-site:$PWD/src:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-device.txt"
exec timeout 480 python3 bench/gpu_run.py --out "$OUT/gpu.json" "$@"
