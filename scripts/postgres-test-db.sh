#!/usr/bin/env bash
# Starts a throwaway PostgreSQL 15 on 127.0.0.1 (installing it with apt when
# missing) and prints the URL for EMEND_TEST_DATABASE_URL. Used by .ci/run.
set -euo pipefail
# A free loopback port unless PGPORT says otherwise.
PORT=${PGPORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
DIR=$(mktemp -d /tmp/emend-pg.XXXXXX)
chown postgres "$DIR"
run() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
run "$BIN/initdb -D $DIR/data -U emend --auth=trust -E UTF8" > /dev/null
run "$BIN/pg_ctl -D $DIR/data -o '-p $PORT -k $DIR -c listen_addresses=127.0.0.1' -l $DIR/log -w start" > /dev/null
run "$BIN/createdb -h 127.0.0.1 -p $PORT -U emend emend_test"
echo "postgres://emend@127.0.0.1:$PORT/emend_test"
