#!/usr/bin/env bash
# Runs every test of the workspace against the real Postgres and the real Apache Kafka broker,
# starting (and if needed installing or fetching) both first. Extra arguments go to
# `cargo nextest run`.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_postgres
ensure_broker
ensure_build_deps
ensure_nextest
cd "$REPO_ROOT"
log "running the tests"
exec cargo nextest run --workspace --no-fail-fast "$@"
