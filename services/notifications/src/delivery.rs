//! The webhook delivery worker: leases due deliveries from Postgres, POSTs each signed
//! notification, records the attempt, and schedules the next one on failure.
//!
//! **Leases.** Due rows are picked with `FOR UPDATE SKIP LOCKED` and leased (`leased_until`) in one
//! statement, so several instances share the queue and none sends a delivery another holds; a
//! crash mid-delivery leaves a lease that runs out and the delivery is sent again (at least once;
//! `webhook-id` lets the receiver deduplicate).
//!
//! **Retries.** An answer other than 2xx, or none within the timeout, fails the attempt. The
//! next one waits the schedule's next step, with ±10 % jitter so endpoints that failed together
//! are not retried together; when the schedule runs out the delivery is `failed`. The default
//! schedule, as Svix's: at once, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h — about 27.6 hours
//! in all, long enough to ride out a receiver's bad day and a night's outage, short enough that a
//! merchant whose endpoint is gone for good is not sent the same event for days.
//!
//! **Isolation.** At most `per_endpoint` deliveries to one endpoint are in flight at once (per
//! instance), every request has a timeout, and the lease takes from each endpoint only the room
//! it has, so the worker never holds deliveries waiting on a slow endpoint: one dead endpoint's
//! backlog never delays the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::webhook::{headers, SigningSecret};
use crate::NotificationsError;

/// How the worker delivers.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// The wait before each retry: the first attempt is at once, the second after `schedule[0]`…
    pub schedule: Vec<Duration>,
    /// Longest wait for an answer.
    pub timeout: Duration,
    /// Deliveries in flight to one endpoint at most.
    pub per_endpoint: usize,
    /// Deliveries in flight in all at most.
    pub concurrency: usize,
    /// Whether endpoints may be http or resolve to private addresses (local development).
    pub allow_private: bool,
    /// An endpoint whose every delivery failed for this long is disabled (and its merchant
    /// told, with a `webhook.endpoint_disabled` notification).
    pub disable_after: Duration,
}

/// `5s,5m,30m,2h,5h,10h,10h` and the like.
pub fn parse_schedule(text: &str) -> Result<Vec<Duration>, String> {
    text.split(',').map(parse_duration).collect()
}

/// `300ms`, `5s`, `5m`, `2h`, `5d`.
pub fn parse_duration(step: &str) -> Result<Duration, String> {
    {
        {
            let step = step.trim();
            let (number, unit) = step.split_at(
                step.find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(step.len()),
            );
            let value: u64 = number.parse().map_err(|_| {
                format!("{step:?}: a duration is a number and a unit (ms, s, m, h, d)")
            })?;
            Ok(match unit {
                "ms" => Duration::from_millis(value),
                "s" => Duration::from_secs(value),
                "m" => Duration::from_secs(value * 60),
                "h" => Duration::from_secs(value * 3600),
                "d" => Duration::from_secs(value * 86_400),
                _ => return Err(format!("{step:?}: the unit is ms, s, m, h or d")),
            })
        }
    }
}

#[derive(sqlx::FromRow)]
struct Due {
    endpoint_id: String,
    notification_id: uuid::Uuid,
    attempts: i32,
    round_start: i32,
    merchant_id: String,
    url: String,
    signing_secret: String,
    /// Still signing during a rotation's overlap.
    previous_signing_secret: Option<String>,
    payload: String,
    /// The W3C trace context of the notification (none for a test delivery).
    traceparent: Option<String>,
}

/// What one attempt got.
struct Outcome {
    status_code: u16,
    latency: Duration,
    excerpt: String,
}

const EXCERPT: usize = 512;

type HttpClient = Client<
    hyper_tls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// One attempt, in a client span (`POST`, OpenTelemetry HTTP conventions) in the trace of the
