//! Writing purchases set-based, and group commit.
//!
//! [`write_purchases`] records any number of purchases in the caller's transaction with the same
//! seven statements whatever their number: the idempotency keys' locks, the keys' earlier answers,
//! the purchases, the admin sequence, the events, the outbox rows and the new answers. A bulk call
//! (`RecordPurchases`) is one such group.
//!
//! [`GroupCommit`] makes single calls (`RecordPurchase`) share that work: each call queues its
//! purchase; a few writers each take whatever is queued (up to [`GroupCommitSettings::max_group`],
//! waiting at most [`GroupCommitSettings::max_wait`] for more), write the group in one
//! transaction and answer every call after the commit. An acknowledgement still means the
//! purchase is committed; a group that fails is written again one purchase at a time, so one
//! call's fault never fails its neighbours.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::{PgConnection, PgPool};
use tandem_bus::Topic;
use tandem_domain::ids::{MerchantId, PurchaseId};
use tandem_proto::time::timestamp;
use tandem_proto::v1::{self as pb, event_envelope::Payload, EventEnvelope};
use tandem_store::OutboxMessage;
use tokio::sync::{mpsc, oneshot, Mutex, Notify};
use tracing::Instrument;
use uuid::Uuid;

use crate::bulk::Written;
use crate::commands::{Parsed, RecordPurchase};
use crate::GatewayError;

const OPERATION: &str = "RecordPurchase";

/// One purchase to write: validated, pseudonymised, with the trace context of its request.
pub struct PurchaseItem {
    pub merchant: MerchantId,
    pub parsed: Parsed<RecordPurchase>,
    pub headers: Vec<(String, String)>,
}

pub type Outcome = Result<Written<pb::RecordPurchaseResponse>, GatewayError>;

/// An idempotency key's first answer: operation, request fingerprint, encoded response.
type StoredAnswer = (String, Vec<u8>, Vec<u8>);
/// A stored answer's row: merchant, key, then the [`StoredAnswer`].
type StoredRow = (String, String, String, Vec<u8>, Vec<u8>);

/// How an item of a group is answered before anything is written.
enum Plan {
    /// A retry: the stored answer.
    Replay(pb::RecordPurchaseResponse),
    /// The key was used for a different request.
    Refused(String),
    /// The same key earlier in this group: answered as that item is.
    Follows(usize),
    /// New: written with this purchase id.
    Fresh(PurchaseId),
}

