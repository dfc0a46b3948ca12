//! Applying a batch of events in one transaction: deduplicate by message id, then update the
//! projections and post ledger entries. Attribution is decided by the pure rules in
//! `tandem_domain::attribution`; this module only loads the candidates and writes the outcome.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tandem_bus::{BatchHandler, Delivery};
use tandem_domain::attribution::{choose_referral, Candidate};
use tandem_domain::customer::CustomerKey;
use tandem_domain::ids::{MerchantId, ReferralId};
use tandem_domain::ledger::commission_accrual;
use tandem_domain::money::Money;
use tracing::Instrument;

use crate::events::{decode, Incoming, LedgerEvent, PartnershipTerms, Purchase, Referral};
use crate::LedgerError;

pub struct Applier {
    pub pool: PgPool,
}

impl BatchHandler for Applier {
    type Error = LedgerError;

    async fn handle(&self, batch: &[Delivery]) -> Result<(), LedgerError> {
        let decoded: Vec<(String, Result<Incoming, String>)> = batch
            .iter()
            .map(|delivery| match decode(delivery) {
                Ok(incoming) => (incoming.message_id.clone(), Ok(incoming)),
                Err(reason) => (
                    format!(
                        "rejected/{}/{}/{}",
                        delivery.topic.logical_name(),
                        delivery.partition,
                        delivery.offset
                    ),
                    Err(reason),
                ),
            })
            .collect();
        let ids: Vec<String> = decoded.iter().map(|(id, _)| id.clone()).collect();

        let mut tx = self.pool.begin().await?;
        let mut unapplied = tandem_store::claim_unapplied(&mut tx, &ids).await?;
        let mut applied = 0usize;
        for ((message_id, incoming), delivery) in decoded.into_iter().zip(batch) {
            // `remove` is true once per id: a message delivered twice in one batch applies once.
            if !unapplied.remove(&message_id) {
                continue;
            }
            let span = tracing::info_span!("apply_event", message_id = %message_id, topic = delivery.topic.logical_name(), partition = delivery.partition, offset = delivery.offset);
            delivery.link_span(&span);
            match incoming {
                Ok(incoming) => apply(&mut tx, incoming).instrument(span).await?,
                Err(reason) => {
                    span.in_scope(|| tracing::error!(reason = %reason, "message rejected; kept in rejected_messages"));
                    sqlx::query("INSERT INTO rejected_messages (message_ref, reason, payload) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                        .bind(&message_id)
                        .bind(&reason)
                        .bind(&delivery.payload)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            applied += 1;
        }
        tx.commit().await?;
        tracing::debug!(received = batch.len(), applied, "batch applied");
        Ok(())
    }
}

async fn apply(connection: &mut PgConnection, incoming: Incoming) -> Result<(), LedgerError> {
    match incoming.event {
        LedgerEvent::MerchantRegistered => Ok(()),
        LedgerEvent::PartnershipCreated(terms) => apply_terms(connection, &terms).await,
        LedgerEvent::CustomerReferred(referral) => {
            apply_referral(connection, &referral, incoming.recorded_at).await
        }
        LedgerEvent::PurchaseRecorded(purchase) => {
            apply_purchase(connection, &purchase, incoming.recorded_at).await
        }
    }
}

async fn apply_terms(
    connection: &mut PgConnection,
    terms: &PartnershipTerms,
) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO partnership_terms (partnership_id, terms_version, referrer_merchant_id, acceptor_merchant_id, \
         commission_rate_bps, attribution_window_days, effective_from) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT DO NOTHING",
    )
    .bind(terms.partnership_id.as_str())
    .bind(terms.terms_version)
    .bind(terms.referrer.as_str())
    .bind(terms.acceptor.as_str())
    .bind(i32::try_from(terms.commission_rate_bps).unwrap_or(i32::MAX))
    .bind(i32::try_from(terms.attribution_window_days).unwrap_or(i32::MAX))
    .bind(terms.effective_from)
    .execute(connection)
    .await?;
    tracing::info!(partnership_id = %terms.partnership_id, terms_version = terms.terms_version, "partnership terms recorded");
    Ok(())
}

async fn apply_referral(
    connection: &mut PgConnection,
    referral: &Referral,
    recorded_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    // The gateway publishes a partnership before any referral under it, but on another topic:
    // until the admin copy has been applied, the referral waits (the batch is retried).
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM partnership_terms WHERE partnership_id = $1 AND terms_version = $2)",
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
    sqlx::query(
        "INSERT INTO referrals (referral_id, partnership_id, terms_version, referrer_merchant_id, acceptor_merchant_id, \
         referrer_reference, referred_at, attribution_ends_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
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
        let purchase = load_purchase(connection, &purchase_id, &referral.customer_key).await?;
        attribute(connection, &purchase, recorded_at).await?;
    }
    Ok(())
}

async fn apply_purchase(
    connection: &mut PgConnection,
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
    attribute(connection, purchase, recorded_at).await
}

