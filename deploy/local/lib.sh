# Shared by the local stack scripts. Sourced, not run.
#
# Everything the scripts start lives under $TANDEM_HOME (default: .tandem in the repository):
#   logs/<name>.log   one log file per process
#   pids/<name>.pid   the pid of every process these scripts started (down.sh stops them)
#   kafka/            the Kafka brokers' properties and data (survives restarts)
# Apache Kafka's jars are fetched once into $TANDEM_CACHE_DIR (default ~/.cache/tandem) and reused.
#
# Settings (environment): DATABASE_URL, TANDEM_KAFKA_PORT (9092), TANDEM_KAFKA_NODES (1, or 3 for
# the fault-test cluster), TANDEM_KAFKA_HEAP, TANDEM_HOME, TANDEM_CACHE_DIR.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TANDEM_HOME="${TANDEM_HOME:-$REPO_ROOT/.tandem}"
TANDEM_CACHE_DIR="${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}"
KAFKA_VERSION="4.1.1"
KAFKA_LIBS="$TANDEM_CACHE_DIR/kafka-$KAFKA_VERSION/libs"
# Node 1 listens on KAFKA_PORT, node N on KAFKA_PORT + N - 1; controllers 10000 above.
KAFKA_PORT="${TANDEM_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT=$((KAFKA_PORT + 10000))
KAFKA_NODES="${TANDEM_KAFKA_NODES:-1}"
[[ "$KAFKA_NODES" == 1 || "$KAFKA_NODES" == 3 ]] || { echo "[tandem] error: TANDEM_KAFKA_NODES must be 1 or 3" >&2; exit 1; }
# Heap per broker: a 2-core, 24 GiB machine runs the broker beside Postgres, four services and
# the builds; 1 GiB is plenty for one node, 768 MiB each for three.
if ((KAFKA_NODES == 1)); then KAFKA_HEAP="${TANDEM_KAFKA_HEAP:-1g}"; else KAFKA_HEAP="${TANDEM_KAFKA_HEAP:-768m}"; fi
if [[ -z "${TANDEM_KAFKA_BROKERS:-}" ]]; then
  TANDEM_KAFKA_BROKERS=""
  for ((node = 1; node <= KAFKA_NODES; node++)); do
    TANDEM_KAFKA_BROKERS+="${TANDEM_KAFKA_BROKERS:+,}127.0.0.1:$((KAFKA_PORT + node - 1))"
  done
fi
export TANDEM_KAFKA_BROKERS
# Topics of a three-node cluster are replicated three times and need two in-sync replicas.
if ((KAFKA_NODES == 3)); then
  export TANDEM_TOPIC_REPLICATION_FACTOR="${TANDEM_TOPIC_REPLICATION_FACTOR:-3}"
  export TANDEM_TOPIC_MIN_INSYNC_REPLICAS="${TANDEM_TOPIC_MIN_INSYNC_REPLICAS:-2}"
fi
export DATABASE_URL="${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"

mkdir -p "$TANDEM_HOME/logs" "$TANDEM_HOME/pids"

log() { printf '[tandem] %s\n' "$*" >&2; }
die() { printf '[tandem] error: %s\n' "$*" >&2; exit 1; }

# pid_alive PID: true if the process runs. A killed process that nobody reaped yet (a zombie)
# does not count: `kill -0` alone would say it is alive, and the scripts would not restart it.
# A zombie main thread whose other threads are still exiting does count: those threads still
# hold the process's files and sockets (a SIGKILLed JVM with a large heap takes a while to
# unmap it, and its ports stay open meanwhile).
pid_alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local state tasks
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ "$state" != Z* ]] && return 0
  tasks=$(find "/proc/$1/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
  ((tasks > 1))
}

# wait_gone PID SECONDS: waits until the process no longer runs; false if it still does after
# SECONDS.
wait_gone() {
  local _
  for _ in $(seq 1 $(($2 * 10))); do pid_alive "$1" || return 0; sleep 0.1; done
  ! pid_alive "$1"
}

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

# Java runs the broker, Maven fetches it, python3 asks it for metadata: install them from the
# distribution's packages if missing.
ensure_java_and_maven() {
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null || apt_install maven
  command -v python3 >/dev/null || apt_install python3
}

