//! The commission stage: the one writer of each partnership. It consumes the internal
//! `attributions` topic (key = partnership), so the instance that owns a partition owns its
//! partnerships' decisions, in partition order. Per batch, whatever its size and whatever the
//! partnerships' history, it sends a bounded number of statements: claim the message ids, read
//! the stream heads (and the core snapshots it does not hold), read the keyed facts the batch
//! names, then write events, heads, lines, facts, ledger entries, timers and the `ledger` topic's
//! events with one set-based statement each, and commit once.
//!
//! A message that cannot be decoded, or that the domain refuses, is recorded in
//! `rejected_messages` with its reason and skipped. When a batch fails for a reason that is not
//! the infrastructure's (a constraint the data breaks), it is applied again one message at a
//! time, and the message that fails alone is recorded and skipped: nothing blocks a partition.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use prost::Message;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use tandem_bus::{BatchHandler, Delivery};
use tandem_codec::{event_from_proto, money_to_proto, reason_to_proto};
use tandem_domain::commission::{
    decide, record_keys, Attribution, Command, Event, Partnership, PurchaseRecord,
};
use tandem_domain::ids::{PartnershipId, PurchaseId, ReferralId, RefundId};
use tandem_domain::money::Money;
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tandem_store::OutboxMessage;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::book::{self, Appends, Book};
use crate::facts::{self, FactWrites, Keyed, Statements};
use crate::projection::Projection;
use crate::rejected::{self, Rejected};
use crate::LedgerError;

/// What a command carries besides the domain command.
#[derive(Debug, Clone)]
enum Body {
    /// A terms event copied from the admin topic; recorded as decided by the gateway.
    Terms { event_id: Uuid, event: Event },
    Decide {
        command: Command,
        referrer_reference: String,
        transaction_id: String,
        /// `tandem.v1.IdentifierKind` that matched an attributed purchase.
        matched_by: i32,
    },
}

#[derive(Debug, Clone)]
struct Incoming {
    message_id: String,
    partnership_id: PartnershipId,
    recorded_at: DateTime<Utc>,
    body: Body,
}

fn decode(delivery: &Delivery) -> Result<Incoming, String> {
    let command = pb::PartnershipCommand::decode(delivery.payload.as_slice())
        .map_err(|error| format!("not a PartnershipCommand: {error}"))?;
    parse(command).map_err(|error| format!("command contract violated: {error}"))
}

fn parse(command: pb::PartnershipCommand) -> Result<Incoming, tandem_domain::ValidationError> {
    use tandem_domain::ValidationError;
    let instant = |field: &str, value: Option<&prost_types::Timestamp>| {
        value
            .and_then(tandem_proto::time::datetime)
            .ok_or_else(|| ValidationError::new(field, "is missing or out of range"))
    };
    let money = |field: &str, value: Option<&pb::Money>| {
        let value = value.ok_or_else(|| ValidationError::new(field, "is missing"))?;
        Money::parse_positive(field, value.amount_minor, &value.currency)
    };
    if command.command_id.is_empty() {
        return Err(ValidationError::new("command_id", "is empty"));
    }
    let partnership_id = PartnershipId::parse("partnership_id", &command.partnership_id)?;
    let recorded_at = instant("recorded_at", command.recorded_at.as_ref())?;
    let body = match command.command {
        None => return Err(ValidationError::new("command", "is missing")),
        Some(pb::partnership_command::Command::Terms(event)) => {
            let event = event_from_proto(&event)?;
            if !Partnership::changes_core(&event) {
                return Err(ValidationError::new("terms", "is not a terms event"));
            }
            Body::Terms {
                event_id: command
                    .command_id
                    .strip_prefix("terms/")
                    .and_then(|id| Uuid::try_parse(id).ok())
                    .ok_or_else(|| ValidationError::new("command_id", "is not terms/<UUID>"))?,
                event,
            }
        }
        Some(pb::partnership_command::Command::AttributePurchase(a)) => Body::Decide {
            command: Command::AttributePurchase(Attribution {
                purchase_id: PurchaseId::parse("purchase_id", &a.purchase_id)?,
                referral_id: ReferralId::parse("referral_id", &a.referral_id)?,
                amount: money("amount", a.amount.as_ref())?,
                purchased_at: instant("purchased_at", a.purchased_at.as_ref())?,
                referred_at: instant("referred_at", a.referred_at.as_ref())?,
                previous_purchase_at: a
                    .previous_purchase_at
                    .as_ref()
                    .map(|t| instant("previous_purchase_at", Some(t)))
                    .transpose()?,
            }),
            referrer_reference: a.referrer_reference,
            transaction_id: a.transaction_id,
            matched_by: a.matched_by,
        },
        Some(pb::partnership_command::Command::RecordRefund(r)) => Body::Decide {
            command: Command::RecordRefund {
                refund_id: RefundId::parse("refund_id", &r.refund_id)?,
                purchase_id: PurchaseId::parse("purchase_id", &r.purchase_id)?,
                refund: money("refund", r.refund.as_ref())?,
                refunded_at: instant("refunded_at", r.refunded_at.as_ref())?,
            },
            referrer_reference: String::new(),
            transaction_id: String::new(),
            matched_by: 0,
        },
    };
    Ok(Incoming {
        message_id: command.command_id,
        partnership_id,
        recorded_at,
        body,
    })
}