/// event it announces. The span names the endpoint's host, never its path or query (a URL may
/// carry the receiver's own token).
async fn attempt(client: &HttpClient, due: &Due, settings: &DeliverySettings) -> Outcome {
    let host = due
        .url
        .parse::<hyper::Uri>()
        .ok()
        .and_then(|uri| uri.host().map(str::to_owned))
        .unwrap_or_default();
    let span = tracing::info_span!(
        "POST",
        "otel.name" = "POST webhook",
        "otel.kind" = "client",
        "otel.status_code" = tracing::field::Empty,
        "http.request.method" = "POST",
        "server.address" = %host,
        "http.response.status_code" = tracing::field::Empty,
        "tandem.webhook.endpoint_id" = %due.endpoint_id,
        "tandem.notification_id" = %due.notification_id,
        "tandem.merchant_id" = %due.merchant_id,
        "tandem.webhook.attempt" = due.attempts,
    );
    if let Some(traceparent) = &due.traceparent {
        tandem_telemetry::set_parent_from_headers(&span, [("traceparent", traceparent.as_str())]);
    }
    let outcome =
        tracing::Instrument::instrument(attempt_untraced(client, due, settings), span.clone())
            .await;
    if outcome.status_code > 0 {
        span.record("http.response.status_code", outcome.status_code);
    }
    if !(200..300).contains(&outcome.status_code) {
        span.record("otel.status_code", "ERROR");
    }
    outcome
}

async fn attempt_untraced(client: &HttpClient, due: &Due, settings: &DeliverySettings) -> Outcome {
    let started = Instant::now();
    let failed = |excerpt: String| Outcome {
        status_code: 0,
        latency: started.elapsed(),
        excerpt,
    };
    let secret = match SigningSecret::parse(&due.signing_secret) {
        Ok(secret) => secret,
        Err(reason) => return failed(format!("the endpoint's secret is unusable: {reason}")),
    };
    let previous = due
        .previous_signing_secret
        .as_deref()
        .and_then(|text| SigningSecret::parse(text).ok());
    let mut secrets = vec![&secret];
    secrets.extend(previous.as_ref());
    // The URL was checked when registered; its host may resolve elsewhere since.
    if let Err(reason) = crate::endpoints::check_url(&due.url, settings.allow_private).await {
        return failed(reason);
    }
    let id = due.notification_id.to_string();
    let now = Utc::now().timestamp();
    let body = Bytes::from(due.payload.clone());
    let mut request = hyper::Request::post(&due.url)
        .header("content-type", "application/json")
        .header("user-agent", "Tandem-Webhooks/1");
    for (name, value) in headers(&secrets, &id, now, &body) {
        request = request.header(name, value);
    }
    let request = match request.body(Full::new(body)) {
        Ok(request) => request,
        Err(error) => return failed(format!("could not build the request: {error}")),
    };
    match tokio::time::timeout(settings.timeout, client.request(request)).await {
        Err(_) => failed(format!(
            "no answer within {} ms",
            settings.timeout.as_millis()
        )),
        Ok(Err(error)) => failed(format!("could not deliver: {error}")),
        Ok(Ok(response)) => {
            let status_code = response.status().as_u16();
            let latency = started.elapsed();
            // Read at most a little more than the excerpt, within what is left of the timeout.
            let left = settings.timeout.saturating_sub(latency);
            let body = tokio::time::timeout(
                left,
                Limited::new(response.into_body(), EXCERPT * 4).collect(),
            )
            .await;
            let excerpt = match body {
                Ok(Ok(collected)) => {
                    let bytes = collected.to_bytes();
                    String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT)]).into_owned()
                }
                _ => String::new(),
            };
            Outcome {
                status_code,
                latency,
                excerpt,
            }
        }
    }
}

/// ±10 % of `wait`.
fn jittered(wait: Duration) -> Duration {
    let spread = wait.as_millis() as u64 / 10;
    if spread == 0 {
        return wait;
    }
    let offset = rand::random::<u64>() % (2 * spread + 1);
    Duration::from_millis(wait.as_millis() as u64 - spread + offset)
}

