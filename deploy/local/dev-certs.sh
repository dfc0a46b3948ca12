#!/usr/bin/env bash
# Development TLS: a private certificate authority and one server certificate that every Tandem
# service presents, valid for localhost, 127.0.0.1, ::1 and the docker-compose service names.
# For a development machine or a test only: production certificates come from the deployment's
# own authority.
#
#   bash deploy/local/dev-certs.sh DIR
#
# writes DIR/ca.pem (what clients trust: TANDEM_TLS_CA), DIR/server.pem and DIR/server.key
# (TANDEM_TLS_CERT, TANDEM_TLS_KEY) and keeps DIR/ca.key to sign again. Safe to run again: what
# exists is reused, and the server certificate is renewed when it expires within 30 days (or the
# authority was remade). Needs the openssl command.
set -euo pipefail

dir="${1:?usage: dev-certs.sh DIR}"
command -v openssl >/dev/null || { echo "dev-certs.sh: the openssl command is needed (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
cd "$dir"
umask 077
# openssl's progress lines are shown only when it fails.
quiet() { local out; out="$("$@" 2>&1)" || { echo "$out" >&2; return 1; }; }

if [[ ! -s ca.pem || ! -s ca.key ]] || ! openssl x509 -checkend 2592000 -noout -in ca.pem >/dev/null; then
  quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -keyout ca.key -out ca.pem -days 1825 -subj "/O=Tandem development/CN=Tandem development CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"
  rm -f server.pem server.key
fi

if [[ ! -s server.pem || ! -s server.key ]] || ! openssl x509 -checkend 2592000 -noout -in server.pem >/dev/null; then
  extensions="$(mktemp)"
  trap 'rm -f "$extensions" server.csr' EXIT
  cat >"$extensions" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1, DNS:merchant-gateway, DNS:referral-ledger, DNS:settlement, DNS:notifications
EOF
  quiet openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -keyout server.key -out server.csr -subj "/O=Tandem development/CN=Tandem services"
  quiet openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial "0x$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" \
    -sha256 -days 397 -extfile "$extensions" -out server.pem
fi
# Certificates are public; keys stay readable by their owner only.
chmod 644 ca.pem server.pem
chmod 600 ca.key server.key