/// What the last batch cost; read by the history test and logged at debug level.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchCost {
    pub messages: usize,
    pub statements: usize,
}

pub struct CommissionStage {
    pub pool: sqlx::PgPool,
    /// Rung after a commit that wrote to the outbox.
    pub outbox_written: Arc<Notify>,
    /// Cores of the partnerships this instance decided for, with the stream head they are
    /// current at. Checked against the head row in every batch; a stale one is reloaded.
    cores: Mutex<HashMap<PartnershipId, Book>>,
    pub last_batch: Arc<Mutex<BatchCost>>,
}

/// Most cores kept in memory; beyond it the cache is emptied (they reload from one row each).
const MAX_CACHED_CORES: usize = 100_000;

impl CommissionStage {
    pub fn new(pool: sqlx::PgPool, outbox_written: Arc<Notify>) -> Self {
        Self {
            pool,
            outbox_written,
            cores: Mutex::new(HashMap::new()),
            last_batch: Arc::new(Mutex::new(BatchCost::default())),
        }
    }

    fn cached(&self, ids: &[PartnershipId]) -> HashMap<PartnershipId, Book> {
        let cores = self.cores.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter()
            .filter_map(|id| cores.get(id).map(|b| (id.clone(), b.clone())))
            .collect()
    }

    fn remember(&self, books: HashMap<PartnershipId, Book>) {
        let mut cores = self.cores.lock().unwrap_or_else(|p| p.into_inner());
        if cores.len() + books.len() > MAX_CACHED_CORES {
            cores.clear();
        }
        cores.extend(books);
    }

