//! What settlement takes from the topics, one transaction per batch, deduplicated by message id.
//!
//! From the admin topic: merchants (their time zone sets their cycles' cut-offs), each terms
//! version's currency, cycle, minimum payout and rule, and payout accounts.
//!
//! From the `ledger` topic, keyed by partnership so one partnership's events arrive in the
//! ledger's order: `PurchaseAttributed` with a commission, then `CommissionPayable` when its
//! holding period ended, and `CommissionReversed` for refunds. A commission line is created when
//! the commission becomes payable, for the commission less what was reversed before that; a
//! reversal that arrives after the line exists becomes a claw-back line of its own (negative), so
//! a line never changes once it exists and a settled commission is clawed back in a later cycle.
//! Both depend only on the partition's order, so a replay gives the same lines.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::{PgPool, Postgres, QueryBuilder};
use tandem_bus::{BatchHandler, Delivery, Topic};
use tandem_proto::v1 as pb;
use tandem_proto::v1::event_envelope::Payload;

use crate::SettlementError;

/// Intake transactions take this advisory lock shared; a closure takes it exclusively, so that
/// every line numbered below its watermark is committed when it reads them.
pub(crate) const INTAKE_LOCK: i64 = 0x7365_7474_6c65; // "settle"

pub struct Intake {
    pub pool: PgPool,
}

/// One decoded message.
enum Fact {
    Merchant {
        merchant_id: String,
        display_name: String,
        settlement_currency: String,
        time_zone: String,
    },
    /// With the instant the gateway recorded it, if the event has no `registered_at`.
    PayoutAccount(pb::PayoutAccountRegistered, DateTime<Utc>),
    Terms {
        partnership_id: String,
        version: i32,
        referrer: String,
        acceptor: String,
        currency: String,
        cycle_kind: &'static str,
        minimum_payout_minor: i64,
        rule: String,
    },
    Attributed {
        purchase_id: String,
        partnership_id: String,
        terms_version: i32,
        referral_id: String,
        referrer_reference: String,
        transaction_id: String,
        amount: pb::Money,
        commission_minor: i64,
    },
    Payable {
        purchase_id: String,
        referrer: String,
        acceptor: String,
        payable_at: DateTime<Utc>,
    },
    Reversed {
        refund_id: String,
        purchase_id: String,
        referrer: String,
        acceptor: String,
        refund_minor: i64,
        reversal_minor: i64,
        recorded_at: DateTime<Utc>,
    },
    /// Nothing settlement keeps.
    Ignored,
}

impl BatchHandler for Intake {
    type Error = SettlementError;

