#!/usr/bin/env bash
# `make bench`: a throwaway nats-server (own port, temp store) and crm-bench against it; when
# PostgreSQL answers at $CRM_TEST_POSTGRES_URL, a throwaway database there too, so the projector is
# measured on SQLite (synchronous FULL and NORMAL) and PostgreSQL in the same run.
set -euo pipefail
cd "$(dirname "$0")/../.."
store=$(mktemp -d)
admin=${CRM_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
database="crm_bench_$$"
postgres_args=()
cleanup() {
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    rm -rf "$store"
    if [ ${#postgres_args[@]} -gt 0 ]; then
        psql "$admin" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null 2>&1 || true
    fi
}
.tools/bin/nats-server -a 127.0.0.1 -p 14333 -js -sd "$store" -l "$store/nats.log" &
pid=$!
trap cleanup EXIT
if command -v psql >/dev/null && psql "$admin" -qc "CREATE DATABASE $database" >/dev/null 2>&1; then
    postgres_args=(--postgres-url "${admin%/*}/$database")
else
    echo "PostgreSQL not reachable at $admin: the projector is measured on SQLite only" >&2
fi
for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/14333) 2>/dev/null && break; sleep 0.1; done
CRM_LOG=${CRM_LOG:-warn} ./target/release/crm-bench --nats-url nats://127.0.0.1:14333 \
    --events "${1:-50000}" --json target/bench.json "${postgres_args[@]}"
