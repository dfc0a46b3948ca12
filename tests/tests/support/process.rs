//! Services and brokers as processes of their own, for tests that kill or restart them: the
//! referral ledger (the shipping `main`, built as `e2e-referral-ledger`) and a private Apache
//! Kafka broker started by the project's own script, `deploy/local/broker.sh`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::Stack;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the repository")
        .to_path_buf()
}

/// The overall health status a service reports, or `None` if it does not answer.
pub async fn health(address: SocketAddr) -> Option<ServingStatus> {
    HealthProbe::try_connect(address).await?.status().await
}

/// Health checks over one connection made in advance, so that a check answers within
/// milliseconds even on a busy machine (for catching a short NOT_SERVING window).
#[derive(Clone)]
pub struct HealthProbe {
    client: HealthClient<tonic::transport::Channel>,
}

impl HealthProbe {
    pub async fn connect(address: SocketAddr) -> HealthProbe {
        Self::try_connect(address)
            .await
            .expect("connect to the service's health check")
    }

    async fn try_connect(address: SocketAddr) -> Option<HealthProbe> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .ok()?;
        Some(HealthProbe {
            client: HealthClient::new(channel),
        })
    }

    /// The overall status, or `None` if the service did not answer.
    pub async fn status(&mut self) -> Option<ServingStatus> {
        self.service_status("").await
    }

    /// The status of one service name (`""`: overall), or `None` without an answer.
    pub async fn service_status(&mut self, service: &str) -> Option<ServingStatus> {
        let status = self
            .client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .ok()?
            .into_inner()
            .status;
        ServingStatus::try_from(status).ok()
    }
}

