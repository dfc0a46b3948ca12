//! Closing Kafka group consumers without blocking the async runtime.
//!
//! Dropping an rdkafka consumer that has a `group.id` closes it synchronously: it leaves the
//! group and then polls, every 100 ms and with no bound, until librdkafka says it is closed.
//! Done on a runtime thread, a close that never finishes (a coordinator that does not answer,
//! a rebalance that does not end) stops every task on that thread, timers included, so a
//! service could neither stop nor time out its own stop. Here the drop runs on a thread of
//! its own and the caller waits for it a bounded time; a close that takes longer is left to
//! finish in the background (the group's session timeout removes the member anyway).

use std::time::Duration;

/// How long a stopping consumer waits for its client to leave the group.
pub(crate) const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// Drops `client` on a thread of its own and waits for that at most `within`.
pub(crate) async fn close_off_runtime<T: Send + 'static>(
    what: &'static str,
    group_id: &str,
    client: T,
    within: Duration,
) {
    let (closed, done) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("kafka-close".to_owned())
        .spawn(move || {
            drop(client);
            let _ = closed.send(());
        });
    if let Err(error) = spawned {
        // No thread to spare: the process is in trouble anyway; the client is leaked rather
        // than closed on the runtime (the group's session timeout removes the member).
        tracing::warn!(group_id = %group_id, client = what, error = %error, "could not close the Kafka client off the runtime");
        return;
    }
    if tokio::time::timeout(within, done).await.is_err() {
        tracing::warn!(
            group_id = %group_id,
            client = what,
            waited_ms = within.as_millis() as u64,
            "the Kafka client has not left its group yet: left to close in the background"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Slow(std::sync::mpsc::Receiver<()>);

    impl Drop for Slow {
        fn drop(&mut self) {
            // Blocks until the test lets it go, as a consumer's close can.
            let _ = self.0.recv();
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_close_that_never_ends_does_not_block_the_runtime() {
        let (release, hold) = std::sync::mpsc::channel();
        let started = std::time::Instant::now();
        close_off_runtime("test", "group", Slow(hold), Duration::from_millis(200)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        release.send(()).unwrap();
    }

    #[tokio::test]
    async fn a_quick_close_is_waited_for() {
        let (closed, check) = std::sync::mpsc::channel::<()>();
        struct Flag(std::sync::mpsc::Sender<()>);
        impl Drop for Flag {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        close_off_runtime("test", "group", Flag(closed), Duration::from_secs(5)).await;
        // Dropped by the time the call returned.
        assert!(check.try_recv().is_ok());
    }
}
