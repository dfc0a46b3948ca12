//! The attribution stage: applies admin and customer-activity messages (keyed by customer) in one
//! transaction per batch: deduplicate by message id, then, per message, update the per-customer-key
//! projections (referrals, purchases, refunds) and the terms projection, and attribute purchases
//! to referrals by the pure rules in `tandem_domain::attribution`. What it attributes, and the
//! refunds of what it attributed, it hands to the commission stage (`commissions`) through the
//! outbox, on the `attributions` topic keyed by partnership, together with a copy of every terms
//! event, so the commission stage sees a partnership's terms before anything decided under them.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tandem_bus::{BatchHandler, Delivery, Topic};
use tandem_codec::{event_to_proto, money_to_proto};
use tandem_domain::ids::{PartnershipId, PurchaseId};
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tracing::Instrument;

use crate::attribution;
use crate::events::{decode, Incoming, LedgerEvent, Purchase, Referral, Refund};
use crate::terms::TermsCache;
use crate::LedgerError;

pub struct Applier {
    pub pool: PgPool,
    /// Rung after a commit that wrote to the outbox.
    pub outbox_written: std::sync::Arc<tokio::sync::Notify>,
}

/// Commands for the commission stage, written to the outbox at commit.
pub struct Handoff {
    messages: Vec<tandem_store::OutboxMessage>,
    /// The trace context of the message being applied.
    pub(crate) headers: Vec<(String, String)>,
}

impl Handoff {
    pub(crate) fn send(
        &mut self,
        partnership_id: &PartnershipId,
        command_id: String,
        recorded_at: DateTime<Utc>,
        command: pb::partnership_command::Command,
    ) {
        let message = pb::PartnershipCommand {
            command_id,
            partnership_id: partnership_id.to_string(),
            recorded_at: Some(tandem_proto::time::timestamp(recorded_at)),
            command: Some(command),
        };
        self.messages.push(tandem_store::OutboxMessage {
            topic: Topic::Attributions.logical_name(),
            partition_key: partnership_id.as_str().as_bytes().to_vec(),
            payload: prost::Message::encode_to_vec(&message),
            headers: self.headers.clone(),
        });
    }
}

impl BatchHandler for Applier {
    type Error = LedgerError;

    async fn handle(&self, batch: &[Delivery]) -> Result<(), LedgerError> {
        match self.apply(batch).await {
            Err(error) if error.is_data_error() => {
                // Something in the batch breaks a constraint: find it, one message at a time.
                tracing::warn!(error = %error, size = batch.len(), "batch failed on its data; applying its messages one by one");
                for delivery in batch {
                    match self.apply(std::slice::from_ref(delivery)).await {
                        Err(error) if error.is_data_error() => {
                            let message_id = decode(delivery).1.ok().map(|m| m.message_id);
                            let reason =
                                format!("failed alone: {}", tandem_runtime::error_chain(&error));
                            let mut tx = self.pool.begin().await?;
                            if let Some(id) = &message_id {
                                tandem_store::claim_unapplied(&mut tx, std::slice::from_ref(id))
                                    .await?;
                            }
                            crate::rejected::record(
                                &mut tx,
                                &[crate::rejected::Rejected::of(delivery, message_id, reason)],
                            )
                            .await?;
                            tx.commit().await?;
                        }
                        other => other?,
                    }
                }
                Ok(())
            }
            other => other,
        }
    }
}

