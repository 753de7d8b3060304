#!/usr/bin/env bash
# Usage: .ci/venv.sh NAME CONSTRAINTS_FILE REQUIREMENT...
# Prints the python of a venv holding REQUIREMENT... pinned by CONSTRAINTS_FILE (a REQUIREMENT may carry pip options,
# e.g. "-c more-constraints.txt deepspeed": each is split into words, never globbed). The venv lives in
# ${POLYGLU_CI_CACHE:-~/.cache/polyglu-ci} under a key of its inputs (a file among the words included), and is reused
# while they are unchanged; it is built beside its final place and renamed when complete, so an interrupted build is
# never reused.
# POLYGLU_VENV_OPTIONS (e.g. --system-site-packages) go to `python -m venv` and into the key; POLYGLU_VENV_PYTHON
# (default python) is the interpreter the venv is made from.
set -euo pipefail -o noglob
name=$1 constraints=$2
shift 2
cache=${POLYGLU_CI_CACHE:-$HOME/.cache/polyglu-ci}
venv_options=${POLYGLU_VENV_OPTIONS:-}
venv_python=${POLYGLU_VENV_PYTHON:-python}
# shellcheck disable=SC2048  # the words of every requirement: a file among them (a -c constraints file) is keyed too
key=$( { "$venv_python" --version; cat "$constraints"; echo "$venv_options" "$@"
         for word in $*; do if [ -f "$word" ]; then cat "$word"; fi; done; } 2>&1 | sha256sum | cut -c1-16)
venv="$cache/venv-$name-$key"
if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$cache"
    partial=$(mktemp -d "$cache/.partial-$name-XXXXXX")
    # shellcheck disable=SC2086
    "$venv_python" -m venv $venv_options "$partial/venv" >&2
    "$partial/venv/bin/python" -m pip install --quiet --upgrade pip >&2
    for requirement in "$@"; do  # torch first, so that nothing else picks its version
        # shellcheck disable=SC2086  # word splitting is wanted: a requirement may carry pip options
        "$partial/venv/bin/python" -m pip install --quiet -c "$constraints" $requirement >&2
    done
    rm -rf "$venv"
    mv "$partial/venv" "$venv"
    rm -rf "$partial"
fi
echo "$venv/bin/python"
