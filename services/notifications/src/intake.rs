//! From the `ledger` and `settlement` topics to each merchant's notifications, one transaction per
//! batch, deduplicated by message id.
//!
//! Each event becomes one notification for each merchant it concerns, with a JSON payload that
//! carries only what that merchant may see: a referrer learns its own referral reference and the
//! purchase's amount and commission, never the acceptor's transaction id; an acceptor learns its
//! transaction id and what it owes, never the referrer's reference. Never a customer identifier.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use prost::Message;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tandem_bus::{BatchHandler, Delivery, Topic};
use tandem_proto::v1 as pb;
use uuid::Uuid;

use crate::NotificationsError;

pub struct Intake {
    pub pool: PgPool,
    /// Rung after every commit that added notifications: streams look at once.
    pub written: std::sync::Arc<tokio::sync::Notify>,
    /// Rung after every commit that queued webhook deliveries.
    pub queued: std::sync::Arc<tokio::sync::Notify>,
}

/// One notification to write.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub merchant_id: String,
    pub id: Uuid,
    pub kind: &'static str,
    pub occurred_at: DateTime<Utc>,
    pub payload: String,
    pub traceparent: Option<String>,
}

/// The version of every payload's schema (docs/NOTIFICATIONS.md).
pub const PAYLOAD_VERSION: u32 = 1;

/// Every notification type.
pub const TYPES: [&str; 7] = [
    "referral.converted",
    "purchase.attributed",
    "commission.reversed",
    "commission.payable",
    "statement.issued",
    "payout.instructed",
    "webhook.endpoint_disabled",
];

fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn money(money: Option<&pb::Money>) -> Value {
    money.map_or(
        Value::Null,
        |m| json!({"amount_minor": m.amount_minor, "currency": m.currency}),
    )
}

fn timestamp(at: Option<&prost_types::Timestamp>) -> Value {
    at.and_then(tandem_proto::time::datetime)
        .map_or(Value::Null, |at| Value::String(instant(at)))
}

