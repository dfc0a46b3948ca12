//! Set-based attribution: what the attribution stage does for purchases, a whole run of them at a
//! time, in a fixed number of statements whatever the run's length (the purchases and their key
//! rows; the automatic referrals; the candidates; the claims; the conversions; the refunds that
//! waited), instead of several statements a purchase.
//!
//! A run is a sequence of consecutive purchase messages of a batch with distinct customer keys.
//! Within such a run no purchase can see another's effects (candidates, automatic referrals and
//! previous purchases are all per customer key), so applying the run at once decides exactly what
//! applying its messages one after the other decides; the one shared effect, two keys' copies of
//! one purchase, is resolved in message order (the first copy whose key finds a winner claims it).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use tandem_codec::money_to_proto;
use tandem_domain::attribution::{attribution_ends_at, choose_referral, Candidate};
use tandem_domain::customer::IdentifierKind;
use tandem_domain::ids::{MerchantId, PartnershipId, PurchaseId, ReferralId};
use tandem_domain::money::Money;
use tandem_domain::partnership::TouchPolicy;
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;

use crate::apply::{hand_refund, Handoff};
use crate::events::{Purchase, Referral};
use crate::terms::TermsCache;
use crate::LedgerError;

/// One purchase message of a run, with what its hand-offs carry.
pub struct PurchaseMessage {
    pub purchase: Purchase,
    pub recorded_at: DateTime<Utc>,
    /// The trace context of the message.
    pub headers: Vec<(String, String)>,
}

/// Applies a run of purchase messages (distinct customer keys, in message order).
pub async fn apply_purchases(
    connection: &mut PgConnection,
    books: &mut TermsCache,
    handoff: &mut Handoff,
    run: &[PurchaseMessage],
) -> Result<(), LedgerError> {
    if run.is_empty() {
        return Ok(());
    }
    insert_purchases(connection, run).await?;
    refer_automatically(connection, books, run).await?;
    attribute(connection, books, handoff, run).await
}

