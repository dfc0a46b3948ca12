# Shared by the local stack scripts. Sourced, not run.
#
# Everything the scripts start lives under $TANDEM_HOME (default: .tandem in the repository):
#   logs/<name>.log   one log file per process
#   pids/<name>.pid   the pid of every process these scripts started (down.sh stops them)
#   broker/           the broker's sqlite data (survives restarts)
# The broker binary is built once into $TANDEM_CACHE_DIR (default ~/.cache/tandem) and reused.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TANDEM_HOME="${TANDEM_HOME:-$REPO_ROOT/.tandem}"
TANDEM_CACHE_DIR="${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}"
TANSU_VERSION="0.6.0"
TANSU_BIN="$TANDEM_CACHE_DIR/tansu-$TANSU_VERSION/bin/tansu"
KAFKA_PORT="${TANDEM_KAFKA_PORT:-9092}"
export TANDEM_KAFKA_BROKERS="${TANDEM_KAFKA_BROKERS:-127.0.0.1:$KAFKA_PORT}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"

mkdir -p "$TANDEM_HOME/logs" "$TANDEM_HOME/pids"

log() { printf '[tandem] %s\n' "$*" >&2; }
die() { printf '[tandem] error: %s\n' "$*" >&2; exit 1; }

# port_open HOST PORT: true if something accepts TCP connections there.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_port HOST PORT NAME SECONDS LOGFILE: wait until the port accepts connections.
wait_port() {
  local host=$1 port=$2 name=$3 seconds=$4 logfile=${5:-}
  local deadline=$((SECONDS + seconds))
  until port_open "$host" "$port"; do
    if ((SECONDS >= deadline)); then
      [[ -n "$logfile" && -f "$logfile" ]] && tail -n 20 "$logfile" >&2
      die "$name did not accept connections on $host:$port within ${seconds}s${logfile:+ (log: $logfile)}"
    fi
    sleep 0.2
  done
}

# host and port of DATABASE_URL
db_host() { local rest=${DATABASE_URL#*://}; rest=${rest#*@}; rest=${rest%%/*}; echo "${rest%%:*}"; }
db_port() { local rest=${DATABASE_URL#*://}; rest=${rest#*@}; rest=${rest%%/*}; [[ $rest == *:* ]] && echo "${rest##*:}" || echo 5432; }

apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found: install $* yourself"
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  log "installing $* from the distribution's packages"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# Postgres: use DATABASE_URL if it answers; otherwise install (if needed) and start a local cluster.
ensure_postgres() {
  local host port
  host=$(db_host); port=$(db_port)
  if port_open "$host" "$port"; then
    log "Postgres is answering at $host:$port"
    return
  fi
  [[ "$host" == 127.0.0.1 || "$host" == localhost ]] || die "Postgres at $host:$port does not answer (DATABASE_URL)"
  if ! command -v pg_ctlcluster >/dev/null; then
    apt_install postgresql
  fi
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  [[ -n "$version" ]] || die "postgresql is installed but has no cluster in /etc/postgresql"
  log "starting Postgres $version"
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port "$host" "$port" Postgres 60
  # A fresh cluster only allows password logins over TCP: give the postgres role the password
  # the default DATABASE_URL uses. (Local development only.)
  if command -v runuser >/dev/null && [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'" >/dev/null 2>&1 || true
  fi
}

# The tansu broker binary: reuse the cached build, or build it once (about 10 minutes on 2 cores).
ensure_tansu_binary() {
  if [[ -x "$TANSU_BIN" ]]; then
    return
  fi
  command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain"
  log "building the tansu $TANSU_VERSION broker once into $TANDEM_CACHE_DIR (about 10 minutes on 2 cores)"
  mkdir -p "$TANDEM_CACHE_DIR"
  CARGO_TARGET_DIR="$TANDEM_CACHE_DIR/tansu-build" \
    cargo install tansu --version "$TANSU_VERSION" --locked --features libsql \
      --root "$TANDEM_CACHE_DIR/tansu-$TANSU_VERSION" >"$TANDEM_HOME/logs/tansu-install.log" 2>&1 \
    || { tail -n 30 "$TANDEM_HOME/logs/tansu-install.log" >&2; die "building tansu failed (log: $TANDEM_HOME/logs/tansu-install.log)"; }
  rm -rf "$TANDEM_CACHE_DIR/tansu-build"
}

# The broker: reuse whatever answers on the Kafka port; otherwise start tansu with its sqlite engine.
ensure_broker() {
  if port_open 127.0.0.1 "$KAFKA_PORT"; then
    log "a Kafka broker is answering at 127.0.0.1:$KAFKA_PORT"
    return
  fi
  ensure_tansu_binary
  mkdir -p "$TANDEM_HOME/broker"
  log "starting tansu $TANSU_VERSION on 127.0.0.1:$KAFKA_PORT (log: $TANDEM_HOME/logs/tansu.log)"
  # tansu takes the sqlite path relative to its working directory; an absolute one is mangled.
  (
    cd "$TANDEM_HOME" || exit 1
    # A simple command in the background, so that $! is the broker's own pid (env and nohup
    # exec it) and down.sh stops the broker, not a wrapper.
    env -u OTEL_EXPORTER_OTLP_ENDPOINT nohup "$TANSU_BIN" broker \
      --storage-engine "sqlite://broker/tansu.db" \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      >>"$TANDEM_HOME/logs/tansu.log" 2>&1 &
    echo $! >"$TANDEM_HOME/pids/tansu.pid"
  )
  wait_port 127.0.0.1 "$KAFKA_PORT" tansu 60 "$TANDEM_HOME/logs/tansu.log"
}

ensure_nextest() {
  if cargo nextest --version >/dev/null 2>&1; then
    return
  fi
  log "installing cargo-nextest (once)"
  cargo install cargo-nextest --locked >"$TANDEM_HOME/logs/nextest-install.log" 2>&1 \
    || { tail -n 30 "$TANDEM_HOME/logs/nextest-install.log" >&2; die "installing cargo-nextest failed"; }
}

# stop_pidfile NAME: stop a process these scripts started, politely then firmly.
stop_pidfile() {
  local file="$TANDEM_HOME/pids/$1.pid" pid
  [[ -f "$file" ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "$1 did not stop in 10s; killing it"; kill -KILL "$pid" 2>/dev/null || true; }
    log "stopped $1"
  fi
  rm -f "$file"
}
