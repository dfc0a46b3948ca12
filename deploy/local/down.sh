#!/usr/bin/env bash
# Stops what up.sh and test.sh started: the four services (and Prometheus and Jaeger), then the
# Kafka broker(s). Postgres is
# left running (it may be shared); data stays in $TANDEM_HOME and in the database.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for name in merchant-gateway notifications settlement referral-ledger prometheus jaeger; do
  stop_pidfile "$name"
done
stop_kafka
