#!/usr/bin/env bash
# Creates (once) a Python virtual environment with the flex-mls client in it,
# for tests/flexmls/page_all.py, and prints the path of its python on stdout.
#
#   PY=$(scripts/flexmls-venv.sh) && "$PY" tests/flexmls/page_all.py BASE_URL TOKEN
#
# The venv lives at ${CREDPROXY_VENV:-target/flexmls-venv} (relative paths are
# taken from the repository's root). Running it again reuses the venv and
# installs nothing when flex-mls is already there at the pinned version.
# Everything but the python path goes to stderr.
set -euo pipefail

FLEXMLS_VERSION="0.1.1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CREDPROXY_VENV:-target/flexmls-venv}"
case "$venv" in
  /*) ;;
  *) venv="$root/$venv" ;;
esac
python="$venv/bin/python"

{
  # Tests may call this concurrently: one of them makes the venv, the others wait.
  mkdir -p "$(dirname "$venv")"
  exec 9>"$venv.lock"
  flock 9
  if [ ! -x "$python" ]; then
    echo "flexmls-venv: creating $venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
  fi
  installed="$("$python" -c 'import importlib.metadata as m; print(m.version("flex-mls"))' 2>/dev/null || true)"
  if [ "$installed" != "$FLEXMLS_VERSION" ]; then
    echo "flexmls-venv: installing flex-mls==$FLEXMLS_VERSION"
    "$python" -m pip install --disable-pip-version-check --quiet "flex-mls==$FLEXMLS_VERSION"
  fi
  "$python" -c 'import flex_mls' 
} 1>&2

echo "$python"
