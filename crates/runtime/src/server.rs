//! The gRPC server every service runs: its own services plus health and reflection.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::{JoinError, JoinSet};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport error")]
    Transport(#[from] tonic::transport::Error),
    #[error("{task} stopped while the service was running")]
    TaskFailed {
        task: String,
        #[source]
        cause: Option<BoxError>,
    },
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `tandem.ready` (gauge): 1 while the service reports SERVING, 0 while not ready.
fn ready_gauge() -> &'static opentelemetry::metrics::Gauge<u64> {
    static READY: std::sync::OnceLock<opentelemetry::metrics::Gauge<u64>> =
        std::sync::OnceLock::new();
    READY.get_or_init(|| {
        tandem_telemetry::meter()
            .u64_gauge("tandem.ready")
            .with_description("1 while the service is ready (health SERVING), 0 while not.")
            .build()
    })
}

/// The health service name that reports whether the process is alive (SERVING until it shuts
/// down), for liveness probes; readiness is the overall status, "".
pub const LIVENESS: &str = "liveness";

/// How long health reports NOT_SERVING before the listener closes after a background task
/// failed, so that load balancers and probes see it rather than only a refused connection.
const FAILURE_DRAIN: Duration = Duration::from_secs(1);
/// Longest wait for background tasks to finish after the server stopped.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The tasks a service cannot work without: its consumers, its outbox relay. They run until
/// shutdown; one that ends before (with an error, a panic, or even `Ok`) means the service is
/// broken, and [`serve`] then reports NOT_SERVING and returns an error so the process exits
/// non-zero and its supervisor restarts it.
#[derive(Default)]
pub struct BackgroundTasks {
    set: JoinSet<(String, Result<(), BoxError>)>,
    readiness: tandem_bus::Readiness,
    probes: Vec<Probe>,
}

/// A dependency whose reachability decides readiness.
enum Probe {
    Database(sqlx::PgPool),
    Brokers(tandem_bus::BusConfig),
}

impl BackgroundTasks {
    /// The service's readiness: hand it to consumers (`ConsumerSettings::readiness`); the
    /// server reports NOT_SERVING while any of its conditions is set.
    pub fn readiness(&self) -> tandem_bus::Readiness {
        self.readiness.clone()
    }

    /// Not ready while Postgres does not answer (probed every 5 s).
    pub fn probe_database(&mut self, pool: sqlx::PgPool) {
        self.probes.push(Probe::Database(pool));
    }

    /// Not ready while no Kafka broker answers (probed every 5 s).
    pub fn probe_brokers(&mut self, config: tandem_bus::BusConfig) {
        self.probes.push(Probe::Brokers(config));
    }

    pub fn spawn<E>(
        &mut self,
        name: impl Into<String>,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) where
        E: std::error::Error + Send + Sync + 'static,
    {
        let name = name.into();
        self.set.spawn(async move {
            let result = task.await.map_err(|error| Box::new(error) as BoxError);
            (name, result)
        });
    }

    /// Prunes the service's `applied_messages` and `also` as `retention` says, until `shutdown`
    /// (see [`BackgroundTasks::prune`]).
    pub fn prune_bookkeeping(
        &mut self,
        pool: sqlx::PgPool,
        retention: &crate::RetentionArgs,
        also: Vec<tandem_store::Retention>,
        shutdown: CancellationToken,
    ) {
        let mut tables = vec![retention.applied_messages()];
        tables.extend(also);
        self.prune(pool, tables, retention.prune_every(), shutdown);
    }

    /// Prunes `tables` every `every` until `shutdown`, the first time five minutes after start
    /// (or one period, if shorter), so that a service restarted more often than the period still
    /// prunes. A prune that fails (Postgres away) is logged and tried again at the next period;
    /// it never ends the service.
    pub fn prune(
        &mut self,
        pool: sqlx::PgPool,
        tables: Vec<tandem_store::Retention>,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        self.spawn("bookkeeping pruning", async move {
            let mut wait = every.min(Duration::from_secs(300));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok::<(), std::convert::Infallible>(()),
                    () = tokio::time::sleep(wait) => {}
                }
                wait = every;
                for table in &tables {
                    let started = std::time::Instant::now();
                    match tandem_store::prune(&pool, table).await {
                        Ok(deleted) => tracing::info!(
                            table = table.table,
                            deleted,
                            retention_secs = table.keep_for.as_secs(),
                            duration_ms = started.elapsed().as_millis() as u64,
                            "pruned bookkeeping rows past their retention"
                        ),
                        Err(error) => tracing::warn!(
                            table = table.table,
                            error = %crate::error_chain(&error),
                            "could not prune bookkeeping rows; trying again at the next period"
                        ),
                    }
                }
            }
        });
    }
}