/// The purchases (once, whichever key's copy comes first) and each copy's key row, in one
/// statement.
async fn insert_purchases(
    connection: &mut PgConnection,
    run: &[PurchaseMessage],
) -> Result<(), LedgerError> {
    let mut columns = PurchaseColumns::default();
    for message in run {
        columns.push(&message.purchase);
    }
    sqlx::query(
        "WITH input AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::timestamptz[], $7::text[]) \
           AS t(purchase_id, merchant_id, transaction_id, amount_minor, currency, purchased_at, customer_key)), \
         purchase AS (INSERT INTO purchases (purchase_id, merchant_id, transaction_id, amount_minor, currency, purchased_at) \
           SELECT DISTINCT ON (purchase_id) purchase_id, merchant_id, transaction_id, amount_minor, currency, purchased_at FROM input \
           ORDER BY purchase_id ON CONFLICT (purchase_id) DO NOTHING) \
         INSERT INTO purchase_keys (customer_key, merchant_id, purchase_id, purchased_at) \
           SELECT customer_key, merchant_id, purchase_id, purchased_at FROM input ON CONFLICT DO NOTHING",
    )
    .bind(&columns.purchase_id)
    .bind(&columns.merchant_id)
    .bind(&columns.transaction_id)
    .bind(&columns.amount_minor)
    .bind(&columns.currency)
    .bind(&columns.purchased_at)
    .bind(&columns.customer_key)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

#[derive(Default)]
struct PurchaseColumns {
    purchase_id: Vec<String>,
    merchant_id: Vec<String>,
    transaction_id: Vec<String>,
    amount_minor: Vec<i64>,
    currency: Vec<String>,
    purchased_at: Vec<DateTime<Utc>>,
    customer_key: Vec<String>,
}

impl PurchaseColumns {
    fn push(&mut self, purchase: &Purchase) {
        self.purchase_id.push(purchase.purchase_id.to_string());
        self.merchant_id.push(purchase.merchant.to_string());
        self.transaction_id.push(purchase.transaction_id.clone());
        self.amount_minor.push(purchase.amount.amount_minor);
        self.currency
            .push(purchase.amount.currency.as_str().to_owned());
        self.purchased_at.push(purchase.purchased_at);
        self.customer_key
            .push(purchase.customer_key.as_str().to_owned());
    }
}

/// A partnership and when it ended, if it did.
type Ended = (PartnershipId, Option<DateTime<Utc>>);

/// Partnerships whose terms say so turn every purchase at the referrer into a referral of its
/// customer to the acceptor. The referral id is derived from the purchase and the partnership,
/// so every customer key's copy of the purchase creates the same referral.
async fn refer_automatically(
    connection: &mut PgConnection,
    books: &mut TermsCache,
    run: &[PurchaseMessage],
) -> Result<(), LedgerError> {
    let mut merchants: Vec<&str> = run.iter().map(|m| m.purchase.merchant.as_str()).collect();
    merchants.sort_unstable();
    merchants.dedup();
    let rows: Vec<(String, String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT partnership_id, referrer_merchant_id, terminated_at FROM partnerships WHERE referrer_merchant_id = ANY($1)",
    )
    .bind(&merchants)
    .fetch_all(&mut *connection)
    .await?;
    if rows.is_empty() {
        return Ok(());
    }
    // Per referrer: its partnerships and when each ended, if it did.
    let mut of_referrer: HashMap<String, Vec<Ended>> = HashMap::new();
    for (partnership_id, referrer, terminated_at) in rows {
        let partnership_id = PartnershipId::parse("partnership_id", &partnership_id)?;
        of_referrer
            .entry(referrer)
            .or_default()
            .push((partnership_id, terminated_at));
    }
    books
        .prefetch(connection, of_referrer.values().flatten().map(|(id, _)| id))
        .await?;
    let mut referrals = Vec::new();
    for message in run {
        let purchase = &message.purchase;
        let Some(partnerships) = of_referrer.get(purchase.merchant.as_str()) else {
            continue;
        };
        for (partnership_id, terminated_at) in partnerships {
            if terminated_at.is_some_and(|at| at <= purchase.purchased_at) {
                continue;
            }
            let core = books.get(connection, partnership_id).await?;
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
            referrals.push(Referral {
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
            });
        }
    }
    insert_referrals(connection, &referrals, true).await?;
    tracing::debug!(count = referrals.len(), "automatic referrals recorded");
    Ok(())
}

/// Records referrals (once each, whichever key's copy comes first) and each copy's key row, in
/// one statement; a cancellation that arrived before its referral applies as it is inserted.
pub async fn insert_referrals(
    connection: &mut PgConnection,
    referrals: &[Referral],
    automatic: bool,
) -> Result<(), LedgerError> {
    if referrals.is_empty() {
        return Ok(());
    }
    let mut referral_id = Vec::with_capacity(referrals.len());
    let mut partnership_id = Vec::with_capacity(referrals.len());
    let mut terms_version = Vec::with_capacity(referrals.len());
    let mut referrer = Vec::with_capacity(referrals.len());
    let mut acceptor = Vec::with_capacity(referrals.len());
    let mut reference = Vec::with_capacity(referrals.len());
    let mut referred_at = Vec::with_capacity(referrals.len());
    let mut ends_at = Vec::with_capacity(referrals.len());
    let mut customer_key = Vec::with_capacity(referrals.len());
    for r in referrals {
        referral_id.push(r.referral_id.as_str());
        partnership_id.push(r.partnership_id.as_str());
        terms_version.push(r.terms_version);
        referrer.push(r.referrer.as_str());
        acceptor.push(r.acceptor.as_str());
        reference.push(r.referrer_reference.as_str());
        referred_at.push(r.referred_at);
        ends_at.push(r.attribution_ends_at);
        customer_key.push(r.customer_key.as_str());
    }
    sqlx::query(
        "WITH input AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::text[], $7::timestamptz[], $8::timestamptz[], $9::text[]) \
           AS t(referral_id, partnership_id, terms_version, referrer, acceptor, reference, referred_at, ends_at, customer_key)), \
         referral AS (INSERT INTO referrals (referral_id, partnership_id, terms_version, referrer_merchant_id, acceptor_merchant_id, \
           referrer_reference, referred_at, attribution_ends_at, automatic, cancelled_at) \
           SELECT DISTINCT ON (i.referral_id) i.referral_id, i.partnership_id, i.terms_version, i.referrer, i.acceptor, i.reference, \
             i.referred_at, i.ends_at, $10, p.cancelled_at \
           FROM input i LEFT JOIN pending_cancellations p ON p.referral_id = i.referral_id ORDER BY i.referral_id \
           ON CONFLICT (referral_id) DO NOTHING RETURNING referral_id) \
         INSERT INTO referral_keys (customer_key, acceptor_merchant_id, referral_id, referred_at, attribution_ends_at) \
           SELECT customer_key, acceptor, referral_id, referred_at, ends_at FROM input ON CONFLICT DO NOTHING",
    )
    .bind(&referral_id)
    .bind(&partnership_id)
    .bind(&terms_version)
    .bind(&referrer)
    .bind(&acceptor)
    .bind(&reference)
    .bind(&referred_at)
    .bind(&ends_at)
    .bind(&customer_key)
    .bind(automatic)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// The purchases at the acceptor of `referral`, by its customer key, in its window and
/// not attributed yet: a referral that arrives after purchases it covers (a till that was offline)
/// attributes them now, each by the same rule as if the referral had come first.
pub async fn attribute_waiting(
    connection: &mut PgConnection,
    books: &mut TermsCache,
    handoff: &mut Handoff,
    referral: &Referral,
    recorded_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    let rows: Vec<(String, String, String, i64, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT p.purchase_id, p.merchant_id, p.transaction_id, p.amount_minor, p.currency, p.purchased_at \
         FROM purchase_keys k JOIN purchases p ON p.purchase_id = k.purchase_id \
         WHERE k.customer_key = $1 AND k.merchant_id = $2 AND k.purchased_at >= $3 AND k.purchased_at < $4 \
         AND NOT EXISTS (SELECT 1 FROM attributed_purchases a WHERE a.purchase_id = k.purchase_id) \
         ORDER BY k.purchased_at, k.purchase_id",
    )
    .bind(referral.customer_key.as_str())
    .bind(referral.acceptor.as_str())
    .bind(referral.referred_at)
    .bind(referral.attribution_ends_at)
    .fetch_all(&mut *connection)
    .await?;
    let mut waiting = Vec::with_capacity(rows.len());
    for (purchase_id, merchant_id, transaction_id, amount_minor, currency, purchased_at) in rows {
        waiting.push(PurchaseMessage {
            purchase: Purchase {
                purchase_id: PurchaseId::parse("purchase_id", &purchase_id)?,
                merchant: MerchantId::parse("merchant_id", &merchant_id)?,
                transaction_id,
                customer_key: referral.customer_key.clone(),
                amount: Money::parse_positive("amount", amount_minor, &currency)?,
                purchased_at,
            },
            recorded_at,
            headers: handoff.headers.clone(),
        });
    }
    // These purchases share one customer key, but attributing one never changes what another
    // sees: each claims its own purchase, and the previous purchase a claim reads is older than
    // the referral, which every one of them follows.
    attribute(connection, books, handoff, &waiting).await
}

type CandidateRow = (
    i64,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    String,
);

/// A refund that waited for its purchase: merchant, transaction, then [`WaitingRefund`].
type WaitingRefundRow = (String, String, String, i64, String, DateTime<Utc>);
/// Refund id, amount in minor units, currency, when it was refunded.
type WaitingRefund = (String, i64, String, DateTime<Utc>);

/// A purchase copy that found its referral.
struct Winner {
    index: usize,
    referral_id: ReferralId,
    partnership_id: PartnershipId,
    referred_at: DateTime<Utc>,
    matched_by: Option<IdentifierKind>,
}

/// Attributes each purchase copy of `items` to the winning referral of its key, if any, unless
/// the purchase was already attributed, and hands it to its partnership's commission stage,
/// after the refunds of it that arrived first.
async fn attribute(
    connection: &mut PgConnection,
    books: &mut TermsCache,
    handoff: &mut Handoff,
    items: &[PurchaseMessage],
) -> Result<(), LedgerError> {
    if items.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = items
        .iter()
        .map(|m| m.purchase.customer_key.as_str())
        .collect();
    let merchants: Vec<&str> = items.iter().map(|m| m.purchase.merchant.as_str()).collect();
    let times: Vec<DateTime<Utc>> = items.iter().map(|m| m.purchase.purchased_at).collect();
    let purchases: Vec<&str> = items
        .iter()
        .map(|m| m.purchase.purchase_id.as_str())
        .collect();
    // The candidates of every copy, none for a purchase already attributed (another key's copy,
    // in an earlier batch or on another partition).
    let rows: Vec<CandidateRow> = sqlx::query_as(
        "SELECT i.ord, k.referral_id, k.referred_at, k.attribution_ends_at, r.cancelled_at, r.partnership_id \
         FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[]) WITH ORDINALITY AS i(customer_key, merchant_id, purchased_at, purchase_id, ord) \
         JOIN referral_keys k ON k.customer_key = i.customer_key AND k.acceptor_merchant_id = i.merchant_id \
           AND k.referred_at <= i.purchased_at AND k.attribution_ends_at > i.purchased_at \
         JOIN referrals r ON r.referral_id = k.referral_id \
         WHERE NOT EXISTS (SELECT 1 FROM attributed_purchases a WHERE a.purchase_id = i.purchase_id)",
    )
    .bind(&keys)
    .bind(&merchants)
    .bind(&times)
    .bind(&purchases)
    .fetch_all(&mut *connection)
    .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut candidate_rows: Vec<Vec<CandidateRow>> = (0..items.len()).map(|_| Vec::new()).collect();
    let mut partnerships = HashSet::new();
    for row in rows {
        let index = usize::try_from(row.0 - 1)
            .ok()
            .filter(|index| *index < items.len())
            .ok_or(LedgerError::Invariant(
                "candidate for no purchase of the run",
            ))?;
        partnerships.insert(PartnershipId::parse("partnership_id", &row.5)?);
        candidate_rows[index].push(row);
    }
    books.prefetch(connection, partnerships.iter()).await?;

    // Decide each copy in message order; a purchase is claimed by its first copy with a winner.
    let mut winners = Vec::new();
    let mut claimed_in_run = HashSet::new();
    for (index, rows) in candidate_rows.into_iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let purchase = &items[index].purchase;
        if claimed_in_run.contains(purchase.purchase_id.as_str()) {
            continue;
        }
        if let Some(winner) = decide(connection, books, purchase, index, rows).await? {
            claimed_in_run.insert(purchase.purchase_id.as_str());
            winners.push(winner);
        }
    }
    if winners.is_empty() {
        return Ok(());
    }

    // Another customer key's copy, on another partition, may attribute the same purchase at the
    // same time: the first to insert wins, the other does nothing.
    let claimed: Vec<(String,)> = sqlx::query_as(
        "INSERT INTO attributed_purchases (purchase_id, partnership_id, referral_id, matched_by) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) ON CONFLICT DO NOTHING RETURNING purchase_id",
    )
    .bind(winners.iter().map(|w| items[w.index].purchase.purchase_id.as_str()).collect::<Vec<_>>())
    .bind(winners.iter().map(|w| w.partnership_id.as_str()).collect::<Vec<_>>())
    .bind(winners.iter().map(|w| w.referral_id.as_str()).collect::<Vec<_>>())
    .bind(winners.iter().map(|w| w.matched_by.map(IdentifierKind::tag)).collect::<Vec<_>>())
    .fetch_all(&mut *connection)
    .await?;
    let claimed: HashSet<String> = claimed.into_iter().map(|(id,)| id).collect();
    winners.retain(|w| claimed.contains(items[w.index].purchase.purchase_id.as_str()));
    if winners.is_empty() {
        return Ok(());
    }

    // The referrals convert; each one's reference and the customer's latest purchase at the
    // acceptor before the referral (for new-customer terms) come back in the same statement.
    let converted: Vec<(i64, String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "WITH input AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[]) WITH ORDINALITY \
           AS t(referral_id, customer_key, merchant_id, referred_at, ord)), \
         converted AS (UPDATE referrals r SET converted = true WHERE r.referral_id IN (SELECT referral_id FROM input) \
           RETURNING r.referral_id, r.referrer_reference) \
         SELECT i.ord, c.referrer_reference, \
           (SELECT max(k.purchased_at) FROM purchase_keys k WHERE k.customer_key = i.customer_key AND k.merchant_id = i.merchant_id AND k.purchased_at < i.referred_at) \
         FROM input i JOIN converted c ON c.referral_id = i.referral_id ORDER BY i.ord",
    )
    .bind(winners.iter().map(|w| w.referral_id.as_str()).collect::<Vec<_>>())
    .bind(winners.iter().map(|w| items[w.index].purchase.customer_key.as_str()).collect::<Vec<_>>())
    .bind(winners.iter().map(|w| items[w.index].purchase.merchant.as_str()).collect::<Vec<_>>())
    .bind(winners.iter().map(|w| w.referred_at).collect::<Vec<_>>())
    .fetch_all(&mut *connection)
    .await?;
    if converted.len() != winners.len() {
        return Err(LedgerError::Invariant(
            "an attributed purchase's referral is missing",
        ));
    }

    // Refunds that reached the ledger before their purchase go first: the partnership parks
    // them, then applies them right after the purchase, cut down to what is left of it.
    let waiting: Vec<WaitingRefundRow> = sqlx::query_as(
        "UPDATE refunds r SET handled = true \
         FROM UNNEST($1::text[], $2::text[]) AS t(merchant_id, transaction_id) \
         WHERE r.merchant_id = t.merchant_id AND r.transaction_id = t.transaction_id AND NOT r.handled \
         RETURNING r.merchant_id, r.transaction_id, r.refund_id, r.amount_minor, r.currency, r.refunded_at",
    )
    .bind(winners.iter().map(|w| items[w.index].purchase.merchant.as_str()).collect::<Vec<_>>())
    .bind(winners.iter().map(|w| items[w.index].purchase.transaction_id.as_str()).collect::<Vec<_>>())
    .fetch_all(&mut *connection)
    .await?;
    let mut refunds_of: HashMap<(String, String), Vec<WaitingRefund>> = HashMap::new();
    for (merchant_id, transaction_id, refund_id, amount_minor, currency, refunded_at) in waiting {
        refunds_of
            .entry((merchant_id, transaction_id))
            .or_default()
            .push((refund_id, amount_minor, currency, refunded_at));
    }

    for (winner, (_, referrer_reference, previous_purchase_at)) in winners.iter().zip(converted) {
        let item = &items[winner.index];
        let purchase = &item.purchase;
        handoff.headers.clone_from(&item.headers);
        let mut refunds = refunds_of
            .remove(&(
                purchase.merchant.to_string(),
                purchase.transaction_id.clone(),
            ))
            .unwrap_or_default();
        refunds.sort_by(|a, b| (a.3, &a.0).cmp(&(b.3, &b.0)));
        for (refund_id, amount_minor, currency, refunded_at) in refunds {
            hand_refund(
                handoff,
                &winner.partnership_id,
                &refund_id,
                &purchase.purchase_id,
                pb::Money {
                    amount_minor,
                    currency,
                },
                refunded_at,
                item.recorded_at,
            );
        }
        handoff.send(
            &winner.partnership_id,
            format!("attribution/{}", purchase.purchase_id),
            item.recorded_at,
            pb::partnership_command::Command::AttributePurchase(pb::AttributePurchase {
                purchase_id: purchase.purchase_id.to_string(),
                referral_id: winner.referral_id.to_string(),
                amount: Some(money_to_proto(purchase.amount)),
                purchased_at: Some(timestamp(purchase.purchased_at)),
                referred_at: Some(timestamp(winner.referred_at)),
                previous_purchase_at: previous_purchase_at.map(timestamp),
                referrer_reference,
                transaction_id: purchase.transaction_id.clone(),
                matched_by: tandem_codec::identifiers::kind_tag_to_proto(
                    winner.matched_by.map(IdentifierKind::tag),
                ),
            }),
        );
        // Debug, not info: one line per attributed purchase is the hot path's; traces carry it.
        tracing::debug!(purchase_id = %purchase.purchase_id, referral_id = %winner.referral_id, partnership_id = %winner.partnership_id, "purchase attributed; handed to the partnership");
    }
    Ok(())
}

/// The referral one purchase copy goes to, among its key's candidates, by the pure rules in
/// `tandem_domain::attribution`: each partnership's terms pick first or last touch; when referrers
/// with different policies compete, the first referrer wins.
async fn decide(
    connection: &mut PgConnection,
    books: &mut TermsCache,
    purchase: &Purchase,
    index: usize,
    rows: Vec<CandidateRow>,
) -> Result<Option<Winner>, LedgerError> {
    let mut policy = TouchPolicy::LastReferrer;
    let mut candidates = Vec::with_capacity(rows.len());
    let mut partnership_of = HashMap::new();
    let matched_by = purchase.customer_key.kind();
    for (_, referral_id, referred_at, attribution_ends_at, cancelled_at, partnership_id) in rows {
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
        return Ok(None);
    };
    let (partnership_id, referred_at) = partnership_of
        .remove(&winner.referral_id)
        .ok_or(LedgerError::Invariant("winner without partnership"))?;
    Ok(Some(Winner {
        index,
        referral_id: winner.referral_id.clone(),
        partnership_id,
        referred_at,
        matched_by,
    }))
}
