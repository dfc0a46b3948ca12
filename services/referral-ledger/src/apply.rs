//! Applying a batch of messages in one transaction: deduplicate by message id, then, per message,
//! update the per-customer-key projections (referrals, purchases, refunds), attribute purchases
//! to referrals, and let the partnership aggregate decide commissions and reversals (see
//! `book`). Which referral wins is decided by the pure rules in `tandem_domain::attribution`;
//! how much it earns by `tandem_domain::commission`.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use tandem_bus::{BatchHandler, Delivery, Topic};
use tandem_domain::attribution::{attribution_ends_at, choose_referral, Candidate};
use tandem_domain::commission::{Attribution, Command};
use tandem_domain::ids::{MerchantId, PartnershipId, PurchaseId, ReferralId, RefundId};
use tandem_domain::money::Money;
use tandem_domain::partnership::TouchPolicy;
use tracing::Instrument;

use crate::book;
use crate::events::{decode, Incoming, LedgerEvent, Purchase, Referral, Refund};
use crate::LedgerError;

pub struct Applier {
    pub pool: PgPool,
}

impl BatchHandler for Applier {
    type Error = LedgerError;

    async fn handle(&self, batch: &[Delivery]) -> Result<(), LedgerError> {
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
        // Partnerships loaded in this batch, kept up to date as the batch appends to them.
        let mut books = book::Books::default();
        let mut applied = 0usize;
        for ((message_id, admin_sequence, incoming), delivery) in decoded.into_iter().zip(batch) {
            let admin_sequence = i64::try_from(admin_sequence).unwrap_or(i64::MAX);
            if delivery.topic == Topic::Admin {
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
            let outcome = match incoming {
                Ok(incoming) => {
                    apply(&mut tx, &mut books, incoming)
                        .instrument(span.clone())
                        .await?
                }
                Err(reason) => Err(reason),
            };
            if let Err(reason) = outcome {
                span.in_scope(|| tracing::error!(reason = %reason, "message rejected; kept in rejected_messages"));
                sqlx::query("INSERT INTO rejected_messages (message_ref, reason, payload) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                    .bind(&message_id)
                    .bind(&reason)
                    .bind(&delivery.payload)
                    .execute(&mut *tx)
                    .await?;
            }
            applied += 1;
        }
        sqlx::query("UPDATE admin_progress SET applied_through = greatest(applied_through, $1)")
            .bind(admin_applied_through)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::debug!(received = batch.len(), applied, "batch applied");
        Ok(())
    }
}

/// Applies one message. `Ok(Err(reason))` means the domain refused it: it is recorded as
/// rejected and the consumer moves on. `Err` is a failure: the whole batch is retried.
async fn apply(
    connection: &mut PgConnection,
    books: &mut book::Books,
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
            let loaded = books.get(connection, &partnership_id).await?;
            book::record(connection, loaded, &[event], &[event_id], recorded_at).await?;
            tracing::info!(%partnership_id, "partnership terms event recorded");
        }
        LedgerEvent::CustomerReferred(referral) => {
            apply_referral(connection, books, &referral, recorded_at).await?
        }
        LedgerEvent::ReferralCancelled {
            referral_id,
            cancelled_at,
        } => {
            sqlx::query("UPDATE referrals SET cancelled_at = $2 WHERE referral_id = $1 AND cancelled_at IS NULL")
                .bind(referral_id.as_str())
                .bind(cancelled_at)
                .execute(&mut *connection)
                .await?;
            tracing::info!(%referral_id, "referral cancelled");
        }
        LedgerEvent::PurchaseRecorded(purchase) => {
            apply_purchase(connection, books, &purchase, recorded_at).await?
        }
        LedgerEvent::RefundRecorded(refund) => {
            return apply_refund(connection, books, &refund, recorded_at).await
        }
    }
    Ok(Ok(()))
}

