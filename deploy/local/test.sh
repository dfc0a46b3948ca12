#!/usr/bin/env bash
# Checks the supply chain (cargo deny), then runs every test of the workspace against the real
# Postgres and the real Apache Kafka broker, starting (and if needed installing or fetching)
# both first. Extra arguments go to
# `cargo nextest run`.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_postgres
ensure_broker
ensure_build_deps
ensure_nextest
ensure_checkers
ensure_promtool
# tests/tests/tls.rs makes its certificates with deploy/local/dev-certs.sh.
ensure_openssl
cd "$REPO_ROOT"
# The supply-chain policy first: advisories, licences, duplicate versions, sources.
bash deploy/local/deny.sh
# Every test creates its own topics (prefix test-<uuid>); a reused broker would pile up thousands
# of partitions run after run and slow down. Earlier runs' topics go first.
cargo build --quiet -p tandemctl
log "deleting earlier test runs' topics from the broker"
"${CARGO_TARGET_DIR:-target}/debug/tandemctl" delete-topics --kafka-brokers "$TANDEM_KAFKA_BROKERS" \
  --starting-with test- || log "could not delete earlier test topics; going on"
log "running the tests"
exec cargo nextest run --workspace --no-fail-fast "$@"