/// Attributes `purchase` (one customer key's copy) to the winning referral of that key, if any,
/// unless the purchase already has its commission.
async fn attribute(
    connection: &mut PgConnection,
    purchase: &Purchase,
    attributed_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    let already: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM commissions WHERE purchase_id = $1)")
            .bind(purchase.purchase_id.as_str())
            .fetch_one(&mut *connection)
            .await?;
    if already {
        return Ok(());
    }
    let rows: Vec<(String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT referral_id, referred_at, attribution_ends_at FROM referral_keys \
         WHERE customer_key = $1 AND acceptor_merchant_id = $2 AND referred_at <= $3 AND attribution_ends_at > $3",
    )
    .bind(purchase.customer_key.as_str())
    .bind(purchase.merchant.as_str())
    .bind(purchase.purchased_at)
    .fetch_all(&mut *connection)
    .await?;
    let mut candidates = Vec::with_capacity(rows.len());
    for (referral_id, referred_at, attribution_ends_at) in rows {
        candidates.push(Candidate {
            referral_id: ReferralId::parse("referral_id", &referral_id)?,
            referred_at,
            attribution_ends_at,
        });
    }
    let Some(winner) = choose_referral(&candidates, purchase.purchased_at) else {
        return Ok(());
    };

    let (partnership_id, referral_terms_version, referrer, acceptor): (String, i32, String, String) = sqlx::query_as(
        "SELECT partnership_id, terms_version, referrer_merchant_id, acceptor_merchant_id FROM referrals WHERE referral_id = $1",
    )
    .bind(winner.referral_id.as_str())
    .fetch_one(&mut *connection)
    .await?;
    // The terms in force when the purchase happened: the latest version effective by then. A
    // purchase dated before the partnership's first version (a till that was offline) uses the
    // version the referral was made under.
    let (terms_version, rate_bps): (i32, i32) = sqlx::query_as(
        "SELECT terms_version, commission_rate_bps FROM partnership_terms \
         WHERE partnership_id = $1 AND (effective_from <= $2 OR terms_version = $3) \
         ORDER BY (effective_from <= $2) DESC, terms_version DESC LIMIT 1",
    )
    .bind(&partnership_id)
    .bind(purchase.purchased_at)
    .bind(referral_terms_version)
    .fetch_optional(&mut *connection)
    .await?
    .ok_or_else(|| LedgerError::AwaitingPartnership(partnership_id.clone()))?;
    let rate_bps =
        u32::try_from(rate_bps).map_err(|_| LedgerError::Invariant("negative commission rate"))?;
    let commission: Money = purchase.amount.times_bps(rate_bps);
    let referrer = MerchantId::parse("referrer_merchant_id", &referrer)?;
    let acceptor = MerchantId::parse("acceptor_merchant_id", &acceptor)?;

    sqlx::query(
        "INSERT INTO commissions (purchase_id, referral_id, partnership_id, terms_version, referrer_merchant_id, \
         acceptor_merchant_id, amount_minor, currency, commission_rate_bps, commission_minor, purchased_at, attributed_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(purchase.purchase_id.as_str())
    .bind(winner.referral_id.as_str())
    .bind(&partnership_id)
    .bind(terms_version)
    .bind(referrer.as_str())
    .bind(acceptor.as_str())
    .bind(purchase.amount.amount_minor)
    .bind(purchase.amount.currency.as_str())
    .bind(i32::try_from(rate_bps).unwrap_or(i32::MAX))
    .bind(commission.amount_minor)
    .bind(purchase.purchased_at)
    .bind(attributed_at)
    .execute(&mut *connection)
    .await?;
    sqlx::query(
        "UPDATE referrals SET status = 'converted' WHERE referral_id = $1 AND status = 'open'",
    )
    .bind(winner.referral_id.as_str())
    .execute(&mut *connection)
    .await?;

    if commission.amount_minor > 0 {
        let entry = commission_accrual(&referrer, &acceptor, commission)?;
        let entry_id = format!("accrual/{}", purchase.purchase_id);
        sqlx::query("INSERT INTO ledger_entries (entry_id, kind, purchase_id, currency, recorded_at) VALUES ($1, 'commission_accrual', $2, $3, $4)")
            .bind(&entry_id)
            .bind(purchase.purchase_id.as_str())
            .bind(entry.currency().as_str())
            .bind(attributed_at)
            .execute(&mut *connection)
            .await?;
        for posting in entry.postings() {
            sqlx::query("INSERT INTO ledger_postings (entry_id, account, merchant_id, currency, amount_minor) VALUES ($1, $2, $3, $4, $5)")
                .bind(&entry_id)
                .bind(posting.account.as_str())
                .bind(posting.merchant.as_str())
                .bind(entry.currency().as_str())
                .bind(posting.amount_minor)
                .execute(&mut *connection)
                .await?;
        }
    }
    tracing::info!(
        purchase_id = %purchase.purchase_id,
        referral_id = %winner.referral_id,
        partnership_id = %partnership_id,
        terms_version,
        commission_minor = commission.amount_minor,
        currency = %commission.currency,
        "purchase attributed"
    );
    Ok(())
}

async fn load_purchase(
    connection: &mut PgConnection,
    purchase_id: &str,
    customer_key: &CustomerKey,
) -> Result<Purchase, LedgerError> {
    let (merchant_id, transaction_id, amount_minor, currency, purchased_at): (String, String, i64, String, DateTime<Utc>) =
        sqlx::query_as("SELECT merchant_id, transaction_id, amount_minor, currency, purchased_at FROM purchases WHERE purchase_id = $1")
            .bind(purchase_id)
            .fetch_one(&mut *connection)
            .await?;
    Ok(Purchase {
        purchase_id: tandem_domain::ids::PurchaseId::parse("purchase_id", purchase_id)?,
        merchant: MerchantId::parse("merchant_id", &merchant_id)?,
        transaction_id,
        customer_key: customer_key.clone(),
        amount: Money::parse_positive("amount", amount_minor, &currency)?,
        purchased_at,
    })
}
