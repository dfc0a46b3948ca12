//! Whether a service is ready for traffic, as the conditions that say it is not: each part that
//! can fail (a consumer group, the database, the broker) sets or clears its own. The gRPC server
//! reports NOT_SERVING while any is set (`tandem_runtime::serve`), and says which in its logs.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

/// Cheap to clone: every clone sees and changes the same conditions.
#[derive(Clone, Debug)]
pub struct Readiness(Arc<watch::Sender<BTreeMap<String, String>>>);

impl Default for Readiness {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(BTreeMap::new())))
    }
}

impl Readiness {
    /// Sets `condition` to `problem` (not ready because of it), or clears it with `None`.
    pub fn set(&self, condition: &str, problem: Option<String>) {
        self.0.send_if_modified(|conditions| match problem {
            Some(problem) => {
                if conditions.get(condition) == Some(&problem) {
                    false
                } else {
                    conditions.insert(condition.to_owned(), problem);
                    true
                }
            }
            None => conditions.remove(condition).is_some(),
        });
    }

    /// The conditions set now: empty when ready.
    pub fn problems(&self) -> BTreeMap<String, String> {
        self.0.borrow().clone()
    }

    /// Sees every change.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, String>> {
        self.0.subscribe()
    }
}

/// How often the database and the brokers are probed, and the longest a probe may take.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Sets condition `postgres` while `SELECT 1` fails or takes longer than 2 s (every 5 s), until
/// `shutdown`.
pub async fn watch_database(
    pool: sqlx::PgPool,
    readiness: Readiness,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let answered = tokio::time::timeout(
            PROBE_TIMEOUT,
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&pool),
        )
        .await;
        let problem = match answered {
            Ok(Ok(_)) => None,
            Ok(Err(error)) => Some(format!("Postgres does not answer: {error}")),
            Err(_) => Some(format!(
                "Postgres does not answer within {} s",
                PROBE_TIMEOUT.as_secs()
            )),
        };
        if let Some(problem) = &problem {
            tracing::warn!(problem = %problem, "not ready: the database");
        }
        readiness.set("postgres", problem);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}

/// Sets condition `kafka` while no broker answers a metadata request within 2 s (every 5 s),
/// until `shutdown`.
pub async fn watch_brokers(
    config: crate::BusConfig,
    readiness: Readiness,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = match config.client_config().create() {
        Ok(client) => client,
        Err(error) => {
            readiness.set("kafka", Some(format!("no Kafka client: {error}")));
            return;
        }
    };
    let client = Arc::new(client);
    loop {
        let asking = client.clone();
        let answered = tokio::task::spawn_blocking(move || {
            asking
                .fetch_metadata(None, PROBE_TIMEOUT)
                .map(|metadata| metadata.brokers().len())
        })
        .await;
        let problem = match answered {
            Ok(Ok(brokers)) if brokers > 0 => None,
            Ok(Ok(_)) => Some("Kafka answered with no broker".to_owned()),
            Ok(Err(error)) => Some(format!("no Kafka broker answers: {error}")),
            Err(error) => Some(format!("the Kafka probe failed: {error}")),
        };
        if let Some(problem) = &problem {
            tracing::warn!(problem = %problem, "not ready: the brokers");
        }
        readiness.set("kafka", problem);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_set_and_clear() {
        let readiness = Readiness::default();
        let mut seen = readiness.subscribe();
        readiness.set("postgres", Some("unreachable".into()));
        assert!(seen.has_changed().unwrap());
        seen.mark_unchanged();
        readiness.set("postgres", Some("unreachable".into()));
        assert!(
            !seen.has_changed().unwrap(),
            "the same problem again is no change"
        );
        readiness.clone().set("postgres", None);
        assert!(readiness.problems().is_empty());
    }
}