impl Applier {
    /// Applies `batch` in one transaction.
    async fn apply(&self, batch: &[Delivery]) -> Result<(), LedgerError> {
        let decoded: Vec<(String, u64, Result<Incoming, String>)> = batch
            .iter()
            .map(|delivery| match decode(delivery) {
                (sequence, Ok(incoming)) => (incoming.message_id.clone(), sequence, Ok(incoming)),
                (sequence, Err(reason)) => (
                    format!(
                        "rejected/{}/{}/{}",
                        delivery.topic.logical_name(),
                        delivery.partition,
                        delivery.offset
                    ),
                    sequence,
                    Err(reason),
                ),
            })
            .collect();
        let ids: Vec<String> = decoded.iter().map(|(id, _, _)| id.clone()).collect();

        let mut tx = self.pool.begin().await?;
        let mut admin_applied_through: i64 =
            sqlx::query_scalar("SELECT applied_through FROM admin_progress")
                .fetch_one(&mut *tx)
                .await?;
        let mut unapplied = tandem_store::claim_unapplied(&mut tx, &ids).await?;
        // Partnerships' terms read in this batch, kept current as the batch changes them.
        let mut books = TermsCache::default();
        let mut handoff = Handoff {
            messages: Vec::new(),
            headers: Vec::new(),
        };
        let mut applied = 0usize;
        let mut admin_seen = false;
        let mut rejected = Vec::new();
        // Consecutive purchases of distinct customer keys, applied together (`attribution`).
        let mut run = PurchaseRun::default();
        for ((message_id, admin_sequence, incoming), delivery) in decoded.into_iter().zip(batch) {
            let admin_sequence = i64::try_from(admin_sequence).unwrap_or(i64::MAX);
            if delivery.topic == Topic::Admin {
                admin_seen = true;
                admin_applied_through = admin_applied_through.max(admin_sequence);
            } else if admin_sequence > admin_applied_through {
                // Recorded after admin events this ledger has not applied yet (new terms, a new
                // partnership): wait for them; the admin consumer makes progress meanwhile.
                return Err(LedgerError::AwaitingAdmin {
                    needed: admin_sequence,
                    applied: admin_applied_through,
                });
            }
            // `remove` is true once per id: a message delivered twice in one batch applies once.
            if !unapplied.remove(&message_id) {
                continue;
            }
            applied += 1;
            let span = delivery.process_span(&message_id);
            let incoming = match incoming {
                Ok(Incoming {
                    recorded_at,
                    event: LedgerEvent::PurchaseRecorded(purchase),
                    ..
                }) => {
                    if run.has_key(&purchase) {
                        run.flush(&mut tx, &mut books, &mut handoff).await?;
                    }
                    run.push(
                        attribution::PurchaseMessage {
                            purchase,
                            recorded_at,
                            headers: delivery.headers.clone(),
                        },
                        span,
                    );
                    continue;
                }
                other => other,
            };
            run.flush(&mut tx, &mut books, &mut handoff).await?;
            handoff.headers.clone_from(&delivery.headers);
            let outcome = match incoming {
                Ok(incoming) => {
                    apply(&mut tx, &mut books, &mut handoff, incoming)
                        .instrument(span.clone())
                        .await?
                }
                Err(reason) => Err(reason),
            };
            if let Err(reason) = outcome {
                let decoded = !message_id.starts_with("rejected/");
                rejected.push(crate::rejected::Rejected::of(
                    delivery,
                    decoded.then(|| message_id.clone()),
                    reason,
                ));
            }
        }
        run.flush(&mut tx, &mut books, &mut handoff).await?;
        // Only the admin consumer writes the progress row: activity batches never wait on it.
        if admin_seen {
            sqlx::query(
                "UPDATE admin_progress SET applied_through = greatest(applied_through, $1)",
            )
            .bind(admin_applied_through)
            .execute(&mut *tx)
            .await?;
        }
        crate::rejected::record(&mut tx, &rejected).await?;
        let handed = handoff.messages.len();
        tandem_store::enqueue_outbox(&mut tx, &handoff.messages).await?;
        tx.commit().await?;
        if handed > 0 {
            self.outbox_written.notify_one();
        }
        tracing::debug!(received = batch.len(), applied, "batch applied");
        Ok(())
    }
}

