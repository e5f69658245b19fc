#!/usr/bin/env bash
# `make bench`: a throwaway nats-server (own port, temp store) and crm-bench against it.
set -euo pipefail
cd "$(dirname "$0")/../.."
store=$(mktemp -d)
.tools/bin/nats-server -a 127.0.0.1 -p 14333 -js -sd "$store" -l "$store/nats.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$store"' EXIT
for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/14333) 2>/dev/null && break; sleep 0.1; done
CRM_LOG=${CRM_LOG:-warn} ./target/release/crm-bench --nats-url nats://127.0.0.1:14333 --events "${1:-50000}" --json target/bench.json