/// Records the outcomes of a group of attempts in one transaction: each attempt, each
/// delivery's next state, and each endpoint's failing spell (which may disable it). One commit
/// for many deliveries keeps Postgres's fsyncs off the per-delivery path.
async fn record(
    pool: &PgPool,
    group: &[(Due, Outcome)],
    settings: &DeliverySettings,
) -> Result<(), NotificationsError> {
    let mut endpoint_ids = Vec::with_capacity(group.len());
    let mut notification_ids = Vec::with_capacity(group.len());
    let mut attempts = Vec::with_capacity(group.len());
    let mut status_codes = Vec::with_capacity(group.len());
    let mut latencies = Vec::with_capacity(group.len());
    let mut excerpts = Vec::with_capacity(group.len());
    let mut statuses = Vec::with_capacity(group.len());
    let mut next_attempts = Vec::with_capacity(group.len());
    // Per endpoint: whether any attempt of the group succeeded, and one failed delivery's
    // merchant (for the failing-spell bookkeeping).
    let mut endpoints: std::collections::BTreeMap<&str, (bool, &str)> = Default::default();
    for (due, outcome) in group {
        let succeeded = (200..300).contains(&outcome.status_code);
        let attempt = due.attempts; // already counted when leased
                                    // The schedule counts the attempts of this round (a redelivery or replay starts one).
        let next = usize::try_from(attempt - due.round_start - 1)
            .ok()
            .and_then(|index| settings.schedule.get(index))
            .copied();
        let (status, next_attempt_at) = match (succeeded, next) {
            (true, _) => ("succeeded", Utc::now()),
            (false, Some(wait)) => (
                "pending",
                Utc::now() + chrono::Duration::from_std(jittered(wait)).unwrap_or_default(),
            ),
            (false, None) => ("failed", Utc::now()),
        };
        endpoint_ids.push(due.endpoint_id.as_str());
        notification_ids.push(due.notification_id);
        attempts.push(attempt);
        status_codes.push(i32::from(outcome.status_code));
        latencies.push(i32::try_from(outcome.latency.as_millis()).unwrap_or(i32::MAX));
        excerpts.push(outcome.excerpt.as_str());
        statuses.push(status);
        next_attempts.push(next_attempt_at);
        let outcome_label = [opentelemetry::KeyValue::new(
            "outcome",
            if succeeded { "succeeded" } else { "failed" },
        )];
        crate::metrics::metrics().attempts.add(1, &outcome_label);
        crate::metrics::metrics()
            .duration
            .record(outcome.latency.as_secs_f64(), &outcome_label);
        let entry = endpoints
            .entry(due.endpoint_id.as_str())
            .or_insert((false, due.merchant_id.as_str()));
        entry.0 |= succeeded;
        if !succeeded {
            tracing::info!(
                endpoint_id = %due.endpoint_id,
                notification_id = %due.notification_id,
                attempt,
                status_code = outcome.status_code,
                next = status,
                "webhook attempt failed"
            );
        }
    }
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO webhook_attempts (endpoint_id, notification_id, attempt, at, status_code, latency_ms, excerpt) \
         SELECT e, n, a, now(), s, l, x FROM unnest($1::text[], $2::uuid[], $3::int[], $4::int[], $5::int[], $6::text[]) \
           AS t(e, n, a, s, l, x) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&endpoint_ids)
    .bind(&notification_ids)
    .bind(&attempts)
    .bind(&status_codes)
    .bind(&latencies)
    .bind(&excerpts)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE webhook_deliveries d SET status = t.s, next_attempt_at = t.next, leased_until = NULL \
         FROM unnest($1::text[], $2::uuid[], $3::text[], $4::timestamptz[]) AS t(e, n, s, next) \
         WHERE d.endpoint_id = t.e AND d.notification_id = t.n",
    )
    .bind(&endpoint_ids)
    .bind(&notification_ids)
    .bind(&statuses)
    .bind(&next_attempts)
    .execute(&mut *tx)
    .await?;
    let answering: Vec<&str> = endpoints
        .iter()
        .filter(|(_, (succeeded, _))| *succeeded)
        .map(|(id, _)| *id)
        .collect();
    if !answering.is_empty() {
        // A success ends the failing spell.
        sqlx::query(
            "UPDATE webhook_endpoints SET failing_since = NULL \
             WHERE endpoint_id = ANY($1) AND failing_since IS NOT NULL",
        )
        .bind(&answering)
        .execute(&mut *tx)
        .await?;
    }
    let mut disabled = Vec::new();
    for (endpoint_id, (_, merchant_id)) in endpoints.iter().filter(|(_, (ok, _))| !ok) {
        if failing(&mut tx, endpoint_id, merchant_id, settings.disable_after).await? {
            disabled.push((*endpoint_id, *merchant_id));
        }
    }
    tx.commit().await?;
    for (endpoint_id, merchant_id) in disabled {
        crate::metrics::metrics().disabled.add(1, &[]);
        tracing::warn!(
            endpoint_id,
            merchant_id,
            "webhook endpoint disabled: its deliveries kept failing"
        );
    }
    Ok(())
}