    fn forget(&self, ids: &[PartnershipId]) {
        let mut cores = self.cores.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            cores.remove(id);
        }
    }

    /// Applies `batch` in one transaction and says what it cost. The consumer calls it through
    /// [`BatchHandler::handle`], which also isolates a message the data makes fail.
    pub async fn apply(&self, batch: &[Delivery]) -> Result<BatchCost, LedgerError> {
        let mut statements = Statements::default();
        let mut rejected = Vec::new();
        let mut incoming = Vec::new();
        for delivery in batch {
            match decode(delivery) {
                Ok(message) => incoming.push((message, delivery)),
                Err(reason) => rejected.push(Rejected::of(delivery, None, reason)),
            }
        }
        let ids: Vec<String> = incoming.iter().map(|(m, _)| m.message_id.clone()).collect();
        let mut tx = self.pool.begin().await?;
        let mut unapplied = tandem_store::claim_unapplied(&mut tx, &ids).await?;
        statements.add();
        // Per partnership, in order of first appearance, its new commands in partition order.
        let mut order: Vec<PartnershipId> = Vec::new();
        let mut commands: HashMap<PartnershipId, Vec<(Incoming, &Delivery)>> = HashMap::new();
        for (message, delivery) in incoming {
            // `remove` is true once per id: a message delivered twice in a batch applies once.
            if !unapplied.remove(&message.message_id) {
                continue;
            }
            let list = commands.entry(message.partnership_id.clone()).or_default();
            if list.is_empty() {
                order.push(message.partnership_id.clone());
            }
            list.push((message, delivery));
        }

        // Cores: from this instance's memory when the head row says they are current.
        let mut books = self.cached(&order);
        let heads = book::load_heads(&mut tx, &order, &mut statements).await?;
        let stale: Vec<PartnershipId> = order
            .iter()
            .filter(|id| {
                books.get(*id).map(|b| b.sequence) != Some(heads.get(*id).copied().unwrap_or(0))
            })
            .cloned()
            .collect();
        if !stale.is_empty() {
            books.extend(book::load_books(&mut tx, &stale, &mut statements).await?);
        }

        // The keyed facts the batch names, for every partnership at once. Tally keys are taken
        // from the core before and after the batch's own terms events.
        let record_keys: Keyed<_> = commands
            .iter()
            .map(|(id, list)| {
                (
                    id.clone(),
                    record_keys(list.iter().filter_map(|(m, _)| domain_command(m))),
                )
            })
            .collect();
        let mut loaded = facts::load_records(&mut tx, &record_keys, &mut statements).await?;
        let tally_keys: Keyed<_> = commands
            .iter()
            .map(|(id, list)| {
                let core = books.get(id).map(|b| b.core.clone()).unwrap_or_default();
                let mut later = core.clone();
                for (message, _) in list {
                    if let Body::Terms { event, .. } = &message.body {
                        later = later.apply(event);
                    }
                }
                let records: std::collections::BTreeMap<PurchaseId, PurchaseRecord> = loaded
                    .get(id)
                    .map(|f| f.purchases.clone())
                    .unwrap_or_default();
                let decided = || list.iter().filter_map(|(m, _)| domain_command(m));
                let mut keys = core.tally_keys(decided(), &records);
                let more = later.tally_keys(decided(), &records);
                keys.customers.extend(more.customers);
                keys.periods.extend(more.periods);
                (id.clone(), keys)
            })
            .collect();
        facts::load_tallies(&mut tx, &tally_keys, &mut loaded, &mut statements).await?;

        // Decide, in order, per partnership.
        let mut appends = Appends::default();
        let mut projection = Projection::default();
        let mut writes = FactWrites::default();
        let mut outbox = Vec::new();
        let mut terms_seen = 0usize;
        for id in &order {
            let list = commands.remove(id).unwrap_or_default();
            let book = books.entry(id.clone()).or_default();
            let before = loaded.remove(id).unwrap_or_default();
            let mut state = book.core.clone().with_facts(before.clone());
            for (message, delivery) in list {
                // This message's `process` span; the events it causes carry its context on.
                let span = delivery.process_span(&message.message_id);
                let mut headers: Vec<(String, String)> = delivery
                    .headers
                    .iter()
                    .filter(|(name, _)| !matches!(name.as_str(), "traceparent" | "tracestate"))
                    .cloned()
                    .collect();
                headers.extend(span.in_scope(tandem_telemetry::current_trace_headers));
                match message.body {
                    Body::Terms { event_id, event } => {
                        appends.push(id, book, event_id, &event, message.recorded_at);
                        book.add_terms(id, &event);
                        state = state.apply(&event);
                        terms_seen += 1;
                    }
                    Body::Decide {
                        command,
                        referrer_reference,
                        transaction_id,
                        matched_by,
                    } => {
                        let events = match decide(&state, command) {
                            Ok(events) => events,
                            Err(refused) => {
                                rejected.push(Rejected::of(
                                    delivery,
                                    Some(message.message_id.clone()),
                                    format!("refused by partnership {id}: {refused}"),
                                ));
                                continue;
                            }
                        };
                        for event in events {
                            let event_id = Uuid::now_v7();
                            let sequence =
                                appends.push(id, book, event_id, &event, message.recorded_at);
                            projection.add(
                                id,
                                &state,
                                &event,
                                sequence,
                                message.recorded_at,
                                &headers,
                            )?;
                            announce(
                                &mut outbox,
                                id,
                                &state,
                                &event,
                                event_id,
                                &referrer_reference,
                                &transaction_id,
                                matched_by,
                                message.recorded_at,
                                &headers,
                            );
                            state = state.apply(&event);
                        }
                    }
                }
            }
            let named: BTreeSet<PurchaseId> = record_keys
                .get(id)
                .map(|k| k.purchases.clone())
                .unwrap_or_default();
            writes.diff(id, &before, state.facts(), &named);
        }

        let appended = appends.len();
        appends.write(&mut tx, &mut statements).await?;
        book::save_books(
            &mut tx,
            order.iter().filter_map(|id| books.get(id).map(|b| (id, b))),
            &mut statements,
        )
        .await?;
        projection.write(&mut tx, true, &mut statements).await?;
        writes.write(&mut tx, &mut statements).await?;
        if !outbox.is_empty() {
            tandem_store::enqueue_outbox(&mut tx, &outbox).await?;
            statements.add();
        }
        if !rejected.is_empty() {
            rejected::record(&mut tx, &rejected).await?;
            statements.add();
        }
        tx.commit().await?;
        if !outbox.is_empty() {
            self.outbox_written.notify_one();
            crate::metrics::count_committed(&outbox);
        }
        for book in books.values_mut() {
            book.saved();
        }
        self.remember(books);
        tracing::debug!(
            received = batch.len(),
            appended,
            announced = outbox.len(),
            rejected = rejected.len(),
            terms = terms_seen,
            statements = statements.0,
            "commission batch applied"
        );
        Ok(BatchCost {
            messages: batch.len(),
            statements: statements.0,
        })
    }
}

