#!/usr/bin/env bash
# Installs shardproxy into ./.venv on Debian or Ubuntu, with whatever the machine lacks: a C compiler and Python
# headers (for the compiled ring and data path), python3-venv, and for the demo and the tests PostgreSQL's server
# binaries and client tools.
#   ./install.sh           the proxy and its demo (`shardproxy demo` starts local PostgreSQL servers)
#   ./install.sh --proxy   the proxy alone (and pg_dump, of PostgreSQL's client tools, for RESHARD)
#   ./install.sh --test    the proxy, the demo and what the test suite needs
set -euo pipefail
cd "$(dirname "$0")"

mode=demo
case "${1:-}" in
  "") ;;
  --proxy) mode=proxy ;;
  --test) mode=test ;;
  *) echo "usage: ./install.sh [--proxy | --test]" >&2; exit 2 ;;
esac

missing=()
command -v cc >/dev/null || missing+=(gcc)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || missing+=(python3-dev)
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ "$mode" != proxy ]; then
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! [ -x "$(pg_config --bindir 2>/dev/null)/initdb" ]; then
    missing+=(postgresql)
  fi
  command -v psql >/dev/null && command -v pgbench >/dev/null || missing+=(postgresql-client)
else
  command -v pg_dump >/dev/null || missing+=(postgresql-client)  # RESHARD gives a new shard the tables it lacks
fi

if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "installing ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
case "$mode" in
  proxy) .venv/bin/pip install -q -e . ;;
  demo) .venv/bin/pip install -q -e ".[demo]" ;;
  test) .venv/bin/pip install -q -e ".[test]" ;;
esac