/// A stable id for the notification of `source` to `merchant`.
fn notification_id(source: &str, merchant: &str, kind: &str) -> Uuid {
    let digest = Sha256::digest(format!("{source}/{merchant}/{kind}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

fn outgoing(
    source: &str,
    merchant: &str,
    kind: &'static str,
    occurred_at: DateTime<Utc>,
    data: Value,
    traceparent: Option<String>,
) -> Outgoing {
    let id = notification_id(source, merchant, kind);
    let payload = json!({
        "id": id.to_string(),
        "type": kind,
        "version": PAYLOAD_VERSION,
        "timestamp": instant(occurred_at),
        "merchant_id": merchant,
        "data": data,
    });
    Outgoing {
        merchant_id: merchant.to_owned(),
        id,
        kind,
        occurred_at,
        payload: payload.to_string(),
        traceparent,
    }
}

/// Writes `per_merchant`'s notifications with their cursors and queues their webhook
/// deliveries, in the caller's transaction. Returns (notifications written, deliveries queued).
pub(crate) async fn store(
    tx: &mut sqlx::PgConnection,
    per_merchant: &BTreeMap<String, Vec<Outgoing>>,
) -> Result<(usize, u64), NotificationsError> {
    let written = per_merchant.values().map(Vec::len).sum::<usize>();
    if written == 0 {
        return Ok((0, 0));
    }
    // Every merchant's cursors in one statement. The rows are taken in merchant id order (the
    // map's), so two writers never wait on each other's cursor rows in opposite orders.
    let merchants: Vec<&str> = per_merchant.keys().map(String::as_str).collect();
    let counts: Vec<i64> = per_merchant
        .values()
        .map(|n| i64::try_from(n.len()).unwrap_or(i64::MAX))
        .collect();
    let lasts: Vec<(String, i64)> = sqlx::query_as(
        "INSERT INTO merchant_cursors (merchant_id, last_cursor) \
         SELECT m, c FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS t(m, c, o) ORDER BY o \
         ON CONFLICT (merchant_id) DO UPDATE SET last_cursor = merchant_cursors.last_cursor + excluded.last_cursor \
         RETURNING merchant_id, last_cursor",
    )
    .bind(&merchants)
    .bind(&counts)
    .fetch_all(&mut *tx)
    .await?;
    let lasts: BTreeMap<String, i64> = lasts.into_iter().collect();
    // Every notification in one statement (in chunks, for very large batches).
    let mut rows: Vec<(&str, i64, &Outgoing)> = Vec::with_capacity(written);
    for (merchant, notifications) in per_merchant {
        let last = lasts.get(merchant).copied().ok_or_else(|| {
            NotificationsError::Invariant(format!("no cursor allocated for {merchant}"))
        })?;
        let first = last - notifications.len() as i64 + 1;
        for (index, n) in notifications.iter().enumerate() {
            rows.push((merchant.as_str(), first + index as i64, n));
        }
    }
    for chunk in rows.chunks(5000) {
        sqlx::query(
            "INSERT INTO notifications (merchant_id, cursor, notification_id, type, occurred_at, payload, traceparent) \
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::timestamptz[], $6::text[], $7::text[])",
        )
        .bind(chunk.iter().map(|r| r.0).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.1).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.2.id).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.2.kind).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.2.occurred_at).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.2.payload.as_str()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.2.traceparent.as_deref()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    let ids: Vec<Uuid> = per_merchant.values().flatten().map(|n| n.id).collect();
    let queued = crate::endpoints::fan_out(tx, &ids).await?;
    Ok((written, queued))
}

/// The notification that an endpoint was disabled, for its merchant.
pub(crate) fn endpoint_disabled(
    merchant: &str,
    endpoint_id: &str,
    url: &str,
    failing_since: DateTime<Utc>,
    at: DateTime<Utc>,
) -> Outgoing {
    outgoing(
        &format!(
            "{endpoint_id}/disabled/{}",
            failing_since.timestamp_micros()
        ),
        merchant,
        "webhook.endpoint_disabled",
        at,
        json!({
            "endpoint_id": endpoint_id,
            "url": url,
            "failing_since": instant(failing_since),
            "reason": "every delivery failed for longer than the deployment allows; fix the endpoint, enable it again and replay what it missed",
        }),
        None,
    )
}

/// The notifications one delivery makes, or why it makes none it could.
pub fn notifications_of(delivery: &Delivery) -> Result<(String, Vec<Outgoing>), String> {
    let traceparent = delivery
        .headers
        .iter()
        .find(|(name, _)| name == "traceparent")
        .map(|(_, value)| value.clone());
    match delivery.topic {
        Topic::Ledger => {
            let event = pb::LedgerEvent::decode(delivery.payload.as_slice())
                .map_err(|error| format!("not a ledger event: {error}"))?;
            let occurred_at = event
                .recorded_at
                .as_ref()
                .and_then(tandem_proto::time::datetime)
                .ok_or("ledger event without recorded_at")?;
            let source = event.event_id.clone();
            let referrer = event.referrer_merchant_id.as_str();
            let acceptor = event.acceptor_merchant_id.as_str();
            let partnership = event.partnership_id.as_str();
            let mut out = Vec::new();
            match &event.event {
                Some(pb::ledger_event::Event::ReferralConverted(converted)) => {
                    out.push(outgoing(
                        &source,
                        referrer,
                        "referral.converted",
                        occurred_at,
                        json!({
                            "partnership_id": partnership,
                            "acceptor_merchant_id": acceptor,
                            "referral_id": converted.referral_id,
                            "referrer_reference": converted.referrer_reference,
                            "purchase_id": converted.purchase_id,
                            "converted_at": timestamp(converted.converted_at.as_ref()),
                        }),
                        traceparent.clone(),
                    ));
                }
                Some(pb::ledger_event::Event::PurchaseAttributed(attributed)) => {
                    let shared = |extra: Value| {
                        let mut data = json!({
                            "partnership_id": partnership,
                            "purchase_id": attributed.purchase_id,
                            "referral_id": attributed.referral_id,
                            "amount": money(attributed.amount.as_ref()),
                            "purchased_at": timestamp(attributed.purchased_at.as_ref()),
                            "terms_version": attributed.terms_version,
                            "commission": money(attributed.commission.as_ref()),
                            "not_earned_reason": attributed.not_earned_reason,
                        });
                        if let (Some(data), Some(extra)) = (data.as_object_mut(), extra.as_object())
                        {
                            data.extend(extra.clone());
                        }
                        data
                    };
                    out.push(outgoing(
                        &source,
                        referrer,
                        "purchase.attributed",
                        occurred_at,
                        shared(json!({
                            "role": "referrer",
                            "acceptor_merchant_id": acceptor,
                            "referrer_reference": attributed.referrer_reference,
                        })),
                        traceparent.clone(),
                    ));
                    out.push(outgoing(
                        &source,
                        acceptor,
                        "purchase.attributed",
                        occurred_at,
                        shared(json!({
                            "role": "acceptor",
                            "referrer_merchant_id": referrer,
                            "transaction_id": attributed.transaction_id,
                        })),
                        traceparent.clone(),
                    ));
                }
                Some(pb::ledger_event::Event::CommissionReversed(reversed)) => {
                    out.push(outgoing(
                        &source,
                        referrer,
                        "commission.reversed",
                        occurred_at,
                        json!({
                            "partnership_id": partnership,
                            "acceptor_merchant_id": acceptor,
                            "purchase_id": reversed.purchase_id,
                            "refund_id": reversed.refund_id,
                            "refund": money(reversed.refund.as_ref()),
                            "reversal": money(reversed.reversal.as_ref()),
                            "refunded_at": timestamp(reversed.refunded_at.as_ref()),
                            "within_holding_period": reversed.within_holding_period,
                        }),
                        traceparent.clone(),
                    ));
                }
                Some(pb::ledger_event::Event::CommissionPayable(payable)) => {
                    out.push(outgoing(
                        &source,
                        referrer,
                        "commission.payable",
                        occurred_at,
                        json!({
                            "partnership_id": partnership,
                            "acceptor_merchant_id": acceptor,
                            "purchase_id": payable.purchase_id,
                            "commission": money(payable.commission.as_ref()),
                            "payable_at": timestamp(payable.payable_at.as_ref()),
                        }),
                        traceparent.clone(),
                    ));
                }
                // Accruals are announced as the purchase's attribution.
                Some(pb::ledger_event::Event::CommissionAccrued(_)) | None => {}
            }
            Ok((event.event_id, out))
        }
        Topic::Settlement => {
            let event = pb::SettlementEvent::decode(delivery.payload.as_slice())
                .map_err(|error| format!("not a settlement event: {error}"))?;
            let occurred_at = event
                .recorded_at
                .as_ref()
                .and_then(tandem_proto::time::datetime)
                .ok_or("settlement event without recorded_at")?;
            let source = event.event_id.clone();
            let mut out = Vec::new();
            match &event.event {
                Some(pb::settlement_event::Event::StatementIssued(issued)) => {
                    let totals: Vec<Value> = issued
                        .totals
                        .iter()
                        .map(|t| {
                            json!({
                                "currency": t.currency,
                                "receivable_minor": t.receivable_minor,
                                "payable_minor": t.payable_minor,
                                "net_minor": t.net_minor,
                                "carried_forward_minor": t.carried_forward_minor,
                            })
                        })
                        .collect();
                    out.push(outgoing(
                        &source,
                        &event.merchant_id,
                        "statement.issued",
                        occurred_at,
                        json!({
                            "number": issued.number,
                            "cycle": issued.cycle,
                            "cut_off": timestamp(issued.cut_off.as_ref()),
                            "content_hash": issued.content_hash,
                            "line_count": issued.line_count,
                            "totals": totals,
                            "corrects_statement_number": issued.corrects_statement_number,
                        }),
                        traceparent.clone(),
                    ));
                }
                Some(pb::settlement_event::Event::PayoutInstructed(payout)) => {
                    for (merchant, role) in [
                        (&payout.from_merchant_id, "payer"),
                        (&payout.to_merchant_id, "payee"),
                    ] {
                        out.push(outgoing(
                            &source,
                            merchant,
                            "payout.instructed",
                            occurred_at,
                            json!({
                                "instruction_id": payout.instruction_id,
                                "cycle": payout.cycle,
                                "role": role,
                                "from_merchant_id": payout.from_merchant_id,
                                "to_merchant_id": payout.to_merchant_id,
                                "amount": {"amount_minor": payout.amount_minor, "currency": payout.currency},
                            }),
                            traceparent.clone(),
                        ));
                    }
                }
                None => {}
            }
            Ok((event.event_id, out))
        }
        other => Err(format!(
            "notifications does not consume {}",
            other.logical_name()
        )),
    }
}

impl BatchHandler for Intake {
    type Error = NotificationsError;

    async fn handle(&self, batch: &[Delivery]) -> Result<(), NotificationsError> {
        let mut ids = Vec::with_capacity(batch.len());
        let mut made = Vec::with_capacity(batch.len());
        // A `process` span per message, open until the batch commits; each notification keeps
        // its span's context, so its webhook deliveries join the same trace.
        let mut spans = Vec::with_capacity(batch.len());
        for delivery in batch {
            match notifications_of(delivery) {
                Ok((id, mut outgoing)) => {
                    let span = delivery.process_span(&id);
                    let traceparent = span
                        .in_scope(tandem_telemetry::current_trace_headers)
                        .into_iter()
                        .find(|(name, _)| name == "traceparent")
                        .map(|(_, value)| value);
                    for notification in &mut outgoing {
                        notification.traceparent.clone_from(&traceparent);
                    }
                    spans.push(span);
                    ids.push(id);
                    made.push(outgoing);
                }
                Err(reason) => tracing::error!(
                    topic = delivery.topic.logical_name(),
                    partition = delivery.partition,
                    offset = delivery.offset,
                    %reason,
                    "message skipped: it breaks the event contract"
                ),
            }
        }
        let mut tx = self.pool.begin().await?;
        let mut fresh = tandem_store::claim_unapplied(&mut tx, &ids).await?;
        // Per merchant, in the order received; a message twice in one batch counts once.
        let mut per_merchant: BTreeMap<String, Vec<Outgoing>> = BTreeMap::new();
        for (id, outgoing) in ids.iter().zip(made) {
            if fresh.remove(id) {
                for notification in outgoing {
                    per_merchant
                        .entry(notification.merchant_id.clone())
                        .or_default()
                        .push(notification);
                }
            }
        }
        let (written, queued) = store(&mut tx, &per_merchant).await?;
        tx.commit().await?;
        drop(spans);
        if written > 0 {
            self.written.notify_waiters();
        }
        if queued > 0 {
            self.queued.notify_waiters();
        }
        Ok(())
    }
}
