#!/usr/bin/env bash
# Starts the whole stack (see up.sh) and runs the demo: merchants A and C, a partnership C -> A,
# a referral at C's checkout, purchases at A, and what C learned.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$REPO_ROOT/deploy/local/up.sh" "$@"
set -a; source "$TANDEM_HOME/secrets.env"; set +a
export TANDEM_TLS_CA="$TANDEM_HOME/tls/ca.pem"
exec "$CARGO_TARGET_DIR/release/tandemctl" demo --gateway https://127.0.0.1:50051