/// Purchase messages waiting to be applied together, with their spans (kept open until the run
/// is applied, so each message's trace shows the work done for it).
#[derive(Default)]
struct PurchaseRun {
    messages: Vec<attribution::PurchaseMessage>,
    spans: Vec<tracing::Span>,
    keys: std::collections::HashSet<String>,
}

impl PurchaseRun {
    fn has_key(&self, purchase: &Purchase) -> bool {
        self.keys.contains(purchase.customer_key.as_str())
    }

    fn push(&mut self, message: attribution::PurchaseMessage, span: tracing::Span) {
        self.keys
            .insert(message.purchase.customer_key.as_str().to_owned());
        self.messages.push(message);
        self.spans.push(span);
    }

    async fn flush(
        &mut self,
        connection: &mut PgConnection,
        books: &mut TermsCache,
        handoff: &mut Handoff,
    ) -> Result<(), LedgerError> {
        if self.messages.is_empty() {
            return Ok(());
        }
        let span = tracing::info_span!("apply_purchases", count = self.messages.len());
        for message_span in &self.spans {
            span.follows_from(message_span);
        }
        attribution::apply_purchases(connection, books, handoff, &self.messages)
            .instrument(span)
            .await?;
        self.messages.clear();
        self.spans.clear();
        self.keys.clear();
        Ok(())
    }
}

/// Applies one message. `Ok(Err(reason))` means the domain refused it: it is recorded as
/// rejected and the consumer moves on. `Err` is a failure: the whole batch is retried.
async fn apply(
    connection: &mut PgConnection,
    books: &mut TermsCache,
    handoff: &mut Handoff,
    incoming: Incoming,
) -> Result<Result<(), String>, LedgerError> {
    let recorded_at = incoming.recorded_at;
    match incoming.event {
        LedgerEvent::MerchantChanged => {}
        LedgerEvent::Partnership {
            partnership_id,
            event_id,
            event,
        } => {
            crate::projection::project_terms(connection, &partnership_id, &event).await?;
            books.forget(&partnership_id);
            handoff.send(
                &partnership_id,
                format!("terms/{event_id}"),
                recorded_at,
                pb::partnership_command::Command::Terms(event_to_proto(&partnership_id, &event)),
            );
            tracing::info!(%partnership_id, "partnership terms event recorded and handed on");
        }
        LedgerEvent::CustomerReferred(referral) => {
            apply_referral(connection, books, handoff, &referral, recorded_at).await?
        }
        LedgerEvent::ReferralCancelled {
            referral_id,
            cancelled_at,
        } => {
            let cancelled = sqlx::query("UPDATE referrals SET cancelled_at = $2 WHERE referral_id = $1 AND cancelled_at IS NULL")
                .bind(referral_id.as_str())
                .bind(cancelled_at)
                .execute(&mut *connection)
                .await?;
            let known = cancelled.rows_affected() > 0
                || sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM referrals WHERE referral_id = $1)",
                )
                .bind(referral_id.as_str())
                .fetch_one(&mut *connection)
                .await?;
            if known {
                tracing::info!(%referral_id, "referral cancelled");
            } else {
                // The referral has not arrived yet (another customer key's copy, on another
                // partition, may come later): the cancellation waits for it.
                sqlx::query("INSERT INTO pending_cancellations (referral_id, cancelled_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                    .bind(referral_id.as_str())
                    .bind(cancelled_at)
                    .execute(&mut *connection)
                    .await?;
                tracing::info!(%referral_id, "cancellation waits for its referral");
            }
        }
        LedgerEvent::PurchaseRecorded(_) => {
            // The batch loop applies every purchase in a run (`PurchaseRun`) and never here.
            return Err(LedgerError::Invariant(
                "a purchase reached the one-message path",
            ));
        }
        LedgerEvent::RefundRecorded(refund) => {
            apply_refund(connection, handoff, &refund, recorded_at).await?
        }
    }
    Ok(Ok(()))
}