fn domain_command(message: &Incoming) -> Option<&Command> {
    match &message.body {
        Body::Decide { command, .. } => Some(command),
        Body::Terms { .. } => None,
    }
}

impl BatchHandler for CommissionStage {
    type Error = LedgerError;

    async fn handle(&self, batch: &[Delivery]) -> Result<(), LedgerError> {
        let partnerships: Vec<PartnershipId> = batch
            .iter()
            .filter_map(|d| std::str::from_utf8(&d.key).ok())
            .filter_map(|k| PartnershipId::parse("key", k).ok())
            .collect();
        match self.apply(batch).await {
            Ok(cost) => {
                *self.last_batch.lock().unwrap_or_else(|p| p.into_inner()) = cost;
                Ok(())
            }
            Err(error) if error.is_data_error() && batch.len() > 1 => {
                // Something in the batch breaks a constraint: find it, one message at a time.
                self.forget(&partnerships);
                tracing::warn!(error = %error, size = batch.len(), "batch failed on its data; applying its messages one by one");
                for delivery in batch {
                    self.handle_one(delivery).await?;
                }
                Ok(())
            }
            Err(error) if error.is_data_error() => {
                self.forget(&partnerships);
                self.handle_one(&batch[0]).await
            }
            Err(error) => {
                // A conflict (another writer) or the infrastructure: retried with backoff by the
                // consumer, from fresh state.
                self.forget(&partnerships);
                Err(error)
            }
        }
    }
}

