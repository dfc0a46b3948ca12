#!/usr/bin/env bash
# The local Apache Kafka broker(s) on their own, for fault tests and operators:
#   broker.sh start           start (or reuse) the broker, or three with TANDEM_KAFKA_NODES=3
#   broker.sh stop [NODE]     stop every node, or one, with a controlled shutdown
#   broker.sh kill NODE       SIGKILL one node (a crash)
#   broker.sh status          print what the cluster's metadata says
# TANDEM_HOME and TANDEM_KAFKA_PORT choose where its data lives and which ports it listens on, so a
# test can run a private broker beside the shared one.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in
  start) ensure_broker ;;
  stop)
    if [[ -n "${2:-}" ]]; then stop_pidfile "kafka-$2" 60; else stop_kafka; fi ;;
  kill)
    [[ -n "${2:-}" ]] || die "usage: broker.sh kill NODE"
    pidfile="$TANDEM_HOME/pids/kafka-$2.pid"
    [[ -f "$pidfile" ]] || die "node $2 was not started by these scripts"
    pid=$(cat "$pidfile")
    kill -KILL "$pid" 2>/dev/null || true
    # Returns when the process is gone, its ports with it, so that a start right after can bind.
    wait_gone "$pid" 30 || die "Kafka node $2 (pid $pid) is still exiting after 30 s"
    rm -f "$pidfile"
    log "killed Kafka node $2" ;;
  status) python3 "$REPO_ROOT/deploy/local/kafka/metadata_probe.py" "127.0.0.1:$KAFKA_PORT" --brokers "$KAFKA_NODES" ;;
  *) die "usage: broker.sh start | stop [NODE] | kill NODE | status" ;;
esac