/// An endpoint's attempts all failed: it is failing since the first failure after its last
/// success, and past `disable_after` it is disabled and its merchant told (once per spell).
/// Returns whether it was disabled now.
async fn failing(
    tx: &mut sqlx::PgConnection,
    endpoint_id: &str,
    merchant_id: &str,
    disable_after: Duration,
) -> Result<bool, NotificationsError> {
    let limit_ms = i64::try_from(disable_after.as_millis()).unwrap_or(i64::MAX);
    let turned_off: Option<(String, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE webhook_endpoints SET failing_since = coalesce(failing_since, now()), \
           enabled = CASE WHEN enabled AND coalesce(failing_since, now()) < now() - $2 * interval '1 millisecond' \
                          THEN false ELSE enabled END, \
           disabled_reason = CASE WHEN enabled AND coalesce(failing_since, now()) < now() - $2 * interval '1 millisecond' \
                          THEN 'failing since ' || to_char(failing_since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
                          ELSE disabled_reason END \
         WHERE endpoint_id = $1 \
         RETURNING url, failing_since, (NOT enabled AND disabled_reason LIKE 'failing since%') AS now_off",
    )
    .bind(endpoint_id)
    .bind(limit_ms)
    .fetch_optional(&mut *tx)
    .await?
    .and_then(|(url, since, now_off): (String, DateTime<Utc>, bool)| now_off.then_some((url, since)));
    let Some((url, since)) = turned_off else {
        return Ok(false);
    };
    // Tell the merchant once: the notification's id derives from the failing spell.
    let notice = crate::intake::endpoint_disabled(
        merchant_id,
        endpoint_id,
        &url,
        since,
        tandem_proto::time::truncate_to_micros(Utc::now()),
    );
    let already: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM notifications WHERE notification_id = $1)",
    )
    .bind(notice.id)
    .fetch_one(&mut *tx)
    .await?;
    if already {
        return Ok(false);
    }
    let mut per_merchant = std::collections::BTreeMap::new();
    per_merchant.insert(merchant_id.to_owned(), vec![notice]);
    crate::intake::store(&mut *tx, &per_merchant).await?;
    Ok(true)
}

/// Records outcomes as they come, in groups: whatever arrived while the previous group was
/// being committed (at most `GROUP`) goes in the next. Ends when every sender is gone.
async fn recorder(
    pool: PgPool,
    settings: DeliverySettings,
    mut outcomes: tokio::sync::mpsc::Receiver<(Due, Outcome, Slot)>,
) {
    const GROUP: usize = 500;
    let mut group = Vec::with_capacity(GROUP);
    while outcomes.recv_many(&mut group, GROUP).await > 0 {
        let (records, slots): (Vec<(Due, Outcome)>, Vec<Slot>) = group
            .drain(..)
            .map(|(due, outcome, slot)| ((due, outcome), slot))
            .unzip();
        if let Err(error) = record(&pool, &records, &settings).await {
            // The leases run out and the deliveries are attempted again.
            tracing::warn!(error = %tandem_runtime::error_chain(&error), deliveries = records.len(), "recording webhook attempts failed");
        }
        drop(slots);
    }
}

