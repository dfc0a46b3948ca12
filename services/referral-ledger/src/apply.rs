//! The attribution stage: applies admin and customer-activity messages (keyed by customer) in one
//! transaction per batch: deduplicate by message id, then, per message, update the per-customer-key
//! projections (referrals, purchases, refunds) and the terms projection, and attribute purchases
//! to referrals by the pure rules in `tandem_domain::attribution`. What it attributes, and the
//! refunds of what it attributed, it hands to the commission stage (`commissions`) through the
//! outbox, on the `attributions` topic keyed by partnership, together with a copy of every terms
//! event, so the commission stage sees a partnership's terms before anything decided under them.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use tandem_bus::{BatchHandler, Delivery, Topic};
use tandem_codec::{event_to_proto, money_to_proto};
use tandem_domain::attribution::{attribution_ends_at, choose_referral, Candidate};
use tandem_domain::customer::IdentifierKind;
use tandem_domain::ids::{MerchantId, PartnershipId, PurchaseId, ReferralId};
use tandem_domain::partnership::TouchPolicy;
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tracing::Instrument;

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
    headers: Vec<(String, String)>,
}

impl Handoff {
    fn send(
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
            let span = tracing::info_span!("apply_event", trace_id = tracing::field::Empty, message_id = %message_id, topic = delivery.topic.logical_name(), partition = delivery.partition, offset = delivery.offset);
            delivery.link_span(&span);
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
            applied += 1;
        }
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
        LedgerEvent::MerchantRegistered => {}
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
        LedgerEvent::PurchaseRecorded(purchase) => {
            apply_purchase(connection, books, handoff, &purchase, recorded_at).await?
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
    insert_referral(connection, referral, false).await?;
    tracing::info!(referral_id = %referral.referral_id, partnership_id = %referral.partnership_id, "referral recorded");

    // A referral may arrive after purchases it covers (a till that was offline). Those purchases
    // of this customer key at the acceptor, in the window and not yet attributed, are attributed
    // now, each by the same rule as if it had arrived later.
    let waiting: Vec<(String,)> = sqlx::query_as(
        "SELECT k.purchase_id FROM purchase_keys k \
         WHERE k.customer_key = $1 AND k.merchant_id = $2 AND k.purchased_at >= $3 AND k.purchased_at < $4 \
         AND NOT EXISTS (SELECT 1 FROM commissions c WHERE c.purchase_id = k.purchase_id) \
         ORDER BY k.purchased_at, k.purchase_id",
    )
    .bind(referral.customer_key.as_str())
    .bind(referral.acceptor.as_str())
    .bind(referral.referred_at)
    .bind(referral.attribution_ends_at)
    .fetch_all(&mut *connection)
    .await?;
    for (purchase_id,) in waiting {
        let purchase = load_purchase(connection, &purchase_id, referral).await?;
        attribute(connection, books, handoff, &purchase, recorded_at).await?;
    }
    Ok(())
}

async fn insert_referral(
    connection: &mut PgConnection,
    referral: &Referral,
    automatic: bool,
) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO referrals (referral_id, partnership_id, terms_version, referrer_merchant_id, acceptor_merchant_id, \
         referrer_reference, referred_at, attribution_ends_at, automatic) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (referral_id) DO NOTHING",
    )
    .bind(referral.referral_id.as_str())
    .bind(referral.partnership_id.as_str())
    .bind(referral.terms_version)
    .bind(referral.referrer.as_str())
    .bind(referral.acceptor.as_str())
    .bind(&referral.referrer_reference)
    .bind(referral.referred_at)
    .bind(referral.attribution_ends_at)
    .bind(automatic)
    .execute(&mut *connection)
    .await?;
    // A cancellation that arrived first applies now.
    sqlx::query(
        "UPDATE referrals r SET cancelled_at = p.cancelled_at FROM pending_cancellations p \
         WHERE p.referral_id = r.referral_id AND r.referral_id = $1 AND r.cancelled_at IS NULL",
    )
    .bind(referral.referral_id.as_str())
    .execute(&mut *connection)
    .await?;
    sqlx::query(
        "INSERT INTO referral_keys (customer_key, acceptor_merchant_id, referral_id, referred_at, attribution_ends_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(referral.customer_key.as_str())
    .bind(referral.acceptor.as_str())
    .bind(referral.referral_id.as_str())
    .bind(referral.referred_at)
    .bind(referral.attribution_ends_at)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

async fn apply_purchase(
    connection: &mut PgConnection,
    books: &mut TermsCache,
    handoff: &mut Handoff,
    purchase: &Purchase,
    recorded_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    // The purchase (once, whichever key's copy comes first) and this key's index row, in one
    // statement.
    sqlx::query(
        "WITH purchase AS (INSERT INTO purchases (purchase_id, merchant_id, transaction_id, amount_minor, currency, purchased_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (purchase_id) DO NOTHING) \
         INSERT INTO purchase_keys (customer_key, merchant_id, purchase_id, purchased_at) VALUES ($7, $2, $1, $6) \
         ON CONFLICT DO NOTHING",
    )
    .bind(purchase.purchase_id.as_str())
    .bind(purchase.merchant.as_str())
    .bind(&purchase.transaction_id)
    .bind(purchase.amount.amount_minor)
    .bind(purchase.amount.currency.as_str())
    .bind(purchase.purchased_at)
    .bind(purchase.customer_key.as_str())
    .execute(&mut *connection)
    .await?;
    refer_automatically(connection, books, purchase).await?;
    attribute(connection, books, handoff, purchase, recorded_at).await
}

/// Partnerships whose terms say so turn every purchase at the referrer into a referral of its
/// customer to the acceptor. The referral id is derived from the purchase and the partnership,
/// so every customer key's copy of the purchase creates the same referral.
async fn refer_automatically(
    connection: &mut PgConnection,
    books: &mut TermsCache,
    purchase: &Purchase,
) -> Result<(), LedgerError> {
    let partnerships: Vec<(String,)> = sqlx::query_as(
        "SELECT partnership_id FROM partnerships WHERE referrer_merchant_id = $1 AND (terminated_at IS NULL OR terminated_at > $2)",
    )
    .bind(purchase.merchant.as_str())
    .bind(purchase.purchased_at)
    .fetch_all(&mut *connection)
    .await?;
    for (partnership_id,) in partnerships {
        let partnership_id = PartnershipId::parse("partnership_id", &partnership_id)?;
        let core = books.get(connection, &partnership_id).await?;
        let Some((version, terms)) = core.terms_at(purchase.purchased_at) else {
            continue;
        };
        if !terms.auto_refer {
            continue;
        }
        let Some((referrer, acceptor)) = core.parties() else {
            continue;
        };
        let digest =
            Sha256::digest(format!("{}/{}", purchase.purchase_id, partnership_id).as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        let referral = Referral {
            referral_id: ReferralId::from_uuid(uuid::Uuid::from_bytes(bytes)),
            partnership_id: partnership_id.clone(),
            terms_version: i32::try_from(version).unwrap_or(i32::MAX),
            referrer: referrer.clone(),
            acceptor: acceptor.clone(),
            customer_key: purchase.customer_key.clone(),
            referrer_reference: format!("auto:{}", purchase.transaction_id),
            referred_at: purchase.purchased_at,
            attribution_ends_at: attribution_ends_at(
                purchase.purchased_at,
                terms.attribution_window,
            ),
        };
        insert_referral(connection, &referral, true).await?;
        tracing::debug!(referral_id = %referral.referral_id, %partnership_id, "automatic referral recorded");
    }
    Ok(())
}

type CandidateRow = (
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    String,
);

/// Attributes `purchase` (one customer key's copy) to the winning referral of that key, if any,
/// unless the purchase was already attributed, and hands it to its partnership's commission
/// stage, after the refunds of it that arrived first.
async fn attribute(
    connection: &mut PgConnection,
    books: &mut TermsCache,
    handoff: &mut Handoff,
    purchase: &Purchase,
    recorded_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    // The candidates, none when the purchase was already attributed (another key's copy).
    let rows: Vec<CandidateRow> = sqlx::query_as(
        "SELECT k.referral_id, k.referred_at, k.attribution_ends_at, r.cancelled_at, r.partnership_id \
         FROM referral_keys k JOIN referrals r ON r.referral_id = k.referral_id \
         WHERE k.customer_key = $1 AND k.acceptor_merchant_id = $2 AND k.referred_at <= $3 AND k.attribution_ends_at > $3 \
         AND NOT EXISTS (SELECT 1 FROM attributed_purchases a WHERE a.purchase_id = $4)",
    )
    .bind(purchase.customer_key.as_str())
    .bind(purchase.merchant.as_str())
    .bind(purchase.purchased_at)
    .bind(purchase.purchase_id.as_str())
    .fetch_all(&mut *connection)
    .await?;
    if rows.is_empty() {
        return Ok(());
    }
    // Each partnership's terms pick first or last touch; when referrers with different policies
    // compete, the first referrer wins.
    let mut policy = TouchPolicy::LastReferrer;
    let mut candidates = Vec::with_capacity(rows.len());
    let mut partnership_of = std::collections::HashMap::new();
    let matched_by = purchase.customer_key.kind();
    for (referral_id, referred_at, attribution_ends_at, cancelled_at, partnership_id) in rows {
        let partnership_id = PartnershipId::parse("partnership_id", &partnership_id)?;
        let core = books.get(connection, &partnership_id).await?;
        let terms = core.terms_at(purchase.purchased_at).map(|(_, terms)| terms);
        // A partnership that lets only some identifier kinds attribute ignores a match on
        // another kind (the purchase's other keys, on their own copies, may still match).
        if terms.is_some_and(|terms| !terms.attributing_kinds.allows(matched_by)) {
            continue;
        }
        if terms.is_none_or(|terms| terms.touch_policy == TouchPolicy::FirstReferrer) {
            policy = TouchPolicy::FirstReferrer;
        }
        let referral_id = ReferralId::parse("referral_id", &referral_id)?;
        partnership_of.insert(referral_id.clone(), (partnership_id, referred_at));
        candidates.push(Candidate {
            referral_id,
            referred_at,
            attribution_ends_at,
            cancelled_at,
        });
    }
    let Some(winner) = choose_referral(&candidates, purchase.purchased_at, policy) else {
        return Ok(());
    };
    let (partnership_id, referred_at) = partnership_of
        .get(&winner.referral_id)
        .cloned()
        .ok_or(LedgerError::Invariant("winner without partnership"))?;
    // Another customer key's copy, on another partition, may attribute the same purchase at
    // the same time: the first to insert wins, the other does nothing.
    let claimed = sqlx::query(
        "INSERT INTO attributed_purchases (purchase_id, partnership_id, referral_id, matched_by) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(purchase.purchase_id.as_str())
    .bind(partnership_id.as_str())
    .bind(winner.referral_id.as_str())
    .bind(matched_by.map(IdentifierKind::tag))
    .execute(&mut *connection)
    .await?;
    if claimed.rows_affected() == 0 {
        return Ok(());
    }
    // The referral converts; its reference and the customer's latest purchase at the acceptor
    // before the referral (for new-customer terms) come back in the same statement.
    let (referrer_reference, previous_purchase_at): (String, Option<DateTime<Utc>>) = sqlx::query_as(
        "UPDATE referrals SET converted = true WHERE referral_id = $4 RETURNING referrer_reference, \
         (SELECT max(purchased_at) FROM purchase_keys WHERE customer_key = $1 AND merchant_id = $2 AND purchased_at < $3)",
    )
    .bind(purchase.customer_key.as_str())
    .bind(purchase.merchant.as_str())
    .bind(referred_at)
    .bind(winner.referral_id.as_str())
    .fetch_one(&mut *connection)
    .await?;

    // Refunds that reached the ledger before their purchase go first: the partnership parks
    // them, then applies them right after the purchase, cut down to what is left of it.
    let waiting: Vec<(String, i64, String, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE refunds SET handled = true WHERE merchant_id = $1 AND transaction_id = $2 AND NOT handled \
         RETURNING refund_id, amount_minor, currency, refunded_at",
    )
    .bind(purchase.merchant.as_str())
    .bind(&purchase.transaction_id)
    .fetch_all(&mut *connection)
    .await?;
    let mut waiting = waiting;
    waiting.sort_by(|a, b| (a.3, &a.0).cmp(&(b.3, &b.0)));
    for (refund_id, amount_minor, currency, refunded_at) in waiting {
        hand_refund(
            handoff,
            &partnership_id,
            &refund_id,
            &purchase.purchase_id,
            pb::Money {
                amount_minor,
                currency,
            },
            refunded_at,
            recorded_at,
        );
    }
    handoff.send(
        &partnership_id,
        format!("attribution/{}", purchase.purchase_id),
        recorded_at,
        pb::partnership_command::Command::AttributePurchase(pb::AttributePurchase {
            purchase_id: purchase.purchase_id.to_string(),
            referral_id: winner.referral_id.to_string(),
            amount: Some(money_to_proto(purchase.amount)),
            purchased_at: Some(timestamp(purchase.purchased_at)),
            referred_at: Some(timestamp(referred_at)),
            previous_purchase_at: previous_purchase_at.map(timestamp),
            referrer_reference,
            transaction_id: purchase.transaction_id.clone(),
            matched_by: tandem_codec::identifiers::kind_tag_to_proto(
                matched_by.map(IdentifierKind::tag),
            ),
        }),
    );
    // Debug, not info: one line per attributed purchase is the hot path's; traces carry it.
    tracing::debug!(purchase_id = %purchase.purchase_id, referral_id = %winner.referral_id, %partnership_id, "purchase attributed; handed to the partnership");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn hand_refund(
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

async fn load_purchase(
    connection: &mut PgConnection,
    purchase_id: &str,
    referral: &Referral,
) -> Result<Purchase, LedgerError> {
    let (merchant_id, transaction_id, amount_minor, currency, purchased_at): (String, String, i64, String, DateTime<Utc>) =
        sqlx::query_as("SELECT merchant_id, transaction_id, amount_minor, currency, purchased_at FROM purchases WHERE purchase_id = $1")
            .bind(purchase_id)
            .fetch_one(&mut *connection)
            .await?;
    Ok(Purchase {
        purchase_id: PurchaseId::parse("purchase_id", purchase_id)?,
        merchant: MerchantId::parse("merchant_id", &merchant_id)?,
        transaction_id,
        customer_key: referral.customer_key.clone(),
        amount: tandem_domain::money::Money::parse_positive("amount", amount_minor, &currency)?,
        purchased_at,
    })
}
