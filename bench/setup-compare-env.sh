#!/usr/bin/env bash
# Builds the benchmark's own environment for bench/compare.py: torch 2.13.0 (the CPU wheel) first,
# then the launchers phalanx is compared with, constrained so that none replaces torch or pulls
# CUDA packages, then phalanx itself, editable from this checkout.
#
#     bash bench/setup-compare-env.sh                 # builds bench/.venv-compare
#     bash bench/setup-compare-env.sh /tmp/compare    # or any other path
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/bench/.venv-compare}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
"${pip[@]}" install --quiet torch==2.13.0

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" >"$constraints"
"${pip[@]}" install --quiet --constraint "$constraints" --requirement "$root/bench/requirements-compare.txt"
"${pip[@]}" install --quiet --constraint "$constraints" --editable "$root"

# Refuse an environment that would measure something else than the CPU torch phalanx is measured with.
installed_torch="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
case "$installed_torch" in
2.13.0*) ;;
*)
    echo "setup-compare-env: torch is $installed_torch, expected 2.13.0; a launcher replaced it" >&2
    exit 1
    ;;
esac
if "${pip[@]}" list 2>/dev/null | grep -i nvidia; then
    echo "setup-compare-env: CUDA packages were pulled in (above); remove them or rebuild $venv" >&2
    exit 1
fi
echo "benchmark environment ready: $venv (torch $installed_torch)"
echo "run: $venv/bin/python bench/compare.py"