    async fn handle(&self, batch: &[Delivery]) -> Result<(), SettlementError> {
        let mut ids = Vec::with_capacity(batch.len());
        let mut facts = Vec::with_capacity(batch.len());
        // A `process` span per message, in its trace, open until the batch commits.
        let mut spans = Vec::with_capacity(batch.len());
        for delivery in batch {
            match decode(delivery) {
                Ok((id, fact)) => {
                    spans.push(delivery.process_span(&id));
                    ids.push(id);
                    facts.push(fact);
                }
                Err(reason) => {
                    // A message that breaks the contract cannot be applied by any retry; it is
                    // logged with its position for an operator and skipped.
                    tracing::error!(
                        topic = delivery.topic.logical_name(),
                        partition = delivery.partition,
                        offset = delivery.offset,
                        %reason,
                        "message skipped: it breaks the event contract"
                    );
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(INTAKE_LOCK)
            .execute(&mut *tx)
            .await?;
        let mut fresh = tandem_store::claim_unapplied(&mut tx, &ids).await?;
        // `remove`, not `contains`: a message delivered twice in one batch (a relay that
        // resent a batch) is applied once.
        let facts: Vec<(String, Fact)> = ids
            .into_iter()
            .zip(facts)
            .filter(|(id, _)| fresh.remove(id))
            .collect();
        apply_admin(&mut tx, &facts).await?;
        apply_ledger(&mut tx, &facts).await?;
        tx.commit().await?;
        drop(spans);
        Ok(())
    }
}

fn decode(delivery: &Delivery) -> Result<(String, Fact), String> {
    match delivery.topic {
        Topic::Admin => {
            let envelope = pb::EventEnvelope::decode(delivery.payload.as_slice())
                .map_err(|error| format!("not an event envelope: {error}"))?;
            let fact = match envelope.payload {
                Some(Payload::MerchantRegistered(event)) => Fact::Merchant {
                    merchant_id: event.merchant_id,
                    display_name: event.display_name,
                    settlement_currency: event.settlement_currency,
                    time_zone: event.time_zone,
                },
                Some(Payload::PayoutAccountRegistered(event)) => Fact::PayoutAccount(
                    event,
                    envelope
                        .recorded_at
                        .as_ref()
                        .and_then(tandem_proto::time::datetime)
                        .unwrap_or_default(),
                ),
                Some(Payload::PartnershipTermsProposed(event)) => {
                    let terms = event
                        .terms
                        .as_ref()
                        .ok_or("PartnershipTermsProposed without terms")?;
                    let terms =
                        tandem_codec::terms_from_proto(terms).map_err(|error| error.to_string())?;
                    Fact::Terms {
                        partnership_id: event.partnership_id,
                        version: i32::try_from(event.version)
                            .map_err(|_| "terms version out of range")?,
                        referrer: event.referrer_merchant_id,
                        acceptor: event.acceptor_merchant_id,
                        currency: terms.currency.to_string(),
                        cycle_kind: crate::cycle_kind(terms.settlement_cycle).as_str(),
                        minimum_payout_minor: terms.minimum_payout_minor,
                        rule: terms.rule.describe(),
                    }
                }
                Some(_) => Fact::Ignored,
                None => return Err("event envelope without a payload".into()),
            };
            Ok((envelope.event_id, fact))
        }
        Topic::Ledger => {
            let event = pb::LedgerEvent::decode(delivery.payload.as_slice())
                .map_err(|error| format!("not a ledger event: {error}"))?;
            let fact = match event.event {
                Some(pb::ledger_event::Event::PurchaseAttributed(attributed)) => {
                    let commission = attributed.commission.as_ref().map_or(0, |m| m.amount_minor);
                    match attributed.amount {
                        Some(amount) if commission > 0 => Fact::Attributed {
                            purchase_id: attributed.purchase_id,
                            partnership_id: event.partnership_id,
                            terms_version: i32::try_from(attributed.terms_version)
                                .map_err(|_| "terms version out of range")?,
                            referral_id: attributed.referral_id,
                            referrer_reference: attributed.referrer_reference,
                            transaction_id: attributed.transaction_id,
                            amount,
                            commission_minor: commission,
                        },
                        _ => Fact::Ignored,
                    }
                }
                Some(pb::ledger_event::Event::CommissionPayable(payable)) => Fact::Payable {
                    purchase_id: payable.purchase_id,
                    referrer: event.referrer_merchant_id,
                    acceptor: event.acceptor_merchant_id,
                    payable_at: payable
                        .payable_at
                        .as_ref()
                        .and_then(tandem_proto::time::datetime)
                        .ok_or("CommissionPayable without payable_at")?,
                },
                Some(pb::ledger_event::Event::CommissionReversed(reversed)) => {
                    let reversal_minor = reversed.reversal.as_ref().map_or(0, |m| m.amount_minor);
                    if reversal_minor <= 0 {
                        Fact::Ignored
                    } else {
                        Fact::Reversed {
                            refund_id: reversed.refund_id,
                            purchase_id: reversed.purchase_id,
                            referrer: event.referrer_merchant_id,
                            acceptor: event.acceptor_merchant_id,
                            refund_minor: reversed.refund.as_ref().map_or(0, |m| m.amount_minor),
                            reversal_minor,
                            recorded_at: event
                                .recorded_at
                                .as_ref()
                                .and_then(tandem_proto::time::datetime)
                                .ok_or("CommissionReversed without recorded_at")?,
                        }
                    }
                }
                Some(_) => Fact::Ignored,
                None => return Err("ledger event without an event".into()),
            };
            Ok((event.event_id, fact))
        }
        other => Err(format!(
            "settlement does not consume {}",
            other.logical_name()
        )),
    }
}

async fn apply_admin(
    tx: &mut sqlx::PgConnection,
    facts: &[(String, Fact)],
) -> Result<(), SettlementError> {
    for (_, fact) in facts {
        match fact {
            Fact::Merchant {
                merchant_id,
                display_name,
                settlement_currency,
                time_zone,
            } => {
                sqlx::query(
                    "INSERT INTO merchants (merchant_id, display_name, settlement_currency, time_zone) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (merchant_id) DO NOTHING",
                )
                .bind(merchant_id)
                .bind(display_name)
                .bind(settlement_currency)
                .bind(time_zone)
                .execute(&mut *tx)
                .await?;
            }
            Fact::PayoutAccount(account, recorded_at) => {
                let registered_at = account
                    .registered_at
                    .as_ref()
                    .and_then(tandem_proto::time::datetime)
                    .unwrap_or(*recorded_at);
                sqlx::query(
                    "INSERT INTO payout_accounts (merchant_id, registered_at, iban, bic, account_holder) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&account.merchant_id)
                .bind(registered_at)
                .bind(&account.iban)
                .bind(&account.bic)
                .bind(&account.account_holder)
                .execute(&mut *tx)
                .await?;
            }
            Fact::Terms {
                partnership_id,
                version,
                referrer,
                acceptor,
                currency,
                cycle_kind,
                minimum_payout_minor,
                rule,
            } => {
                sqlx::query(
                    "INSERT INTO partnership_terms (partnership_id, terms_version, referrer_merchant_id, acceptor_merchant_id, \
                       currency, cycle_kind, minimum_payout_minor, rule) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                )
                .bind(partnership_id)
                .bind(version)
                .bind(referrer)
                .bind(acceptor)
                .bind(currency)
                .bind(cycle_kind)
                .bind(minimum_payout_minor)
                .bind(rule)
                .execute(&mut *tx)
                .await?;
            }
            _ => {}
        }
    }
    Ok(())
}

#[derive(sqlx::FromRow)]
struct StoredAttribution {
    purchase_id: String,
    #[sqlx(flatten)]
    state: Attribution,
}

/// The state of one attributed purchase, read for the batch and written back once.
#[derive(Clone, sqlx::FromRow)]
struct Attribution {
    partnership_id: String,
    terms_version: i32,
    purchase_amount_minor: i64,
    currency: String,
    commission_minor: i64,
    reversed_before_minor: i64,
    payable: bool,
    referral_id: String,
    referrer_reference: String,
    transaction_id: String,
    /// To be written back.
    #[sqlx(skip)]
    changed: bool,
}

struct NewLine {
    line_id: String,
    kind: &'static str,
    partnership_id: String,
    terms_version: i32,
    referrer: String,
    acceptor: String,
    purchase_id: String,
    refund_id: Option<String>,
    transaction_id: String,
    referral_id: String,
    referrer_reference: String,
    base_amount_minor: i64,
    amount_minor: i64,
    currency: String,
    payable_at: DateTime<Utc>,
}

async fn apply_ledger(
    tx: &mut sqlx::PgConnection,
    facts: &[(String, Fact)],
) -> Result<(), SettlementError> {
    // Every purchase the batch names, attributed ones included: an attribution announced again
    // must find the stored state, not start afresh.
    let purchase_ids: Vec<&str> = facts
        .iter()
        .filter_map(|(_, fact)| match fact {
            Fact::Attributed { purchase_id, .. }
            | Fact::Payable { purchase_id, .. }
            | Fact::Reversed { purchase_id, .. } => Some(purchase_id.as_str()),
            _ => None,
        })
        .collect();
    if purchase_ids.is_empty() {
        return Ok(());
    }
    let mut state: HashMap<String, Attribution> = sqlx::query_as::<_, StoredAttribution>(
        "SELECT purchase_id, partnership_id, terms_version, purchase_amount_minor, currency, commission_minor, \
           reversed_before_minor, payable, referral_id, referrer_reference, transaction_id \
         FROM attributions WHERE purchase_id = ANY($1)",
    )
    .bind(&purchase_ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|row| (row.purchase_id, row.state))
    .collect();
    let mut lines = Vec::new();
    let mut parked: Vec<(&str, &str, &str)> = Vec::new();
    for (message_id, fact) in facts {
        match fact {
            Fact::Attributed {
                purchase_id,
                partnership_id,
                terms_version,
                referral_id,
                referrer_reference,
                transaction_id,
                amount,
                commission_minor,
            } => {
                state.entry(purchase_id.clone()).or_insert(Attribution {
                    partnership_id: partnership_id.clone(),
                    terms_version: *terms_version,
                    purchase_amount_minor: amount.amount_minor,
                    currency: amount.currency.clone(),
                    commission_minor: *commission_minor,
                    reversed_before_minor: 0,
                    payable: false,
                    referral_id: referral_id.clone(),
                    referrer_reference: referrer_reference.clone(),
                    transaction_id: transaction_id.clone(),
                    changed: true,
                });
            }
            Fact::Payable {
                purchase_id,
                referrer,
                acceptor,
                payable_at,
            } => {
                let Some(attribution) = state.get_mut(purchase_id) else {
                    tracing::error!(%purchase_id, %message_id, "commission payable for a purchase settlement never saw attributed; parked");
                    parked.push((message_id, purchase_id, "payable before its attribution"));
                    continue;
                };
                if attribution.payable {
                    continue;
                }
                attribution.payable = true;
                attribution.changed = true;
                let amount = attribution.commission_minor - attribution.reversed_before_minor;
                if amount > 0 {
                    lines.push(NewLine {
                        line_id: format!("commission:{purchase_id}"),
                        kind: "commission",
                        partnership_id: attribution.partnership_id.clone(),
                        terms_version: attribution.terms_version,
                        referrer: referrer.clone(),
                        acceptor: acceptor.clone(),
                        purchase_id: purchase_id.clone(),
                        refund_id: None,
                        transaction_id: attribution.transaction_id.clone(),
                        referral_id: attribution.referral_id.clone(),
                        referrer_reference: attribution.referrer_reference.clone(),
                        base_amount_minor: attribution.purchase_amount_minor,
                        amount_minor: amount,
                        currency: attribution.currency.clone(),
                        payable_at: *payable_at,
                    });
                }
            }
            Fact::Reversed {
                refund_id,
                purchase_id,
                referrer,
                acceptor,
                refund_minor,
                reversal_minor,
                recorded_at,
            } => {
                let Some(attribution) = state.get_mut(purchase_id) else {
                    tracing::error!(%purchase_id, %refund_id, %message_id, "reversal for a purchase settlement never saw attributed; parked");
                    parked.push((message_id, purchase_id, "reversal before its attribution"));
                    continue;
                };
                if attribution.payable {
                    lines.push(NewLine {
                        line_id: format!("clawback:{refund_id}"),
                        kind: "clawback",
                        partnership_id: attribution.partnership_id.clone(),
                        terms_version: attribution.terms_version,
                        referrer: referrer.clone(),
                        acceptor: acceptor.clone(),
                        purchase_id: purchase_id.clone(),
                        refund_id: Some(refund_id.clone()),
                        transaction_id: attribution.transaction_id.clone(),
                        referral_id: attribution.referral_id.clone(),
                        referrer_reference: attribution.referrer_reference.clone(),
                        base_amount_minor: *refund_minor,
                        amount_minor: -reversal_minor,
                        currency: attribution.currency.clone(),
                        payable_at: *recorded_at,
                    });
                } else {
                    attribution.reversed_before_minor += reversal_minor;
                    attribution.changed = true;
                }
            }
            _ => {}
        }
    }
    let changed: Vec<(&String, &Attribution)> = state.iter().filter(|(_, a)| a.changed).collect();
    if !changed.is_empty() {
        let mut query: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO attributions (purchase_id, partnership_id, terms_version, referral_id, referrer_reference, \
               transaction_id, purchase_amount_minor, currency, commission_minor, reversed_before_minor, payable) ",
        );
        query.push_values(&changed, |mut row, (purchase_id, a)| {
            row.push_bind(*purchase_id)
                .push_bind(&a.partnership_id)
                .push_bind(a.terms_version)
                .push_bind(&a.referral_id)
                .push_bind(&a.referrer_reference)
                .push_bind(&a.transaction_id)
                .push_bind(a.purchase_amount_minor)
                .push_bind(&a.currency)
                .push_bind(a.commission_minor)
                .push_bind(a.reversed_before_minor)
                .push_bind(a.payable);
        });
        query.push(
            " ON CONFLICT (purchase_id) DO UPDATE SET reversed_before_minor = EXCLUDED.reversed_before_minor, \
               payable = EXCLUDED.payable",
        );
        query.build().execute(&mut *tx).await?;
    }
    for (message_id, purchase_id, reason) in parked {
        sqlx::query(
            "INSERT INTO parked_messages (message_id, purchase_id, reason) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(message_id)
        .bind(purchase_id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    }
    if !lines.is_empty() {
        let mut query: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO lines (line_id, kind, partnership_id, terms_version, referrer_merchant_id, acceptor_merchant_id, \
               purchase_id, refund_id, transaction_id, referral_id, referrer_reference, base_amount_minor, amount_minor, \
               currency, payable_at) ",
        );
        query.push_values(&lines, |mut row, line| {
            row.push_bind(&line.line_id)
                .push_bind(line.kind)
                .push_bind(&line.partnership_id)
                .push_bind(line.terms_version)
                .push_bind(&line.referrer)
                .push_bind(&line.acceptor)
                .push_bind(&line.purchase_id)
                .push_bind(&line.refund_id)
                .push_bind(&line.transaction_id)
                .push_bind(&line.referral_id)
                .push_bind(&line.referrer_reference)
                .push_bind(line.base_amount_minor)
                .push_bind(line.amount_minor)
                .push_bind(&line.currency)
                .push_bind(line.payable_at);
        });
        query.push(" ON CONFLICT (line_id) DO NOTHING");
        query.build().execute(&mut *tx).await?;
    }
    Ok(())
}