async fn apply_referral(
    connection: &mut PgConnection,
    books: &mut TermsCache,
    handoff: &mut Handoff,
    referral: &Referral,
    recorded_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    // The gateway publishes a partnership's terms before any referral under them, but on
    // another topic: until the admin copy has been applied, the referral waits (the batch is
    // retried; the admin topic has its own consumer, so it gets there).
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM partnership_versions WHERE partnership_id = $1 AND version = $2 AND accepted_by IS NOT NULL)",
    )
    .bind(referral.partnership_id.as_str())
    .bind(referral.terms_version)
    .fetch_one(&mut *connection)
    .await?;
    if !known {
        return Err(LedgerError::AwaitingPartnership(
            referral.partnership_id.to_string(),
        ));
    }
    attribution::insert_referrals(connection, std::slice::from_ref(referral), false).await?;
    tracing::info!(referral_id = %referral.referral_id, partnership_id = %referral.partnership_id, "referral recorded");
    attribution::attribute_waiting(connection, books, handoff, referral, recorded_at).await
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn hand_refund(
    handoff: &mut Handoff,
    partnership_id: &PartnershipId,
    refund_id: &str,
    purchase_id: &PurchaseId,
    amount: pb::Money,
    refunded_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
) {
    handoff.send(
        partnership_id,
        format!("refund/{refund_id}"),
        recorded_at,
        pb::partnership_command::Command::RecordRefund(pb::RecordRefund {
            refund_id: refund_id.to_owned(),
            purchase_id: purchase_id.to_string(),
            refund: Some(amount),
            refunded_at: Some(timestamp(refunded_at)),
        }),
    );
}

async fn apply_refund(
    connection: &mut PgConnection,
    handoff: &mut Handoff,
    refund: &Refund,
    recorded_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    let inserted = sqlx::query(
        "INSERT INTO refunds (refund_id, merchant_id, transaction_id, amount_minor, currency, refunded_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (refund_id) DO NOTHING",
    )
    .bind(refund.refund_id.as_str())
    .bind(refund.merchant.as_str())
    .bind(&refund.transaction_id)
    .bind(refund.amount.amount_minor)
    .bind(refund.amount.currency.as_str())
    .bind(refund.refunded_at)
    .execute(&mut *connection)
    .await?;
    if inserted.rows_affected() == 0 {
        // Another customer key's copy of this refund got here first.
        return Ok(());
    }
    let attributed: Option<(String, String)> = sqlx::query_as(
        "SELECT a.purchase_id, a.partnership_id FROM purchases p JOIN attributed_purchases a ON a.purchase_id = p.purchase_id \
         WHERE p.merchant_id = $1 AND p.transaction_id = $2",
    )
    .bind(refund.merchant.as_str())
    .bind(&refund.transaction_id)
    .fetch_optional(&mut *connection)
    .await?;
    match attributed {
        Some((purchase_id, partnership_id)) => {
            let purchase_id = PurchaseId::parse("purchase_id", &purchase_id)?;
            let partnership_id = PartnershipId::parse("partnership_id", &partnership_id)?;
            sqlx::query("UPDATE refunds SET handled = true WHERE refund_id = $1")
                .bind(refund.refund_id.as_str())
                .execute(&mut *connection)
                .await?;
            hand_refund(
                handoff,
                &partnership_id,
                refund.refund_id.as_str(),
                &purchase_id,
                money_to_proto(refund.amount),
                refund.refunded_at,
                recorded_at,
            );
            tracing::info!(refund_id = %refund.refund_id, %purchase_id, %partnership_id, "refund handed to the partnership");
        }
        None => {
            // The purchase is not attributed (yet): it may not have arrived, or a referral that
            // covers it may still arrive from an offline till. The refund waits either way and is
            // handed on if and when the purchase is attributed.
            tracing::info!(refund_id = %refund.refund_id, "refund waits for an attributed purchase");
        }
    }
    Ok(())
}