/// Leases up to `limit` due deliveries for `lease`, oldest first, taking from each enabled
/// endpoint no more than the room it has: `per_endpoint` less what this instance already has in
/// flight to it (`busy`). A dead endpoint's backlog thus never fills the worker: the others'
/// deliveries are leased beside it.
async fn lease(
    pool: &PgPool,
    limit: i64,
    per_endpoint: i32,
    busy: &HashMap<String, usize>,
    lease: Duration,
    only: Option<&str>,
) -> Result<Vec<Due>, NotificationsError> {
    let (busy_ids, busy_counts): (Vec<String>, Vec<i32>) = busy
        .iter()
        .map(|(id, n)| (id.clone(), i32::try_from(*n).unwrap_or(i32::MAX)))
        .unzip();
    // A lease need not survive a crash of Postgres: if it is lost, the delivery is leased again
    // sooner, which at-least-once delivery allows. So its commit does not wait for the disk.
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    let due = sqlx::query_as(
        "WITH room AS ( \
           SELECT e.endpoint_id, $3::int - coalesce(b.busy, 0) AS room \
           FROM webhook_endpoints e LEFT JOIN unnest($4::text[], $5::int[]) AS b(endpoint_id, busy) USING (endpoint_id) \
           WHERE e.enabled AND $3::int - coalesce(b.busy, 0) > 0 AND ($6::text IS NULL OR e.endpoint_id = $6)), \
         due AS ( \
           SELECT x.endpoint_id, x.notification_id FROM room CROSS JOIN LATERAL ( \
             SELECT d.endpoint_id, d.notification_id, d.next_attempt_at FROM webhook_deliveries d \
             WHERE d.endpoint_id = room.endpoint_id AND d.status = 'pending' AND d.next_attempt_at <= now() \
               AND (d.leased_until IS NULL OR d.leased_until < now()) \
             ORDER BY d.next_attempt_at LIMIT room.room FOR UPDATE OF d SKIP LOCKED) x \
           ORDER BY x.next_attempt_at LIMIT $1), \
         leased AS ( \
           UPDATE webhook_deliveries d SET leased_until = now() + $2 * interval '1 millisecond', attempts = d.attempts + 1 \
           FROM due WHERE d.endpoint_id = due.endpoint_id AND d.notification_id = due.notification_id \
           RETURNING d.endpoint_id, d.notification_id, d.attempts, d.round_start, d.merchant_id) \
         SELECT l.endpoint_id, l.notification_id, l.attempts, l.round_start, l.merchant_id, e.url, e.signing_secret, \
           CASE WHEN e.previous_expires_at > now() THEN e.previous_signing_secret END AS previous_signing_secret, \
           coalesce(n.payload, t.payload) AS payload, n.traceparent \
         FROM leased l JOIN webhook_endpoints e USING (endpoint_id) \
           LEFT JOIN notifications n ON n.notification_id = l.notification_id \
           LEFT JOIN webhook_test_messages t ON t.notification_id = l.notification_id",
    )
    .bind(limit)
    .bind(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
    .bind(per_endpoint)
    .bind(&busy_ids)
    .bind(&busy_counts)
    .bind(only)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(due)
}

/// What this instance has in flight: requests per endpoint (until the answer), and deliveries
/// in all (until their outcome is recorded). Guards give their share back when dropped (also
/// when a delivery task panics).
#[derive(Default)]
struct InFlight {
    per_endpoint: HashMap<String, usize>,
    total: usize,
}

/// A request in flight to one endpoint.
struct EndpointSlot {
    in_flight: Arc<std::sync::Mutex<InFlight>>,
    endpoint_id: String,
    finished: Arc<Notify>,
}

impl Drop for EndpointSlot {
    fn drop(&mut self) {
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(busy) = in_flight.per_endpoint.get_mut(&self.endpoint_id) {
                *busy -= 1;
                if *busy == 0 {
                    in_flight.per_endpoint.remove(&self.endpoint_id);
                }
            }
        }
        self.finished.notify_one();
    }
}

/// A delivery leased and not yet recorded.
struct Slot {
    in_flight: Arc<std::sync::Mutex<InFlight>>,
    finished: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .total -= 1;
        self.finished.notify_one();
    }
}

/// Deliveries this many in a row to one endpoint at most, before a lane gives its slot back to
/// the main loop's fair share-out.
const LANE_RUN: usize = 64;

/// One of an endpoint's (at most `per_endpoint`) concurrent lanes: it delivers, hands the
/// outcome to the recorder, and goes on with the endpoint's next due delivery (a one-endpoint
/// lease, cheap) while there is one, room in all, and at most [`LANE_RUN`] in a row. A busy
/// endpoint is thus served at the pace it answers, without waiting for the main loop's lease
/// over every endpoint.
struct Lane {
    pool: PgPool,
    client: HttpClient,
    settings: DeliverySettings,
    outcomes: tokio::sync::mpsc::Sender<(Due, Outcome, Slot)>,
    in_flight: Arc<std::sync::Mutex<InFlight>>,
    finished: Arc<Notify>,
    lease_for: Duration,
    shutdown: CancellationToken,
}

