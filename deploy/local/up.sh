#!/usr/bin/env bash
# Starts the whole local stack: Postgres, the broker, the topics and the four services, serving
# gRPC over TLS with a development CA ($TANDEM_HOME/tls, made by dev-certs.sh), and waits until
# every service reports healthy. Safe to run again: what is running is reused.
#
# --observability: also Jaeger (traces, OTLP on 127.0.0.1:4317, API on 127.0.0.1:16686) and
# Prometheus (127.0.0.1:9090, with deploy/prometheus's rules), built from the Go module proxy
# the first time; the services export their spans and metrics to Jaeger. Services already
# running keep their settings: run down.sh first.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

observability=false
for argument in "$@"; do
  case "$argument" in
    --observability) observability=true ;;
    *) die "unknown argument $argument (up.sh takes --observability)" ;;
  esac
done

export TANDEM_DATABASE_NAME="${TANDEM_DATABASE_NAME:-tandem}"
export TANDEM_TOPIC_PREFIX="${TANDEM_TOPIC_PREFIX:-tandem}"
# Local development secrets, generated once and kept in $TANDEM_HOME. Never use them in production.
secrets="$TANDEM_HOME/secrets.env"
if [[ ! -f "$secrets" ]]; then
  umask 077
  {
    echo "TANDEM_OPERATOR_TOKEN=op_$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    echo "TANDEM_NETWORK_KEY=1:$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
  } >"$secrets"
fi
# The service token the internal APIs require of the gateway (added to older secrets files too).
if ! grep -q '^TANDEM_SERVICE_TOKEN=' "$secrets"; then
  (umask 077; echo "TANDEM_SERVICE_TOKEN=svc_$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" >>"$secrets")
fi
# What a client of the local stack trusts: the development CA made below. Written on every run,
# so that a moved checkout or another TANDEM_HOME points at the right file.
(umask 077; grep -v '^TANDEM_TLS_CA=' "$secrets" >"$secrets.new" || true
 printf 'TANDEM_TLS_CA=%q\n' "$TANDEM_HOME/tls/ca.pem" >>"$secrets.new"
 mv "$secrets.new" "$secrets")
set -a; source "$secrets"; set +a

ensure_dev_certs
ensure_postgres
ensure_broker
ensure_build_deps
if $observability; then
  start_observability
fi

cd "$REPO_ROOT"
log "building the services (cargo build --release)"
cargo build --release --quiet -p merchant-gateway -p referral-ledger -p settlement -p notifications -p tandemctl
bin="$CARGO_TARGET_DIR/release"

"$bin/tandemctl" create-database --database-url "$DATABASE_URL" --name "$TANDEM_DATABASE_NAME"
service_db_url="$("$bin/tandemctl" database-url --database-url "$DATABASE_URL" --name "$TANDEM_DATABASE_NAME")"
# Partitions, replication factor and retention come from TANDEM_ACTIVITY_PARTITIONS,
# TANDEM_TOPIC_REPLICATION_FACTOR (3 in the three-node mode), TANDEM_TOPIC_MIN_INSYNC_REPLICAS,
# TANDEM_PARTNERSHIP_PARTITIONS, TANDEM_ADMIN_RETENTION_MS and TANDEM_ACTIVITY_RETENTION_MS
# (tandemctl create-topics --help).
"$bin/tandemctl" create-topics --kafka-brokers "$TANDEM_KAFKA_BROKERS" --topic-prefix "$TANDEM_TOPIC_PREFIX"

start_service() {
  local name=$1 port=$2
  if [[ -f "$TANDEM_HOME/pids/$name.pid" ]] && pid_alive "$(cat "$TANDEM_HOME/pids/$name.pid")"; then
    log "$name is already running"
    return
  fi
  port_open 127.0.0.1 "$port" && die "port $port is taken by another process; stop it or run down.sh"
  log "starting $name on 127.0.0.1:$port (log: $TANDEM_HOME/logs/$name.log)"
  DATABASE_URL="$service_db_url" nohup "$bin/$name" >>"$TANDEM_HOME/logs/$name.log" 2>&1 &
  echo $! >"$TANDEM_HOME/pids/$name.pid"
}
start_service referral-ledger 50052
start_service merchant-gateway 50051
start_service settlement 50053
# The local stack lets webhooks go to http://127.0.0.1 (a receiver on this machine); a
# production deployment leaves this unset and webhooks go to public https URLs only.
export TANDEM_WEBHOOKS_ALLOW_PRIVATE=true
start_service notifications 50054

"$bin/tandemctl" wait-healthy --timeout-secs 60 \
  https://127.0.0.1:50051 https://127.0.0.1:50052 https://127.0.0.1:50053 https://127.0.0.1:50054 \
  || die "a service did not become healthy; see $TANDEM_HOME/logs/ (services started by an older checkout serve plaintext: run down.sh, then up.sh)"
log "Tandem is up: merchant gateway at https://127.0.0.1:50051 (TLS; clients trust $TANDEM_TLS_CA), logs in $TANDEM_HOME/logs/, metrics at 127.0.0.1:9464-9467/metrics"
if $observability; then
  log "traces: Jaeger's API at http://127.0.0.1:16686 (tandemctl trace <trace_id>); metrics and alerts: Prometheus at http://127.0.0.1:9090"
fi