/// Waits until the service at `address` reports SERVING; returns how long that took.
pub async fn wait_serving(address: SocketAddr, timeout: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if health(address).await == Some(ServingStatus::Serving) {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{address} did not report SERVING within {timeout:?}");
}

/// The referral ledger running as a child process on the stack's ledger address.
pub type LedgerProcess = ServiceProcess;

/// A service running as a child process (the shipping `main`, built beside the tests).
pub struct ServiceProcess {
    child: Option<Child>,
    pub address: SocketAddr,
    pub log_path: PathBuf,
    environment: Vec<(&'static str, String)>,
    binary: &'static str,
}

impl ServiceProcess {
    /// What every service process of `stack` is given: its database, broker and topic prefix,
    /// `connections` database connections, info logs, then `own` and the test's `extra`.
    fn environment(
        stack: &Stack,
        connections: u32,
        own: Vec<(&'static str, String)>,
        extra: &[(&'static str, String)],
    ) -> Vec<(&'static str, String)> {
        let mut environment = vec![
            ("DATABASE_URL", stack.database.url.clone()),
            ("TANDEM_KAFKA_BROKERS", stack.bus.brokers.clone()),
            ("TANDEM_TOPIC_PREFIX", stack.bus.topic_prefix.clone()),
            ("TANDEM_DB_MAX_CONNECTIONS", connections.to_string()),
            ("RUST_LOG", "info".to_owned()),
            ("TANDEM_SERVICE_TOKEN", super::SERVICE_TOKEN.to_owned()),
            // Tests talk plaintext to services on loopback; tests/tests/tls.rs covers TLS.
            ("TANDEM_PLAINTEXT", "true".to_owned()),
        ];
        environment.extend(own);
        environment.extend(extra.iter().cloned());
        environment
    }

    /// Starts notifications on `stack`'s database and topics, listening on `address` (the
    /// address the stack's gateway calls), with the given extra settings.
    pub fn start_notifications(
        stack: &Stack,
        address: SocketAddr,
        extra: &[(&'static str, String)],
    ) -> ServiceProcess {
        let own = vec![
            ("TANDEM_NOTIFICATIONS_LISTEN", address.to_string()),
            // Any free port: tests run side by side.
            (
                "TANDEM_NOTIFICATIONS_METRICS_LISTEN",
                "127.0.0.1:0".to_owned(),
            ),
            (
                "TANDEM_NOTIFICATIONS_CONSUMER_GROUP",
                format!("{}-notifications", stack.bus.topic_prefix),
            ),
            ("TANDEM_WEBHOOKS_ALLOW_PRIVATE", "true".to_owned()),
        ];
        Self::launch(
            stack,
            "notifications",
            address,
            Self::environment(stack, 10, own, extra),
            env!("CARGO_BIN_EXE_e2e-notifications"),
        )
    }

    /// Starts a merchant gateway process on `stack`'s database (its schema, shared with the
    /// stack's own gateway), topics and service addresses, listening on `address`.
    pub fn start_gateway(
        stack: &Stack,
        address: SocketAddr,
        extra: &[(&'static str, String)],
    ) -> ServiceProcess {
        let own = vec![
            ("TANDEM_GATEWAY_LISTEN", address.to_string()),
            ("TANDEM_GATEWAY_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
            (
                "TANDEM_LEDGER_URL",
                format!("http://{}", stack.ledger_address()),
            ),
            (
                "TANDEM_SETTLEMENT_URL",
                format!("http://{}", stack.settlement_address()),
            ),
            (
                "TANDEM_NOTIFICATIONS_URL",
                format!("http://{}", stack.notifications_address()),
            ),
            ("TANDEM_OPERATOR_TOKEN", super::OPERATOR_TOKEN.to_owned()),
            ("TANDEM_NETWORK_KEY", super::NETWORK_KEY.to_owned()),
        ];
        Self::launch(
            stack,
            "gateway",
            address,
            Self::environment(stack, 5, own, extra),
            env!("CARGO_BIN_EXE_e2e-merchant-gateway"),
        )
    }

    /// Starts settlement on `stack`'s database, topics and settlement address (`address`),
    /// in consumer group `<prefix>-settlement`.
    pub fn start_settlement(
        stack: &Stack,
        address: SocketAddr,
        extra: &[(&'static str, String)],
    ) -> ServiceProcess {
        let own = vec![
            ("TANDEM_SETTLEMENT_LISTEN", address.to_string()),
            ("TANDEM_SETTLEMENT_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
            (
                "TANDEM_SETTLEMENT_CONSUMER_GROUP",
                format!("{}-settlement", stack.bus.topic_prefix),
            ),
        ];
        Self::launch(
            stack,
            "settlement",
            address,
            Self::environment(stack, 10, own, extra),
            env!("CARGO_BIN_EXE_e2e-settlement"),
        )
    }

    fn launch(
        stack: &Stack,
        name: &str,
        address: SocketAddr,
        environment: Vec<(&'static str, String)>,
        binary: &'static str,
    ) -> ServiceProcess {
        let log_path = std::env::temp_dir().join(format!(
            "{}-{name}-{}.log",
            stack.bus.topic_prefix,
            address.port()
        ));
        let mut process = ServiceProcess {
            child: None,
            address,
            log_path,
            environment,
            binary,
        };
        process.spawn();
        process
    }

    /// Starts the ledger on `stack`'s database, topics and ledger address, in consumer group
    /// prefix `group`, with the given extra settings (`TANDEM_…` variables).
    pub fn start(stack: &Stack, group: &str, extra: &[(&'static str, String)]) -> LedgerProcess {
        // An instance of its own listens where the extra settings say.
        let address = extra
            .iter()
            .find(|(name, _)| *name == "TANDEM_LEDGER_LISTEN")
            .map_or(stack.ledger_address(), |(_, value)| {
                value.parse().expect("TANDEM_LEDGER_LISTEN is an address")
            });
        let own = vec![
            ("TANDEM_LEDGER_LISTEN", address.to_string()),
            ("TANDEM_LEDGER_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
            (
                "TANDEM_LEDGER_CONSUMER_GROUP",
                format!("{}-{group}", stack.bus.topic_prefix),
            ),
        ];
        Self::launch(
            stack,
            "ledger",
            address,
            Self::environment(stack, 5, own, extra),
            env!("CARGO_BIN_EXE_e2e-referral-ledger"),
        )
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open the ledger's log file");
        let child = Command::new(self.binary)
            .env_clear()
            .envs(self.environment.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log)
            .spawn()
            .expect("start the service process");
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("ledger running").id()
    }

    /// SIGKILL: the process dies at once, in the middle of whatever it was doing.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL the ledger");
            child.wait().expect("reap the ledger");
        }
    }

    /// Starts the ledger again with the same settings (after [`LedgerProcess::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the ledger is still running");
        self.spawn();
    }

    /// Waits for the process to exit by itself; `None` if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            let child = self.child.as_mut().expect("ledger started");
            if let Some(status) = child.try_wait().expect("poll the ledger") {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.pid();
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "could not send SIGTERM to {pid}");
        self.wait_exit(Duration::from_secs(30))
            .expect("the ledger stops within 30 s of SIGTERM")
    }

    /// The last lines of the ledger's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for LedgerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A one-node Apache Kafka of the test's own, on free ports, with its data in a temporary
/// directory, run by `deploy/local/broker.sh` exactly as the local stack runs it.
pub struct PrivateKafka {
    home: PathBuf,
    port: u16,
    nodes: u16,
}

impl PrivateKafka {
    pub fn start() -> PrivateKafka {
        Self::cluster(1)
    }

    /// A cluster of `nodes` (1 or 3) brokers, each also a controller.
    pub fn cluster(nodes: u16) -> PrivateKafka {
        let port = free_ports(nodes);
        let home =
            std::env::temp_dir().join(format!("tandem-kafka-{}", uuid::Uuid::new_v4().simple()));
        let kafka = PrivateKafka { home, port, nodes };
        kafka.script("start");
        kafka
    }

    pub fn brokers(&self) -> String {
        (0..self.nodes)
            .map(|n| format!("127.0.0.1:{}", self.port + n))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILL one node (1-based): a broker crash.
    pub fn kill(&self, node: u16) {
        self.script(&format!("kill {node}"));
    }

    /// A controlled shutdown of the broker; returns when its process has exited.
    pub fn stop(&self) {
        self.script("stop");
    }

    /// Starts the stopped broker again on the same data and port; returns when it answers a
    /// metadata request.
    pub fn start_again(&self) {
        self.script("start");
    }

    fn script(&self, command: &str) {
        let output = self
            .broker_script(command)
            .output()
            .expect("run deploy/local/broker.sh");
        assert!(
            output.status.success(),
            "broker.sh {command} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// For a failed test's output: which nodes run, what the cluster's metadata says, and the
    /// last warnings and errors of each node's log.
    fn diagnosis(&self) -> String {
        let mut report = String::from("the private Kafka cluster at the failure:\n");
        for node in 1..=self.nodes {
            let pid = std::fs::read_to_string(self.home.join(format!("pids/kafka-{node}.pid")));
            let running = pid
                .as_ref()
                .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{}", pid.trim())).exists());
            report += &format!(
                "  node {node}: pid file {}, {}\n",
                pid.as_deref().map(str::trim).unwrap_or("missing"),
                if running { "running" } else { "not running" }
            );
            let log = std::fs::read_to_string(self.home.join(format!("logs/kafka-{node}.log")))
                .unwrap_or_default();
            let notable: Vec<&str> = log
                .lines()
                .filter(|line| {
                    ["WARN", "ERROR", "FATAL", "started", "SIGTERM"]
                        .iter()
                        .any(|word| line.contains(word))
                })
                .collect();
            for line in &notable[notable.len().saturating_sub(12)..] {
                report += &format!("    {}\n", line.chars().take(300).collect::<String>());
            }
        }
        match self.broker_script("status").output() {
            Ok(status) => {
                report += &String::from_utf8_lossy(&status.stdout);
                report += &String::from_utf8_lossy(&status.stderr);
            }
            Err(error) => report += &format!("broker.sh status: {error}\n"),
        }
        report
    }

    /// `deploy/local/broker.sh COMMAND` for this broker's home and port only.
    fn broker_script(&self, command: &str) -> Command {
        let mut script = Command::new("bash");
        script
            .arg(repo_root().join("deploy/local/broker.sh"))
            .args(command.split(' '))
            .env("TANDEM_HOME", &self.home)
            .env("TANDEM_KAFKA_PORT", self.port.to_string())
            .env("TANDEM_KAFKA_NODES", self.nodes.to_string())
            .env_remove("TANDEM_KAFKA_BROKERS");
        script
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        // A failed test says what the brokers were doing, and keeps their logs and data.
        if std::thread::panicking() {
            eprintln!("{}", self.diagnosis());
        }
        let _ = self.broker_script("stop").output();
        if std::thread::panicking() {
            eprintln!("the brokers' logs are kept in {}", self.home.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.home);
        }
    }
}

/// A port P such that P .. P + nodes (the brokers) and the same 10000 above (their
/// controllers) are all free.
fn free_ports(nodes: u16) -> u16 {
    for _ in 0..100 {
        // Brokers on 12000-21989, controllers 10 000 above: both below Linux's ephemeral range
        // (32768 and up), so that no outgoing connection takes a stopped node's port.
        let port = 12_000 + (uuid::Uuid::new_v4().as_u128() % 9_990) as u16;
        let free = (0..nodes).all(|n| {
            std::net::TcpListener::bind(("127.0.0.1", port + n)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", port + n + 10_000)).is_ok()
        });
        if free {
            return port;
        }
    }
    panic!("no free ports for a private Kafka cluster");
}

/// A local address no one listens on now (bound, then released): for a process to bind.
pub fn free_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free local port")
}