impl CommissionStage {
    async fn handle_one(&self, delivery: &Delivery) -> Result<(), LedgerError> {
        match self.apply(std::slice::from_ref(delivery)).await {
            Ok(_) => Ok(()),
            Err(error) if error.is_data_error() => {
                let reason = format!("failed alone: {}", tandem_runtime::error_chain(&error));
                tracing::error!(topic = delivery.topic.logical_name(), partition = delivery.partition, offset = delivery.offset, reason = %reason, "message rejected; kept in rejected_messages");
                let message_id = decode(delivery).ok().map(|m| m.message_id);
                let mut tx = self.pool.begin().await?;
                if let Some(id) = &message_id {
                    tandem_store::claim_unapplied(&mut tx, std::slice::from_ref(id)).await?;
                }
                rejected::record(&mut tx, &[Rejected::of(delivery, message_id, reason)]).await?;
                tx.commit().await?;
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

/// A stable id for one announcement of one decision: redelivery or a replay of the outbox gives
/// the same id, which consumers deduplicate by.
fn announcement_id(source: &str, kind: &str) -> Uuid {
    let digest = Sha256::digest(format!("{source}/{kind}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// The `ledger` topic's events for one decided event. `before` is the partnership before it.
#[allow(clippy::too_many_arguments)]
fn announce(
    outbox: &mut Vec<OutboxMessage>,
    partnership_id: &PartnershipId,
    before: &Partnership,
    event: &Event,
    event_id: Uuid,
    referrer_reference: &str,
    transaction_id: &str,
    matched_by: i32,
    recorded_at: DateTime<Utc>,
    headers: &[(String, String)],
) {
    let Some((referrer, acceptor)) = before.parties() else {
        return;
    };
    let source = event_id.to_string();
    let mut push = |kind: &str, payload: pb::ledger_event::Event| {
        let message = pb::LedgerEvent {
            event_id: announcement_id(&source, kind).to_string(),
            schema_version: 1,
            partnership_id: partnership_id.to_string(),
            referrer_merchant_id: referrer.to_string(),
            acceptor_merchant_id: acceptor.to_string(),
            recorded_at: Some(timestamp(recorded_at)),
            event: Some(payload),
        };
        outbox.push(OutboxMessage {
            topic: tandem_bus::Topic::Ledger.logical_name(),
            partition_key: partnership_id.as_str().as_bytes().to_vec(),
            payload: message.encode_to_vec(),
            headers: headers.to_vec(),
        });
    };
    let attributed = |purchase_id: &PurchaseId,
                      referral_id: &ReferralId,
                      amount: &Money,
                      purchased_at: &DateTime<Utc>,
                      terms_version: u32,
                      commission: Money,
                      reason: &str| {
        pb::ledger_event::Event::PurchaseAttributed(pb::PurchaseAttributed {
            purchase_id: purchase_id.to_string(),
            referral_id: referral_id.to_string(),
            referrer_reference: referrer_reference.to_owned(),
            transaction_id: transaction_id.to_owned(),
            amount: Some(money_to_proto(*amount)),
            purchased_at: Some(timestamp(*purchased_at)),
            terms_version,
            commission: Some(money_to_proto(commission)),
            not_earned_reason: reason.to_owned(),
            matched_by,
        })
    };
    let converted = |purchase_id: &PurchaseId, referral_id: &ReferralId, at: &DateTime<Utc>| {
        pb::ledger_event::Event::ReferralConverted(pb::ReferralConverted {
            referral_id: referral_id.to_string(),
            referrer_reference: referrer_reference.to_owned(),
            purchase_id: purchase_id.to_string(),
            converted_at: Some(timestamp(*at)),
        })
    };
    let first_for = |referral_id: &ReferralId| {
        before
            .facts()
            .customers
            .get(referral_id)
            .is_none_or(|tally| tally.purchases == 0)
    };
    match event {
        Event::CommissionAccrued {
            purchase_id,
            referral_id,
            terms_version,
            amount,
            commission,
            purchased_at,
            ..
        } => {
            if first_for(referral_id) {
                push(
                    "converted",
                    converted(purchase_id, referral_id, purchased_at),
                );
            }
            push(
                "attributed",
                attributed(
                    purchase_id,
                    referral_id,
                    amount,
                    purchased_at,
                    *terms_version,
                    *commission,
                    "",
                ),
            );
            if let Some(pb::partnership_event::Event::CommissionAccrued(accrued)) =
                tandem_codec::event_to_proto(partnership_id, event).event
            {
                push(
                    "accrued",
                    pb::ledger_event::Event::CommissionAccrued(accrued),
                );
            }
        }
        Event::CommissionNotEarned {
            purchase_id,
            referral_id,
            terms_version,
            amount,
            purchased_at,
            reason,
        } => {
            if first_for(referral_id) {
                push(
                    "converted",
                    converted(purchase_id, referral_id, purchased_at),
                );
            }
            push(
                "attributed",
                attributed(
                    purchase_id,
                    referral_id,
                    amount,
                    purchased_at,
                    terms_version.unwrap_or(0),
                    Money::new(0, amount.currency),
                    reason_to_proto(reason).0,
                ),
            );
        }
        Event::RefundApplied {
            refund_id,
            purchase_id,
            refund,
            reversal,
            refunded_at,
            within_holding_period,
        } => push(
            "reversed",
            pb::ledger_event::Event::CommissionReversed(pb::CommissionReversed {
                refund_id: refund_id.to_string(),
                purchase_id: purchase_id.to_string(),
                refund: Some(money_to_proto(*refund)),
                reversal: Some(money_to_proto(*reversal)),
                refunded_at: Some(timestamp(*refunded_at)),
                within_holding_period: *within_holding_period,
            }),
        ),
        _ => {}
    }
}

/// The id of the `CommissionPayable` announcement of a purchase.
pub fn payable_announcement_id(purchase_id: &str) -> Uuid {
    announcement_id(purchase_id, "payable")
}

/// Announces the commissions whose holding period ended: takes due timers (`SKIP LOCKED`, so
/// several instances share them), and in the same transaction writes `CommissionPayable`
/// events with what is left of each commission. Returns how many timers fired.
pub async fn fire_payable_timers(
    connection: &mut PgConnection,
    limit: i64,
) -> Result<usize, LedgerError> {
    type Row = (
        String,
        String,
        DateTime<Utc>,
        i64,
        String,
        String,
        String,
        Vec<String>,
        Vec<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "WITH due AS (DELETE FROM payable_timers WHERE purchase_id IN \
           (SELECT purchase_id FROM payable_timers WHERE payable_at <= now() ORDER BY payable_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
           RETURNING purchase_id, partnership_id, payable_at, header_names, header_values) \
         SELECT due.purchase_id, due.partnership_id, due.payable_at, c.commission_minor - c.reversed_minor, c.currency, \
           c.referrer_merchant_id, c.acceptor_merchant_id, due.header_names, due.header_values \
         FROM due JOIN commissions c ON c.purchase_id = due.purchase_id ORDER BY due.payable_at",
    )
    .bind(limit)
    .fetch_all(&mut *connection)
    .await?;
    let fired = rows.len();
    let messages: Vec<OutboxMessage> = rows
        .into_iter()
        .filter(|row| row.3 > 0)
        .map(
            |(
                purchase_id,
                partnership_id,
                payable_at,
                remaining,
                currency,
                referrer,
                acceptor,
                names,
                values,
            )| {
                let message = pb::LedgerEvent {
                    event_id: payable_announcement_id(&purchase_id).to_string(),
                    schema_version: 1,
                    partnership_id: partnership_id.clone(),
                    referrer_merchant_id: referrer,
                    acceptor_merchant_id: acceptor,
                    recorded_at: Some(timestamp(Utc::now())),
                    event: Some(pb::ledger_event::Event::CommissionPayable(
                        pb::CommissionPayable {
                            purchase_id,
                            commission: Some(pb::Money {
                                amount_minor: remaining,
                                currency,
                            }),
                            payable_at: Some(timestamp(payable_at)),
                        },
                    )),
                };
                OutboxMessage {
                    topic: tandem_bus::Topic::Ledger.logical_name(),
                    partition_key: partnership_id.into_bytes(),
                    payload: message.encode_to_vec(),
                    headers: names.into_iter().zip(values).collect(),
                }
            },
        )
        .collect();
    tandem_store::enqueue_outbox(connection, &messages).await?;
    Ok(fired)
}

/// Runs the payable timers until `shutdown`: every second, or at once after a busy round.
pub async fn run_payable_timers(
    pool: sqlx::PgPool,
    outbox_written: Arc<Notify>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut backoff = std::time::Duration::from_secs(1);
    loop {
        let round = async {
            let mut tx = pool.begin().await?;
            let fired = fire_payable_timers(&mut tx, 1_000).await?;
            tx.commit().await?;
            Ok::<usize, LedgerError>(fired)
        }
        .await;
        let pause = match round {
            Ok(fired) if fired > 0 => {
                outbox_written.notify_one();
                tracing::debug!(fired, "payable timers fired");
                backoff = std::time::Duration::from_secs(1);
                std::time::Duration::ZERO
            }
            Ok(_) => {
                backoff = std::time::Duration::from_secs(1);
                backoff
            }
            Err(error) => {
                tracing::warn!(error = %error, "payable timers could not fire; retrying");
                backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                backoff
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