impl Lane {
    async fn run(self, mut due: Due, mut slot: Slot, endpoint_slot: EndpointSlot) {
        for run in 1.. {
            let outcome = attempt(&self.client, &due, &self.settings).await;
            let endpoint_id = due.endpoint_id.clone();
            // If the recorder is gone (shutting down), the lease runs out and the delivery is
            // attempted again.
            if self.outcomes.send((due, outcome, slot)).await.is_err()
                || self.shutdown.is_cancelled()
                || run >= LANE_RUN
            {
                break;
            }
            // Room in all for one more?
            slot = {
                let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                if in_flight.total >= self.settings.concurrency {
                    break;
                }
                in_flight.total += 1;
                Slot {
                    in_flight: self.in_flight.clone(),
                    finished: self.finished.clone(),
                }
            };
            let next = lease(
                &self.pool,
                1,
                1,
                &HashMap::new(),
                self.lease_for,
                Some(&endpoint_id),
            )
            .await;
            match next {
                Ok(mut next) if !next.is_empty() => due = next.remove(0),
                _ => break,
            }
        }
        drop(endpoint_slot);
    }
}

/// Records the queue's gauges (a failed query records nothing).
async fn measure_queue(pool: &PgPool) {
    let measured: Result<(i64, Option<f64>), sqlx::Error> = sqlx::query_as(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM webhook_deliveries WHERE status = 'pending' LIMIT 100000) AS waiting), \
           (SELECT extract(epoch FROM now() - min(next_attempt_at))::float8 FROM webhook_deliveries \
            WHERE status = 'pending' AND next_attempt_at <= now())",
    )
    .fetch_one(pool)
    .await;
    if let Ok((pending, oldest)) = measured {
        let metrics = crate::metrics::metrics();
        metrics.pending.record(pending, &[]);
        metrics
            .oldest_due_age
            .record(oldest.unwrap_or(0.0).max(0.0), &[]);
    }
}