/// Writes `items` in the caller's transaction and answers each, in order. `Err` is a failure of
/// Tandem's own parts: nothing of the group may be committed then.
pub async fn write_purchases(
    connection: &mut PgConnection,
    items: &[PurchaseItem],
    now: DateTime<Utc>,
) -> Result<Vec<Outcome>, GatewayError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let merchants: Vec<&str> = items.iter().map(|i| i.merchant.as_str()).collect();
    let keys: Vec<&str> = items
        .iter()
        .map(|i| i.parsed.idempotency_key.as_str())
        .collect();
    // The keys' locks (the same as every other idempotent write takes), in one order so that two
    // groups never wait on each other in a cycle; held until the transaction ends.
    sqlx::query(
        "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(m || ':' || k, 0) AS h \
         FROM UNNEST($1::text[], $2::text[]) AS t(m, k)) s ORDER BY h",
    )
    .bind(&merchants)
    .bind(&keys)
    .execute(&mut *connection)
    .await?;
    let earlier: Vec<StoredRow> = sqlx::query_as(
        "SELECT merchant_id, idempotency_key, operation, request_fingerprint, response FROM idempotency_records \
         WHERE (merchant_id, idempotency_key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
    )
    .bind(&merchants)
    .bind(&keys)
    .fetch_all(&mut *connection)
    .await?;
    let earlier: HashMap<(String, String), StoredAnswer> = earlier
        .into_iter()
        .map(|(m, k, o, f, r)| ((m, k), (o, f, r)))
        .collect();

    let mut plans = Vec::with_capacity(items.len());
    let mut first_of_key: HashMap<(&str, &str), usize> = HashMap::new();
    for (index, item) in items.iter().enumerate() {
        let key = (item.merchant.as_str(), item.parsed.idempotency_key.as_str());
        let plan = if let Some((operation, fingerprint, response)) =
            earlier.get(&(key.0.to_owned(), key.1.to_owned()))
        {
            if operation == OPERATION
                && crate::commands::same_request(fingerprint, &item.parsed.fingerprint)
            {
                Plan::Replay(pb::RecordPurchaseResponse::decode(response.as_slice())?)
            } else {
                Plan::Refused(different_request(key.1, operation))
            }
        } else if let Some(&first) = first_of_key.get(&key) {
            if crate::commands::same_request(
                &items[first].parsed.fingerprint,
                &item.parsed.fingerprint,
            ) {
                Plan::Follows(first)
            } else {
                Plan::Refused(different_request(key.1, OPERATION))
            }
        } else {
            first_of_key.insert(key, index);
            Plan::Fresh(PurchaseId::generate())
        };
        plans.push(plan);
    }

    // The purchases; a transaction id already recorded (or twice in this group) is refused.
    // Refunds recorded before their purchase count against it from the start, up to the purchase
    // itself (the ledger cuts them down to it too): never a negative amount left.
    let fresh: Vec<usize> = (0..items.len())
        .filter(|&i| matches!(plans[i], Plan::Fresh(_)))
        .collect();
    let purchase_id = |i: usize| match &plans[i] {
        Plan::Fresh(id) => id.as_str(),
        _ => "",
    };
    let joined_keys = |i: usize| {
        items[i]
            .parsed
            .command
            .customer_keys
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let inserted: Vec<(String,)> = if fresh.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(
            "INSERT INTO purchases (merchant_id, transaction_id, purchase_id, amount_minor, currency, customer_keys, refunded_minor) \
             SELECT i.m, i.t, i.p, i.a, i.c, string_to_array(i.k, ','), \
               least(i.a, (SELECT coalesce(sum(r.amount_minor), 0) FROM refunds r WHERE r.merchant_id = i.m AND r.transaction_id = i.t)) \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[]) AS i(m, t, p, a, c, k) \
             ORDER BY i.m, i.t \
             ON CONFLICT (merchant_id, transaction_id) DO NOTHING RETURNING purchase_id",
        )
        .bind(fresh.iter().map(|&i| items[i].merchant.as_str()).collect::<Vec<_>>())
        .bind(fresh.iter().map(|&i| items[i].parsed.command.transaction_id.as_str()).collect::<Vec<_>>())
        .bind(fresh.iter().map(|&i| purchase_id(i)).collect::<Vec<_>>())
        .bind(fresh.iter().map(|&i| items[i].parsed.command.amount.amount_minor).collect::<Vec<_>>())
        .bind(fresh.iter().map(|&i| items[i].parsed.command.amount.currency.as_str()).collect::<Vec<_>>())
        .bind(fresh.iter().map(|&i| joined_keys(i)).collect::<Vec<_>>())
        .fetch_all(&mut *connection)
        .await?
    };
    let inserted: std::collections::HashSet<String> =
        inserted.into_iter().map(|(id,)| id).collect();
    let written: Vec<usize> = fresh
        .iter()
        .copied()
        .filter(|&i| inserted.contains(purchase_id(i)))
        .collect();

    // Their events and outbox rows (one a customer key), and the answers to their keys.
    let mut responses: HashMap<usize, pb::RecordPurchaseResponse> = HashMap::new();
    if !written.is_empty() {
        let admin_sequence: i64 = sqlx::query_scalar("SELECT value FROM admin_sequence")
            .fetch_one(&mut *connection)
            .await?;
        let mut stream_ids = Vec::with_capacity(written.len());
        let mut event_ids = Vec::with_capacity(written.len());
        let mut payloads = Vec::with_capacity(written.len());
        let mut messages = Vec::new();
        let mut answers = Vec::with_capacity(written.len());
        for &i in &written {
            let item = &items[i];
            let command = &item.parsed.command;
            let id = purchase_id(i);
            let customer_keys: Vec<String> = command
                .customer_keys
                .iter()
                .map(ToString::to_string)
                .collect();
            let event_id = Uuid::now_v7();
            let mut envelope = EventEnvelope {
                event_id: event_id.to_string(),
                recorded_at: Some(timestamp(now)),
                customer_key: String::new(),
                admin_sequence: u64::try_from(admin_sequence).unwrap_or(0),
                payload: Some(Payload::PurchaseRecorded(pb::PurchaseRecorded {
                    purchase_id: id.to_owned(),
                    merchant_id: item.merchant.to_string(),
                    transaction_id: command.transaction_id.clone(),
                    customer_keys: customer_keys.clone(),
                    amount: Some(pb::Money {
                        amount_minor: command.amount.amount_minor,
                        currency: command.amount.currency.to_string(),
                    }),
                    purchased_at: Some(timestamp(command.purchased_at)),
                })),
            };
            stream_ids.push(format!("purchase-{id}"));
            event_ids.push(event_id);
            payloads.push(envelope.encode_to_vec());
            for key in customer_keys {
                envelope.customer_key.clone_from(&key);
                messages.push(OutboxMessage {
                    topic: Topic::CustomerActivity.logical_name(),
                    partition_key: key.into_bytes(),
                    payload: envelope.encode_to_vec(),
                    headers: item.headers.clone(),
                });
            }
            let response = pb::RecordPurchaseResponse {
                purchase_id: id.to_owned(),
                purchased_at: Some(timestamp(command.purchased_at)),
            };
            answers.push(response.encode_to_vec());
            responses.insert(i, response);
            tracing::debug!(%event_id, purchase_id = id, "purchase recorded");
        }
        sqlx::query(
            "INSERT INTO events (stream_id, sequence, event_id, event_type, payload, recorded_at) \
             SELECT s, 1, e, 'PurchaseRecorded', p, $4 FROM UNNEST($1::text[], $2::uuid[], $3::bytea[]) AS t(s, e, p)",
        )
        .bind(&stream_ids)
        .bind(&event_ids)
        .bind(&payloads)
        .bind(now)
        .execute(&mut *connection)
        .await?;
        tandem_store::enqueue_outbox(&mut *connection, &messages).await?;
        sqlx::query(
            "INSERT INTO idempotency_records (merchant_id, idempotency_key, operation, request_fingerprint, response) \
             SELECT m, k, $3, f, r FROM UNNEST($1::text[], $2::text[], $4::bytea[], $5::bytea[]) AS t(m, k, f, r)",
        )
        .bind(written.iter().map(|&i| items[i].merchant.as_str()).collect::<Vec<_>>())
        .bind(written.iter().map(|&i| items[i].parsed.idempotency_key.as_str()).collect::<Vec<_>>())
        .bind(OPERATION)
        .bind(written.iter().map(|&i| items[i].parsed.fingerprint.as_slice()).collect::<Vec<_>>())
        .bind(&answers)
        .execute(&mut *connection)
        .await?;
    }

    let mut outcomes: Vec<Outcome> = Vec::with_capacity(items.len());
    for (index, plan) in plans.into_iter().enumerate() {
        let outcome = match plan {
            Plan::Replay(response) => {
                tracing::info!("idempotent retry answered from the first response");
                Ok(Written {
                    response,
                    fresh: false,
                })
            }
            Plan::Refused(message) => Err(GatewayError::AlreadyExists(message)),
            Plan::Fresh(_) => match responses.get(&index) {
                Some(response) => Ok(Written {
                    response: response.clone(),
                    fresh: true,
                }),
                None => Err(already_recorded(
                    &items[index].parsed.command.transaction_id,
                )),
            },
            Plan::Follows(first) => match &outcomes[first] {
                Ok(written) => Ok(Written {
                    response: written.response.clone(),
                    fresh: false,
                }),
                Err(_) => Err(already_recorded(
                    &items[index].parsed.command.transaction_id,
                )),
            },
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

fn different_request(key: &str, operation: &str) -> String {
    format!(
        "idempotency_key {key:?} was already used for a different {operation} request; \
         a retry must repeat the request exactly, and a new request needs a new key"
    )
}

fn already_recorded(transaction_id: &str) -> GatewayError {
    GatewayError::AlreadyExists(format!(
        "transaction_id {transaction_id:?} was already recorded, under another idempotency key or under this one longer ago than keys are remembered; a transaction is recorded once"
    ))
}

/// Group commit's settings: flags and environment of the gateway.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct GroupCommitSettings {
    /// Group commit: transactions writing single `RecordPurchase` calls at once (each holds one
    /// database connection while it writes).
    #[arg(long = "commit-writers", env = "TANDEM_GATEWAY_COMMIT_WRITERS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub writers: u16,
    /// Group commit: the most purchases one transaction takes.
    #[arg(long = "commit-max-group", env = "TANDEM_GATEWAY_COMMIT_MAX_GROUP", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=2000))]
    pub max_group: u16,
    /// Group commit: microseconds a writer waits for more calls once it has one, when fewer
    /// than the most are queued (0: it takes what is queued and goes).
    #[arg(long = "commit-wait-us", env = "TANDEM_GATEWAY_COMMIT_WAIT_US", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub wait_us: u32,
}

impl Default for GroupCommitSettings {
    fn default() -> Self {
        Self {
            writers: 4,
            max_group: 256,
            wait_us: 0,
        }
    }
}

impl GroupCommitSettings {
    fn max_group(&self) -> usize {
        usize::from(self.max_group.max(1))
    }

    fn max_wait(&self) -> Duration {
        Duration::from_micros(u64::from(self.wait_us))
    }
}

struct Job {
    item: PurchaseItem,
    reply: oneshot::Sender<Outcome>,
}

/// Single `RecordPurchase` calls, written in groups.
pub struct GroupCommit {
    queue: mpsc::Sender<Job>,
}

impl GroupCommit {
    /// Starts the writers. They end when the `GroupCommit` is dropped and the queue is empty.
    pub fn start(pool: PgPool, settings: GroupCommitSettings, outbox_written: Arc<Notify>) -> Self {
        let (queue, receiver) =
            mpsc::channel::<Job>(settings.max_group() * usize::from(settings.writers.max(1)) * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..settings.writers.max(1) {
            let receiver = receiver.clone();
            let pool = pool.clone();
            let outbox_written = outbox_written.clone();
            tokio::spawn(async move {
                while let Some(group) = next_group(&receiver, settings).await {
                    write_group(&pool, group, &outbox_written).await;
                }
            });
        }
        Self { queue }
    }

    /// Writes one purchase with whatever else is queued; answers after the commit.
    pub async fn submit(&self, item: PurchaseItem) -> Outcome {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { item, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> GatewayError {
    GatewayError::Unavailable(
        "the gateway is shutting down; retry the call with the same idempotency key".to_owned(),
    )
}

/// The next group: the first job to arrive, then what is queued, waiting up to `max_wait` for
/// more. `None` once the queue is closed and empty.
async fn next_group(
    receiver: &Mutex<mpsc::Receiver<Job>>,
    settings: GroupCommitSettings,
) -> Option<Vec<Job>> {
    let mut receiver = receiver.lock().await;
    let first = receiver.recv().await?;
    let mut group = vec![first];
    let deadline = tokio::time::Instant::now() + settings.max_wait();
    while group.len() < settings.max_group() {
        match receiver.try_recv() {
            Ok(job) => group.push(job),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                if settings.max_wait().is_zero() {
                    break;
                }
                match tokio::time::timeout_at(deadline, receiver.recv()).await {
                    Ok(Some(job)) => group.push(job),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
    Some(group)
}

async fn write_group(pool: &PgPool, group: Vec<Job>, outbox_written: &Notify) {
    let (items, replies): (Vec<PurchaseItem>, Vec<oneshot::Sender<Outcome>>) =
        group.into_iter().map(|job| (job.item, job.reply)).unzip();
    let size = items.len();
    match write_in_transaction(pool, &items)
        .instrument(tracing::debug_span!("group_commit", size))
        .await
    {
        Ok(outcomes) => answer(outcomes, replies, outbox_written),
        Err(error) if size > 1 => {
            // Find what failed, one purchase at a time: the others are still written.
            tracing::warn!(error = %tandem_runtime::error_chain(&error), size, "a group commit failed; writing its purchases one at a time");
            for (item, reply) in items.into_iter().zip(replies) {
                let outcome = match write_in_transaction(pool, std::slice::from_ref(&item)).await {
                    Ok(mut outcomes) => outcomes.pop().unwrap_or(Err(GatewayError::Invariant(
                        "a group of one written without its outcome",
                    ))),
                    Err(error) => Err(error),
                };
                answer(vec![outcome], vec![reply], outbox_written);
            }
        }
        Err(error) => answer(vec![Err(error)], replies, outbox_written),
    }
}

async fn write_in_transaction(
    pool: &PgPool,
    items: &[PurchaseItem],
) -> Result<Vec<Outcome>, GatewayError> {
    let mut tx = pool.begin().await?;
    let now = tandem_proto::time::truncate_to_micros(Utc::now());
    let outcomes = write_purchases(&mut tx, items, now).await?;
    tx.commit().await?;
    Ok(outcomes)
}

fn answer(outcomes: Vec<Outcome>, replies: Vec<oneshot::Sender<Outcome>>, outbox_written: &Notify) {
    if outcomes.iter().any(|o| o.as_ref().is_ok_and(|w| w.fresh)) {
        outbox_written.notify_one();
    }
    for (outcome, reply) in outcomes.into_iter().zip(replies) {
        // A caller that went away does not need the answer: its purchase is committed, and its
        // retry is answered from the idempotency record.
        let _ = reply.send(outcome);
    }
}