async fn apply_referral(
    connection: &mut PgConnection,
    books: &mut book::Books,
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
        attribute(connection, books, &purchase, recorded_at).await?;
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
    books: &mut book::Books,
    purchase: &Purchase,
    recorded_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO purchases (purchase_id, merchant_id, transaction_id, amount_minor, currency, purchased_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (purchase_id) DO NOTHING",
    )
    .bind(purchase.purchase_id.as_str())
    .bind(purchase.merchant.as_str())
    .bind(&purchase.transaction_id)
    .bind(purchase.amount.amount_minor)
    .bind(purchase.amount.currency.as_str())
    .bind(purchase.purchased_at)
    .execute(&mut *connection)
    .await?;
    sqlx::query(
        "INSERT INTO purchase_keys (customer_key, merchant_id, purchase_id, purchased_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT DO NOTHING",
    )
    .bind(purchase.customer_key.as_str())
    .bind(purchase.merchant.as_str())
    .bind(purchase.purchase_id.as_str())
    .bind(purchase.purchased_at)
    .execute(&mut *connection)
    .await?;
    refer_automatically(connection, books, purchase).await?;
    attribute(connection, books, purchase, recorded_at).await
}

/// Partnerships whose terms say so turn every purchase at the referrer into a referral of its
/// customer to the acceptor. The referral id is derived from the purchase and the partnership,
/// so every customer key's copy of the purchase creates the same referral.
async fn refer_automatically(
    connection: &mut PgConnection,
    books: &mut book::Books,
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
        let loaded = books.get(connection, &partnership_id).await?;
        let Some((version, terms)) = loaded.state.terms_at(purchase.purchased_at) else {
            continue;
        };
        if !terms.auto_refer {
            continue;
        }
        let Some((referrer, acceptor)) = loaded.state.parties() else {
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
        tracing::info!(referral_id = %referral.referral_id, %partnership_id, "automatic referral recorded");
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
/// unless the purchase was already attributed, then lets the partnership decide the commission.
async fn attribute(
    connection: &mut PgConnection,
    books: &mut book::Books,
    purchase: &Purchase,
    recorded_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    let already: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM commissions WHERE purchase_id = $1)")
            .bind(purchase.purchase_id.as_str())
            .fetch_one(&mut *connection)
            .await?;
    if already {
        return Ok(());
    }
    let rows: Vec<CandidateRow> = sqlx::query_as(
        "SELECT k.referral_id, k.referred_at, k.attribution_ends_at, r.cancelled_at, r.partnership_id \
         FROM referral_keys k JOIN referrals r ON r.referral_id = k.referral_id \
         WHERE k.customer_key = $1 AND k.acceptor_merchant_id = $2 AND k.referred_at <= $3 AND k.attribution_ends_at > $3",
    )
    .bind(purchase.customer_key.as_str())
    .bind(purchase.merchant.as_str())
    .bind(purchase.purchased_at)
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
    for (referral_id, referred_at, attribution_ends_at, cancelled_at, partnership_id) in rows {
        let partnership_id = PartnershipId::parse("partnership_id", &partnership_id)?;
        let loaded = books.get(connection, &partnership_id).await?;
        if loaded
            .state
            .terms_at(purchase.purchased_at)
            .is_none_or(|(_, terms)| terms.touch_policy == TouchPolicy::FirstReferrer)
        {
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
    let previous_purchase_at: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT max(purchased_at) FROM purchase_keys WHERE customer_key = $1 AND merchant_id = $2 AND purchased_at < $3",
    )
    .bind(purchase.customer_key.as_str())
    .bind(purchase.merchant.as_str())
    .bind(referred_at)
    .fetch_one(&mut *connection)
    .await?;

    let loaded = books.get(connection, &partnership_id).await?;
    let command = Command::AttributePurchase(Attribution {
        purchase_id: purchase.purchase_id.clone(),
        referral_id: winner.referral_id.clone(),
        amount: purchase.amount,
        purchased_at: purchase.purchased_at,
        referred_at,
        previous_purchase_at,
    });
    if let Err(refused) = book::decide_and_record(connection, loaded, command, recorded_at).await? {
        // Only a partnership the ledger has not seen yet can refuse an attribution.
        tracing::warn!(%partnership_id, reason = %refused, "attribution refused; waiting for the partnership");
        return Err(LedgerError::AwaitingPartnership(partnership_id.to_string()));
    }
    sqlx::query("UPDATE referrals SET converted = true WHERE referral_id = $1")
        .bind(winner.referral_id.as_str())
        .execute(&mut *connection)
        .await?;
    tracing::info!(purchase_id = %purchase.purchase_id, referral_id = %winner.referral_id, %partnership_id, "purchase attributed");

    // Refunds that reached the ledger before their purchase are applied now.
    let waiting: Vec<(String, i64, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT refund_id, amount_minor, currency, refunded_at FROM refunds \
         WHERE merchant_id = $1 AND transaction_id = $2 AND NOT handled ORDER BY refunded_at, refund_id",
    )
    .bind(purchase.merchant.as_str())
    .bind(&purchase.transaction_id)
    .fetch_all(&mut *connection)
    .await?;
    for (refund_id, amount_minor, currency, refunded_at) in waiting {
        let refund_id = RefundId::parse("refund_id", &refund_id)?;
        // Nobody could check a refund recorded before its purchase against it: what exceeds
        // what is left of the purchase is cut off here, as in the partnership's own parking.
        let remaining = loaded
            .state
            .purchase(&purchase.purchase_id)
            .map_or(0, |record| {
                record.amount.amount_minor - record.refunded_minor
            });
        if remaining <= 0 {
            mark_handled(connection, &refund_id).await?;
            tracing::warn!(%refund_id, "waiting refund dropped: the purchase is already fully refunded");
            continue;
        }
        let refund = Refund {
            refund_id: refund_id.clone(),
            merchant: purchase.merchant.clone(),
            transaction_id: purchase.transaction_id.clone(),
            amount: Money::parse_positive("amount", amount_minor.min(remaining), &currency)?,
            refunded_at,
        };
        if let Err(reason) = refund_attributed(
            connection,
            loaded,
            &purchase.purchase_id,
            &refund,
            recorded_at,
        )
        .await?
        {
            tracing::warn!(%refund_id, reason = %reason, "waiting refund refused");
        }
    }
    Ok(())
}

async fn apply_refund(
    connection: &mut PgConnection,
    books: &mut book::Books,
    refund: &Refund,
    recorded_at: DateTime<Utc>,
) -> Result<Result<(), String>, LedgerError> {
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
        return Ok(Ok(()));
    }
    let attributed: Option<(String, String)> = sqlx::query_as(
        "SELECT p.purchase_id, c.partnership_id FROM purchases p JOIN commissions c ON c.purchase_id = p.purchase_id \
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
            let loaded = books.get(connection, &partnership_id).await?;
            refund_attributed(connection, loaded, &purchase_id, refund, recorded_at).await
        }
        None => {
            // The purchase is not attributed (yet): it may not have arrived, or a referral that
            // covers it may still arrive from an offline till. The refund waits either way and is
            // applied if and when the purchase is attributed.
            tracing::info!(refund_id = %refund.refund_id, "refund waits for an attributed purchase");
            Ok(Ok(()))
        }
    }
}

