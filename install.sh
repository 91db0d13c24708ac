#!/usr/bin/env bash
# Installs shardproxy into ./.venv on Debian or Ubuntu, with whatever the machine lacks:
# a C compiler and Python headers (for the Cython ring), python3-venv, and PostgreSQL's server binaries.
#   ./install.sh          the proxy
#   ./install.sh --test   the proxy and what the test suite needs
set -euo pipefail
cd "$(dirname "$0")"

missing=()
command -v cc >/dev/null || missing+=(gcc)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || missing+=(python3-dev)
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! [ -x "$(pg_config --bindir 2>/dev/null)/initdb" ]; then
  missing+=(postgresql)
fi
command -v psql >/dev/null && command -v pgbench >/dev/null || missing+=(postgresql-client)

if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "installing ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/pip install -q -e ".[test]"
else
  .venv/bin/pip install -q -e .
fi