/// Serves `routes` on `listener`, with gRPC health (each name in `service_names` reported as
/// serving, and the overall "" status) and server reflection v1 and v1alpha, until `shutdown` is
/// cancelled or one of `tasks` ends. In-flight calls finish before this returns. `access` says
/// whether calls need the service token (the internal APIs) or not (the merchant gateway); `tls`
/// is the certificate served ([`crate::TlsArgs::server`]), `None` for plaintext.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    routes: Routes,
    access: crate::ServiceAuthLayer,
    service_names: &[&str],
    mut tasks: BackgroundTasks,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in service_names {
        health_reporter
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    // Reflection lists what this server serves, not every service in the shared descriptors
    // (the gateway must not advertise the ledger's internal API).
    let reflection = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        service_names
            .iter()
            .fold(builder, |builder, name| builder.with_service_name(*name))
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let routes = routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let address = listener.local_addr().ok();
    tracing::info!(address = ?address, services = ?service_names, "gRPC server listening");
    let shutting_down = shutdown.clone();
    let reporter = health_reporter.clone();
    let builder = match tls {
        Some(tls) => Server::builder().tls_config(tls)?,
        None => Server::builder(),
    };
    let server = builder
        .layer(crate::RpcMetricsLayer::new())
        .layer(access)
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutting_down.cancelled().await;
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        });
    tokio::pin!(server);
    for probe in tasks.probes.drain(..) {
        let (readiness, shutdown) = (tasks.readiness.clone(), shutdown.clone());
        match probe {
            Probe::Database(pool) => {
                tokio::spawn(tandem_bus::watch_database(pool, readiness, shutdown));
            }
            Probe::Brokers(config) => {
                tokio::spawn(tandem_bus::watch_brokers(config, readiness, shutdown));
            }
        }
    }
    // Readiness: the overall status ("") and every service's follow the conditions; `liveness`
    // stays SERVING until shutdown, whatever they say.
    health_reporter
        .set_service_status(LIVENESS, tonic_health::ServingStatus::Serving)
        .await;
    let mut conditions = tasks.readiness.subscribe();
    conditions.mark_changed();
    let mut failure: Option<ServeError> = None;
    let served = loop {
        tokio::select! {
            served = &mut server => break served,
            Ok(()) = conditions.changed(), if failure.is_none() && !shutdown.is_cancelled() => {
                let problems = conditions.borrow_and_update().clone();
                ready_gauge().record(u64::from(problems.is_empty()), &[]);
                let status = if problems.is_empty() {
                    tracing::info!("ready: reporting SERVING");
                    tonic_health::ServingStatus::Serving
                } else {
                    tracing::warn!(problems = ?problems, "not ready: reporting NOT_SERVING");
                    tonic_health::ServingStatus::NotServing
                };
                for name in service_names.iter().copied().chain([""]) {
                    health_reporter.set_service_status(name, status).await;
                }
            }
            Some(joined) = tasks.set.join_next(), if !tasks.set.is_empty() => {
                if shutdown.is_cancelled() {
                    continue;
                }
                let error = task_failure(joined);
                tracing::error!(error = %crate::error_chain(&error), "a background task stopped; reporting NOT_SERVING and shutting down");
                for name in service_names.iter().copied().chain([""]) {
                    health_reporter
                        .set_service_status(name, tonic_health::ServingStatus::NotServing)
                        .await;
                }
                failure = Some(error);
                tokio::time::sleep(FAILURE_DRAIN).await;
                shutdown.cancel();
            }
        }
    };
    shutdown.cancel();
    tracing::info!("gRPC server stopped");
    let stopping = async { while tasks.set.join_next().await.is_some() {} };
    if tokio::time::timeout(TASK_STOP_TIMEOUT, stopping)
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within 30 s; abandoning them");
        tasks.set.abort_all();
    }
    if let Some(failure) = failure {
        return Err(failure);
    }
    served?;
    Ok(())
}

fn task_failure(joined: Result<(String, Result<(), BoxError>), JoinError>) -> ServeError {
    match joined {
        Ok((task, Ok(()))) => ServeError::TaskFailed { task, cause: None },
        Ok((task, Err(cause))) => ServeError::TaskFailed {
            task,
            cause: Some(cause),
        },
        Err(join_error) => ServeError::TaskFailed {
            task: "a background task".to_owned(),
            cause: Some(Box::new(join_error)),
        },
    }
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub fn shutdown_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut terminate =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(signal) => signal,
                    Err(error) => {
                        tracing::error!(error = %error, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        token.cancel();
    });
}

/// The W3C trace context headers of a gRPC request's metadata.
pub fn grpc_metadata_trace_headers(metadata: &tonic::metadata::MetadataMap) -> Vec<(&str, &str)> {
    ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| Some((name, metadata.get(name)?.to_str().ok()?)))
        .collect()
}

/// Records the trace id in the current span's `trace_id` field (the handler's span), so its log
/// lines name the trace. The span is already in the caller's trace: the server span around every
/// call (`RpcMetricsLayer`) took the caller's `traceparent`, and the handler's span nests in it.
pub fn link_request_span<T>(_request: &tonic::Request<T>) {
    tandem_telemetry::record_trace_id(&tracing::Span::current());
}