/// Lets the partnership claw back commission for a refund of an attributed purchase.
async fn refund_attributed(
    connection: &mut PgConnection,
    loaded: &mut book::Loaded,
    purchase_id: &PurchaseId,
    refund: &Refund,
    recorded_at: DateTime<Utc>,
) -> Result<Result<(), String>, LedgerError> {
    let command = Command::RecordRefund {
        refund_id: refund.refund_id.clone(),
        purchase_id: purchase_id.clone(),
        refund: refund.amount,
        refunded_at: refund.refunded_at,
    };
    let decided = book::decide_and_record(connection, loaded, command, recorded_at).await?;
    mark_handled(connection, &refund.refund_id).await?;
    match decided {
        Ok(_) => {
            tracing::info!(refund_id = %refund.refund_id, %purchase_id, "refund applied");
            Ok(Ok(()))
        }
        Err(refused) => Ok(Err(format!(
            "refund {} refused: {refused}",
            refund.refund_id
        ))),
    }
}

async fn mark_handled(
    connection: &mut PgConnection,
    refund_id: &RefundId,
) -> Result<(), LedgerError> {
    sqlx::query("UPDATE refunds SET handled = true WHERE refund_id = $1")
        .bind(refund_id.as_str())
        .execute(connection)
        .await?;
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
        amount: Money::parse_positive("amount", amount_minor, &currency)?,
        purchased_at,
    })
}
