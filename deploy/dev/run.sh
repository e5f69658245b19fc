#!/usr/bin/env bash
# `make run`: start the dev nats-server (its own port, store in .data/), provision, run the platform.
# Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .data
NATS_URL="${CRM_NATS_URL:-nats://127.0.0.1:14222}"
export CRM_NATS_URL="$NATS_URL"

cargo build --release --bin crm

.tools/bin/nats-server -c nats/dev.conf -l .data/nats-server.log &
nats_pid=$!
trap 'kill "$nats_pid" 2>/dev/null; wait "$nats_pid" 2>/dev/null || true' EXIT

for _ in $(seq 1 50); do
  (exec 3<>/dev/tcp/127.0.0.1/14222) 2>/dev/null && break
  sleep 0.1
done

./target/release/crm provision
if ./target/release/crm all --help >/dev/null 2>&1; then
  exec_cmd=(./target/release/crm all)
  "${exec_cmd[@]}"
else
  echo "nats-server is up on $NATS_URL with every stream provisioned (monitoring: http://127.0.0.1:18222)."
  echo "Try: ./target/release/crm publish --type deal_won   (Ctrl-C to stop)"
  wait "$nats_pid"
fi