# Apache Kafka's jars (the broker and what it needs to run, with a log4j2 backend): fetched once
# from Maven Central with Maven into $KAFKA_LIBS, then reused. Maven's own repository for this
# lives under $TANDEM_CACHE_DIR too, so nothing outside it is written.
ensure_kafka_libs() {
  if [[ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]]; then
    return
  fi
  log "fetching Apache Kafka $KAFKA_VERSION from Maven Central once into $KAFKA_LIBS"
  local staging="$KAFKA_LIBS.partial"
  rm -rf "$staging"
  mvn -B -q -f "$REPO_ROOT/deploy/local/kafka/pom.xml" \
      -Dmaven.repo.local="$TANDEM_CACHE_DIR/maven" -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$staging" \
      >"$TANDEM_HOME/logs/kafka-fetch.log" 2>&1 \
    || { tail -n 30 "$TANDEM_HOME/logs/kafka-fetch.log" >&2; die "fetching Apache Kafka failed (log: $TANDEM_HOME/logs/kafka-fetch.log)"; }
  [[ -f "$staging/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "Maven did not fetch kafka_2.13-$KAFKA_VERSION.jar"
  mv "$staging" "$KAFKA_LIBS"
}

# kafka_java CLASS ARGS...: runs a class from Kafka's jars with the machine's Java.
kafka_java() {
  java -Djava.awt.headless=true -Dlog4j2.configurationFile="$REPO_ROOT/deploy/local/kafka/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "$@"
}

# The properties of node N (1-based) of the local cluster. One node: a combined broker and
# controller with replication factors 1. Three nodes: three combined brokers/controllers with
# replication factor 3 and min.insync.replicas=2, so one broker may die without losing an
# acknowledged message or refusing writes.
kafka_node_properties() {
  local node=$1 voters="" i
  for ((i = 1; i <= KAFKA_NODES; i++)); do
    voters+="${voters:+,}$i@127.0.0.1:$((KAFKA_CONTROLLER_PORT + i - 1))"
  done
  local replication=1 min_isr=1
  if ((KAFKA_NODES > 1)); then replication=3; min_isr=2; fi
  cat <<PROPERTIES
# Generated by deploy/local/lib.sh at every start; edit the script, not this file.
process.roles=broker,controller
node.id=$node
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$((KAFKA_PORT + node - 1)),CONTROLLER://127.0.0.1:$((KAFKA_CONTROLLER_PORT + node - 1))
advertised.listeners=PLAINTEXT://127.0.0.1:$((KAFKA_PORT + node - 1))
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$(kafka_node_dir "$node")/data
# Topics are created explicitly (tandemctl create-topics), never by a typo in a consumer.
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=$replication
min.insync.replicas=$min_isr
offsets.topic.replication.factor=$replication
transaction.state.log.replication.factor=$replication
transaction.state.log.min.isr=$min_isr
share.coordinator.state.topic.replication.factor=$replication
share.coordinator.state.topic.min.isr=$min_isr
# Committed offsets of an empty group are kept 30 days (Kafka's default is 7): a group whose
# offsets expire starts again from the beginning of its topics, and the consumers' marks of
# applied messages are pruned after 7 days (docs/SECURITY.md, "Bookkeeping retention").
offsets.retention.minutes=43200
# A new consumer group starts at once instead of waiting 3 s for more members.
group.initial.rebalance.delay.ms=0
# Two cores: fewer threads than the defaults (3 network, 8 I/O).
num.network.threads=2
num.io.threads=4
PROPERTIES
}

kafka_node_dir() { echo "$TANDEM_HOME/kafka/${KAFKA_NODES}-node/node-$1"; }

# start_kafka_node N: formats node N's log directory on first use and starts it in the background.
start_kafka_node() {
  local node=$1 dir pidfile log_file
  dir=$(kafka_node_dir "$node")
  pidfile="$TANDEM_HOME/pids/kafka-$node.pid"
  log_file="$TANDEM_HOME/logs/kafka-$node.log"
  if [[ -f "$pidfile" ]] && pid_alive "$(cat "$pidfile")"; then
    return
  fi
  mkdir -p "$dir/data"
  kafka_node_properties "$node" >"$dir/server.properties"
  local cluster_id_file="$TANDEM_HOME/kafka/${KAFKA_NODES}-node/cluster-id"
  [[ -s "$cluster_id_file" ]] || kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1 >"$cluster_id_file"
  if [[ ! -f "$dir/data/meta.properties" ]]; then
    kafka_java kafka.tools.StorageTool format --ignore-formatted -t "$(cat "$cluster_id_file")" \
      -c "$dir/server.properties" >>"$log_file" 2>&1 \
      || { tail -n 20 "$log_file" >&2; die "formatting Kafka node $node failed (log: $log_file)"; }
  fi
  log "starting Apache Kafka $KAFKA_VERSION node $node on 127.0.0.1:$((KAFKA_PORT + node - 1)) (log: $log_file)"
  # A simple command in the background, so that $! is the JVM's own pid and down.sh stops it.
  # shellcheck disable=SC2086
  nohup java -Xms"$KAFKA_HEAP" -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$REPO_ROOT/deploy/local/kafka/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties" >>"$log_file" 2>&1 &
  echo $! >"$pidfile"
}

# kafka_ready: true when the cluster answers a metadata request with all its brokers and a
# controller.
kafka_ready() {
  python3 "$REPO_ROOT/deploy/local/kafka/metadata_probe.py" "127.0.0.1:$KAFKA_PORT" --brokers "$KAFKA_NODES" >/dev/null 2>&1
}

# wait_kafka SECONDS: waits until kafka_ready, or dies with the log of a node that is not running.
wait_kafka() {
  local deadline=$((SECONDS + $1)) node pidfile
  until kafka_ready; do
    for ((node = 1; node <= KAFKA_NODES; node++)); do
      pidfile="$TANDEM_HOME/pids/kafka-$node.pid"
      if [[ -f "$pidfile" ]] && ! pid_alive "$(cat "$pidfile")"; then
        tail -n 30 "$TANDEM_HOME/logs/kafka-$node.log" >&2
        die "Kafka node $node exited (log: $TANDEM_HOME/logs/kafka-$node.log)"
      fi
    done
    if ((SECONDS >= deadline)); then
      python3 "$REPO_ROOT/deploy/local/kafka/metadata_probe.py" "127.0.0.1:$KAFKA_PORT" --brokers "$KAFKA_NODES" >&2 || true
      die "Kafka did not answer a metadata request within $1 s (logs: $TANDEM_HOME/logs/kafka-*.log)"
    fi
    sleep 0.2
  done
}

# The broker: reuse whatever answers on the Kafka port; otherwise start Apache Kafka (one node, or
# three with TANDEM_KAFKA_NODES=3) and wait until it answers a metadata request.
ensure_broker() {
  if port_open 127.0.0.1 "$KAFKA_PORT" && ! any_kafka_node_started_here; then
    log "a Kafka broker is answering at 127.0.0.1:$KAFKA_PORT; using it"
    return
  fi
  ensure_java_and_maven
  ensure_kafka_libs
  local node
  for ((node = 1; node <= KAFKA_NODES; node++)); do
    start_kafka_node "$node"
  done
  wait_kafka 120
  log "Apache Kafka $KAFKA_VERSION is ready at $TANDEM_KAFKA_BROKERS"
}

any_kafka_node_started_here() {
  local node pidfile
  for ((node = 1; node <= 3; node++)); do
    pidfile="$TANDEM_HOME/pids/kafka-$node.pid"
    [[ -f "$pidfile" ]] && pid_alive "$(cat "$pidfile")" && return 0
  done
  return 1
}

# What building the services needs beyond the Rust toolchain: OpenSSL's headers and pkg-config
# (librdkafka is built with TLS, for clusters that require it) and a C compiler.
ensure_build_deps() {
  local missing=()
  command -v cc >/dev/null || missing+=(build-essential)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
}

# The openssl command, for the development certificates (deploy/local/dev-certs.sh).
ensure_openssl() {
  command -v openssl >/dev/null || apt_install openssl
}

# Development TLS for the local stack in $TANDEM_HOME/tls (made once, renewed before it expires):
# every service presents its certificate, and clients (the gateway, tandemctl) trust its CA.
ensure_dev_certs() {
  ensure_openssl
  bash "$REPO_ROOT/deploy/local/dev-certs.sh" "$TANDEM_HOME/tls" \
    || die "could not make the development certificates in $TANDEM_HOME/tls"
  export TANDEM_TLS_CERT="$TANDEM_HOME/tls/server.pem"
  export TANDEM_TLS_KEY="$TANDEM_HOME/tls/server.key"
  export TANDEM_TLS_CA="$TANDEM_HOME/tls/ca.pem"
}

ensure_nextest() {
  if cargo nextest --version >/dev/null 2>&1; then
    return
  fi
  log "installing cargo-nextest (once)"
  cargo install cargo-nextest --locked >"$TANDEM_HOME/logs/nextest-install.log" 2>&1 \
    || { tail -n 30 "$TANDEM_HOME/logs/nextest-install.log" >&2; die "installing cargo-nextest failed"; }
}

# Independent checkers the tests use: poppler's pdftotext (statement PDFs); in a virtualenv
# under $TANDEM_CACHE_DIR, lxml with the ISO 20022 schemas the sepaxml package ships (pain.001
# payout files) and the Standard Webhooks package from PyPI; and the Standard Webhooks package
# from npm (webhook signatures). Exports TANDEM_TOOLS_PYTHON and TANDEM_NODE_PATH.
SEPAXML_VERSION="2.7.0"
LXML_VERSION="6.1.3"
STANDARDWEBHOOKS_PY_VERSION="1.1.0"
STANDARDWEBHOOKS_NPM_VERSION="1.1.1"
# Prometheus's promtool (from the Go module proxy): parses and lints the services' metrics and
# checks the alerting rules and their unit tests.
PROMETHEUS_VERSION=${PROMETHEUS_VERSION:-v0.316.0}
# Jaeger (v2, on the OpenTelemetry Collector), the local stack's trace store and query API.
JAEGER_VERSION=${JAEGER_VERSION:-v1.76.0}
ensure_checkers() {
  command -v pdftotext >/dev/null || apt_install poppler-utils
  local venv="$TANDEM_CACHE_DIR/checkers-sepaxml-$SEPAXML_VERSION-lxml-$LXML_VERSION"
  if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import lxml, sepaxml' 2>/dev/null; then
    python3 -m venv --help >/dev/null 2>&1 || apt_install python3-venv
    log "installing sepaxml $SEPAXML_VERSION and lxml $LXML_VERSION from PyPI (once)"
    rm -rf "$venv"
    python3 -m venv "$venv" || { apt_install python3-venv; python3 -m venv "$venv"; }
    "$venv/bin/pip" install -q "sepaxml==$SEPAXML_VERSION" "lxml==$LXML_VERSION" \
      || die "installing the pain.001 schema checker failed"
  fi
  if ! "$venv/bin/python" -c "import standardwebhooks, importlib.metadata as m; assert m.version('standardwebhooks') == '$STANDARDWEBHOOKS_PY_VERSION'" 2>/dev/null; then
    log "installing standardwebhooks $STANDARDWEBHOOKS_PY_VERSION from PyPI (once)"
    "$venv/bin/pip" install -q "standardwebhooks==$STANDARDWEBHOOKS_PY_VERSION" \
      || die "installing the Python Standard Webhooks checker failed"
  fi
  export TANDEM_TOOLS_PYTHON="$venv/bin/python"
  local npm_dir="$TANDEM_CACHE_DIR/checkers-npm-standardwebhooks-$STANDARDWEBHOOKS_NPM_VERSION"
  if [[ ! -f "$npm_dir/node_modules/standardwebhooks/package.json" ]]; then
    command -v npm >/dev/null || apt_install nodejs npm
    log "installing standardwebhooks $STANDARDWEBHOOKS_NPM_VERSION from npm (once)"
    mkdir -p "$npm_dir"
    (cd "$npm_dir" && npm install --silent --no-audit --no-fund "standardwebhooks@$STANDARDWEBHOOKS_NPM_VERSION" >/dev/null) \
      || die "installing the Node Standard Webhooks checker failed"
  fi
  export TANDEM_NODE_PATH="$npm_dir/node_modules"
}

# ensure_promtool: builds Prometheus's promtool from the Go module proxy once (a few minutes
# on two cores; cached under ~/.cache/tandem) and exports TANDEM_PROMTOOL.
ensure_promtool() {
  local dir="$TANDEM_CACHE_DIR/promtool-$PROMETHEUS_VERSION"
  if [[ ! -x "$dir/promtool" ]]; then
    command -v go >/dev/null || apt_install golang-go
    log "building promtool $PROMETHEUS_VERSION from the Go module proxy (once, a few minutes)"
    GOBIN="$dir" go install "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION" \
      || die "building promtool failed"
  fi
  export TANDEM_PROMTOOL="$dir/promtool"
}

# ensure_prometheus: builds the Prometheus server from the Go module proxy once (its API; the
# web UI's assets are not part of a module build) and exports TANDEM_PROMETHEUS.
ensure_prometheus() {
  local dir="$TANDEM_CACHE_DIR/prometheus-$PROMETHEUS_VERSION"
  if [[ ! -x "$dir/prometheus" ]]; then
    command -v go >/dev/null || apt_install golang-go
    log "building Prometheus $PROMETHEUS_VERSION from the Go module proxy (once, a few minutes)"
    GOBIN="$dir" go install "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION" \
      || die "building Prometheus failed"
  fi
  export TANDEM_PROMETHEUS="$dir/prometheus"
}

# ensure_jaeger: builds Jaeger from the Go module proxy once (as a Go tool of a scratch module,
# the way its module is meant to be built) and exports TANDEM_JAEGER.
ensure_jaeger() {
  local dir="$TANDEM_CACHE_DIR/jaeger-$JAEGER_VERSION"
  if [[ ! -x "$dir/jaeger" ]]; then
    command -v go >/dev/null || apt_install golang-go
    log "building Jaeger $JAEGER_VERSION from the Go module proxy (once, several minutes)"
    mkdir -p "$dir/module"
    (
      cd "$dir/module" \
        && { [[ -f go.mod ]] || go mod init tandem.local/jaeger-tool; } \
        && go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_VERSION" \
        && go build -o "$dir/jaeger" github.com/jaegertracing/jaeger/cmd/jaeger
    ) || die "building Jaeger failed"
  fi
  export TANDEM_JAEGER="$dir/jaeger"
}

# start_observability: Jaeger (OTLP/gRPC on 127.0.0.1:4317, query API on 127.0.0.1:16686) and
# Prometheus (127.0.0.1:9090, scraping the four services, with the alerting rules), unless
# running; exports OTEL_EXPORTER_OTLP_ENDPOINT for the services started after it.
start_observability() {
  ensure_prometheus
  ensure_jaeger
  mkdir -p "$TANDEM_HOME/pids" "$TANDEM_HOME/logs" "$TANDEM_HOME/prometheus"
  if [[ -f "$TANDEM_HOME/pids/jaeger.pid" ]] && pid_alive "$(cat "$TANDEM_HOME/pids/jaeger.pid")"; then
    log "Jaeger is already running"
  else
    port_open 127.0.0.1 16686 && die "port 16686 is taken by another process; stop it or run down.sh"
    log "starting Jaeger $JAEGER_VERSION (OTLP 127.0.0.1:4317, API 127.0.0.1:16686; log: $TANDEM_HOME/logs/jaeger.log)"
    nohup "$TANDEM_JAEGER" >>"$TANDEM_HOME/logs/jaeger.log" 2>&1 &
    echo $! >"$TANDEM_HOME/pids/jaeger.pid"
  fi
  if [[ -f "$TANDEM_HOME/pids/prometheus.pid" ]] && pid_alive "$(cat "$TANDEM_HOME/pids/prometheus.pid")"; then
    log "Prometheus is already running"
  else
    port_open 127.0.0.1 9090 && die "port 9090 is taken by another process; stop it or run down.sh"
    log "starting Prometheus $PROMETHEUS_VERSION on 127.0.0.1:9090 (log: $TANDEM_HOME/logs/prometheus.log)"
    nohup "$TANDEM_PROMETHEUS" --config.file="$REPO_ROOT/deploy/prometheus/prometheus.yml" \
      --storage.tsdb.path="$TANDEM_HOME/prometheus" --web.listen-address=127.0.0.1:9090 \
      >>"$TANDEM_HOME/logs/prometheus.log" 2>&1 &
    echo $! >"$TANDEM_HOME/pids/prometheus.pid"
  fi
  for _ in $(seq 1 100); do port_open 127.0.0.1 4317 && break; sleep 0.2; done
  port_open 127.0.0.1 4317 || die "Jaeger did not open 127.0.0.1:4317; see $TANDEM_HOME/logs/jaeger.log"
  export OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4317"
}

# stop_pidfile NAME [SECONDS]: stop a process these scripts started, politely (SIGTERM) then,
# after SECONDS (default 10), firmly.
stop_pidfile() {
  local file="$TANDEM_HOME/pids/$1.pid" pid seconds=${2:-10}
  [[ -f "$file" ]] || return 0
  pid=$(cat "$file")
  if pid_alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$seconds"; then
      log "$1 did not stop in ${seconds}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      # Until it is gone: its ports stay open while it exits, and a start right after would
      # take them for a running service.
      wait_gone "$pid" 10 || true
    fi
    log "stopped $1"
  fi
  rm -f "$file"
}

# stop_kafka: stops every Kafka node these scripts started. All nodes are told at once: a node
# stopped after the controller quorum is gone would wait for it forever. Those still running
# after 30 s are killed (their logs recover on the next start).
stop_kafka() {
  local node pids=() names=() file
  for node in 1 2 3; do
    file="$TANDEM_HOME/pids/kafka-$node.pid"
    [[ -f "$file" ]] || continue
    if pid_alive "$(cat "$file")"; then
      pids+=("$(cat "$file")"); names+=("kafka-$node")
      kill -TERM "$(cat "$file")" 2>/dev/null || true
    fi
    rm -f "$file"
  done
  ((${#pids[@]})) || return 0
  local deadline=$((SECONDS + 30)) pid alive
  while :; do
    alive=0
    for pid in "${pids[@]}"; do pid_alive "$pid" && alive=1; done
    ((alive)) || break
    if ((SECONDS >= deadline)); then
      log "Kafka did not stop in 30 s; killing it (thread dumps in its logs)"
      # SIGQUIT first: the JVM prints every thread's stack to its log, which shows what the
      # shutdown was waiting for.
      for pid in "${pids[@]}"; do kill -QUIT "$pid" 2>/dev/null || true; done
      sleep 1
      for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
      break
    fi
    sleep 0.2
  done
  # Until no node's port accepts a connection: a killed JVM keeps its sockets until its last
  # thread has exited, and ensure_broker right after would take an open port for a broker to
  # reuse and start nothing. The fault suite's cluster restart did, and its cluster stayed down.
  local node_port open
  for _ in $(seq 1 300); do
    open=""
    for ((node = 1; node <= KAFKA_NODES; node++)); do
      for node_port in $((KAFKA_PORT + node - 1)) $((KAFKA_CONTROLLER_PORT + node - 1)); do
        port_open 127.0.0.1 "$node_port" && open+=" $node_port"
      done
    done
    [[ -z "$open" ]] && break
    sleep 0.1
  done
  [[ -z "$open" ]] || die "stopped ${names[*]}, but ports$open still accept connections after 30 s"
  log "stopped ${names[*]}"
}

# cargo-deny (from crates.io, into $TANDEM_CACHE_DIR): the supply-chain policy in deny.toml.
CARGO_DENY_VERSION="0.20.2"
ensure_cargo_deny() {
  local root="$TANDEM_CACHE_DIR/cargo-deny-$CARGO_DENY_VERSION"
  export TANDEM_CARGO_DENY="$root/bin/cargo-deny"
  if [[ -x "$TANDEM_CARGO_DENY" ]]; then
    return
  fi
  log "installing cargo-deny $CARGO_DENY_VERSION (once)"
  mkdir -p "$TANDEM_HOME/logs"
  cargo install cargo-deny --version "$CARGO_DENY_VERSION" --locked --root "$root" \
    >"$TANDEM_HOME/logs/cargo-deny-install.log" 2>&1 \
    || { tail -n 30 "$TANDEM_HOME/logs/cargo-deny-install.log" >&2; die "installing cargo-deny failed"; }
}