/// Delivers until `shutdown`.
pub async fn run(
    pool: PgPool,
    settings: DeliverySettings,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let connector = match hyper_tls::native_tls::TlsConnector::new() {
        Ok(tls) => {
            let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
            http.enforce_http(false);
            http.set_connect_timeout(Some(settings.timeout));
            hyper_tls::HttpsConnector::from((http, tls.into()))
        }
        Err(error) => {
            tracing::error!(error = %error, "no TLS for webhook deliveries; none will be sent");
            return;
        }
    };
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    // The counter exists (at 0) before the first endpoint is disabled, so an alert on its
    // increase has a series to look at.
    crate::metrics::metrics().disabled.add(0, &[]);
    let in_flight: Arc<std::sync::Mutex<InFlight>> = Arc::default();
    let finished = Arc::new(Notify::new());
    let (outcomes, recorded) = tokio::sync::mpsc::channel(settings.concurrency.max(1));
    tokio::spawn(recorder(pool.clone(), settings.clone(), recorded));
    let per_endpoint = i32::try_from(settings.per_endpoint).unwrap_or(i32::MAX);
    // A lease outlives the slowest attempt with a margin.
    let lease_for = settings.timeout * 3;
    let mut last_measured: Option<std::time::Instant> = None;
    loop {
        if last_measured.is_none_or(|at| at.elapsed() >= Duration::from_secs(5)) {
            last_measured = Some(std::time::Instant::now());
            measure_queue(&pool).await;
        }
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let (free, busy) = {
            let in_flight = in_flight.lock().unwrap_or_else(|e| e.into_inner());
            (
                settings.concurrency.saturating_sub(in_flight.total),
                in_flight.per_endpoint.clone(),
            )
        };
        let due = if free == 0 {
            Vec::new()
        } else {
            match lease(&pool, free as i64, per_endpoint, &busy, lease_for, None).await {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(error = %tandem_runtime::error_chain(&error), "leasing webhook deliveries failed; trying again");
                    Vec::new()
                }
            }
        };
        let leased = due.len();
        for due in due {
            let (slot, endpoint_slot) = {
                let mut guard = in_flight.lock().unwrap_or_else(|e| e.into_inner());
                guard.total += 1;
                *guard
                    .per_endpoint
                    .entry(due.endpoint_id.clone())
                    .or_default() += 1;
                (
                    Slot {
                        in_flight: in_flight.clone(),
                        finished: finished.clone(),
                    },
                    EndpointSlot {
                        in_flight: in_flight.clone(),
                        endpoint_id: due.endpoint_id.clone(),
                        finished: finished.clone(),
                    },
                )
            };
            let lane = Lane {
                pool: pool.clone(),
                client: client.clone(),
                settings: settings.clone(),
                outcomes: outcomes.clone(),
                in_flight: in_flight.clone(),
                finished: finished.clone(),
                lease_for,
                shutdown: shutdown.clone(),
            };
            tokio::spawn(lane.run(due, slot, endpoint_slot));
        }
        if leased > 0 {
            continue;
        }
        // Nothing to lease (or no room): look again when something is queued, a delivery
        // finishes (room again), or a retry falls due.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = &mut woken => {}
            () = finished.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Deliveries of an endpoint, newest first, from `offset`, with their attempts.
pub(crate) async fn list(
    pool: &PgPool,
    endpoint_id: &str,
    only: Option<uuid::Uuid>,
    offset: i64,
    limit: i64,
) -> Result<Vec<tandem_proto::v1::WebhookDelivery>, NotificationsError> {
    use tandem_proto::v1 as pb;
    type Row = (uuid::Uuid, String, i64, String, chrono::DateTime<Utc>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT d.notification_id, coalesce(n.type, 'webhook.test'), d.cursor, d.status, d.next_attempt_at \
         FROM webhook_deliveries d LEFT JOIN notifications n ON n.notification_id = d.notification_id \
         WHERE d.endpoint_id = $1 AND ($4::uuid IS NULL OR d.notification_id = $4) \
         ORDER BY d.cursor DESC, d.notification_id DESC OFFSET $2 LIMIT $3",
    )
    .bind(endpoint_id)
    .bind(offset)
    .bind(limit)
    .bind(only)
    .fetch_all(pool)
    .await?;
    let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.0).collect();
    type AttemptRow = (uuid::Uuid, i32, chrono::DateTime<Utc>, i32, i32, String);
    let attempts: Vec<AttemptRow> = sqlx::query_as(
        "SELECT notification_id, attempt, at, status_code, latency_ms, excerpt FROM webhook_attempts \
         WHERE endpoint_id = $1 AND notification_id = ANY($2) ORDER BY attempt",
    )
    .bind(endpoint_id)
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let mut by_delivery: HashMap<uuid::Uuid, Vec<pb::WebhookAttempt>> = HashMap::new();
    for (id, attempt, at, status, latency, excerpt) in attempts {
        by_delivery.entry(id).or_default().push(pb::WebhookAttempt {
            attempt: u32::try_from(attempt).unwrap_or(0),
            at: Some(tandem_proto::time::timestamp(at)),
            status_code: u32::try_from(status).unwrap_or(0),
            latency_ms: u32::try_from(latency).unwrap_or(0),
            excerpt,
        });
    }
    Ok(rows
        .into_iter()
        .map(|(id, kind, cursor, status, next)| pb::WebhookDelivery {
            notification_id: id.to_string(),
            r#type: kind,
            cursor: u64::try_from(cursor).unwrap_or(0),
            status,
            next_attempt_at: Some(tandem_proto::time::timestamp(next)),
            attempts: by_delivery.remove(&id).unwrap_or_default(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_jitter_stays_within_ten_percent() {
        let schedule = parse_schedule("5s,5m,30m,2h,5h,10h,10h").unwrap();
        assert_eq!(schedule[0], Duration::from_secs(5));
        assert_eq!(schedule[6], Duration::from_secs(36_000));
        assert!(parse_schedule("5x").is_err());
        assert!(parse_schedule("").is_err());
        for _ in 0..100 {
            let wait = jittered(Duration::from_secs(100)).as_millis();
            assert!((90_000..=110_000).contains(&wait), "{wait}");
        }
    }
}
