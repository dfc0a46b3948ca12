//! Partnership streams: the ledger's event-sourced core. Each partnership's terms events (copied
//! from the admin topic) and commission decisions are appended to `events` as stream
//! `partnership-<id>` with optimistic concurrency; every appended event is projected, in the same
//! transaction, into `partnerships`, `partnership_versions`, `commissions` and the double-entry
//! `ledger_entries`/`ledger_postings`. [`rebuild_projections`] drops those and replays the
//! streams: the result equals the live projections.

use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::{PgConnection, PgPool};
use tandem_codec::{
    calculation_to_proto, event_from_proto, event_to_proto, reason_to_proto, terms_to_proto,
};
use tandem_domain::commission::{decide, Command, Event, Partnership, PartnershipError};
use tandem_domain::ids::PartnershipId;
use tandem_domain::ledger::Entry;
use tandem_proto::v1 as pb;
use tandem_store::NewEvent;
use uuid::Uuid;

use crate::LedgerError;

pub fn stream_id(partnership_id: &PartnershipId) -> String {
    format!("partnership-{partnership_id}")
}

/// A partnership as stored: its state and how many events its stream holds.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub partnership_id: PartnershipId,
    pub state: Partnership,
    pub sequence: i32,
}

/// The partnerships one batch has loaded, kept current as the batch appends to them, so that a
/// batch replays each stream once. Scoped to one transaction: if another ledger instance
/// appends meanwhile, the append conflicts and the whole batch is retried with a fresh cache.
#[derive(Debug, Default)]
pub struct Books {
    loaded: std::collections::HashMap<PartnershipId, Loaded>,
}

impl Books {
    pub async fn get(
        &mut self,
        connection: &mut PgConnection,
        partnership_id: &PartnershipId,
    ) -> Result<&mut Loaded, LedgerError> {
        if !self.loaded.contains_key(partnership_id) {
            let loaded = load(connection, partnership_id).await?;
            self.loaded.insert(partnership_id.clone(), loaded);
        }
        self.loaded
            .get_mut(partnership_id)
            .ok_or(LedgerError::Invariant(
                "partnership vanished from the batch cache",
            ))
    }
}

/// Loads a partnership by replaying its stream.
pub async fn load(
    connection: &mut PgConnection,
    partnership_id: &PartnershipId,
) -> Result<Loaded, LedgerError> {
    let payloads: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM events WHERE stream_id = $1 ORDER BY sequence")
            .bind(stream_id(partnership_id))
            .fetch_all(&mut *connection)
            .await?;
    let mut state = Partnership::default();
    for payload in &payloads {
        state = state.apply(&decode(payload)?);
    }
    Ok(Loaded {
        partnership_id: partnership_id.clone(),
        state,
        sequence: i32::try_from(payloads.len()).unwrap_or(i32::MAX),
    })
}

fn decode(payload: &[u8]) -> Result<Event, LedgerError> {
    let event = pb::PartnershipEvent::decode(payload)
        .map_err(|_| LedgerError::Invariant("undecodable partnership event"))?;
    Ok(event_from_proto(&event)?)
}

fn event_type(event: &Event) -> &'static str {
    match event {
        Event::TermsProposed { .. } => "TermsProposed",
        Event::TermsAccepted { .. } => "TermsAccepted",
        Event::Terminated { .. } => "Terminated",
        Event::CommissionAccrued { .. } => "CommissionAccrued",
        Event::CommissionNotEarned { .. } => "CommissionNotEarned",
        Event::RefundApplied { .. } => "RefundApplied",
        Event::RefundParked { .. } => "RefundParked",
    }
}

/// Decides `command` against the partnership and records what it decided. A refusal by the
/// domain is returned as `Ok(Err(..))`: it is an answer, not a failure to retry.
pub async fn decide_and_record(
    connection: &mut PgConnection,
    loaded: &mut Loaded,
    command: Command,
    recorded_at: DateTime<Utc>,
) -> Result<Result<Vec<Event>, PartnershipError>, LedgerError> {
    let events = match decide(&loaded.state, command) {
        Ok(events) => events,
        Err(refused) => return Ok(Err(refused)),
    };
    let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
    record(connection, loaded, &events, &ids, recorded_at).await?;
    Ok(Ok(events))
}

/// Appends `events` (with their ids) to the stream and projects them.
pub async fn record(
    connection: &mut PgConnection,
    loaded: &mut Loaded,
    events: &[Event],
    event_ids: &[Uuid],
    recorded_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    let stored: Vec<NewEvent> = events
        .iter()
        .zip(event_ids)
        .map(|(event, id)| NewEvent {
            event_id: *id,
            event_type: event_type(event),
            payload: event_to_proto(&loaded.partnership_id, event).encode_to_vec(),
            recorded_at,
        })
        .collect();
    tandem_store::append_events(
        connection,
        &stream_id(&loaded.partnership_id),
        loaded.sequence,
        &stored,
    )
    .await?;
    for event in events {
        let entry = loaded.state.ledger_entry(event)?;
        loaded.state = std::mem::take(&mut loaded.state).apply(event);
        project(
            connection,
            &loaded.partnership_id,
            &loaded.state,
            event,
            entry.as_ref(),
            recorded_at,
        )
        .await?;
    }
    loaded.sequence += i32::try_from(events.len()).unwrap_or(i32::MAX);
    Ok(())
}

/// Updates the projections for one event; `state` is the partnership after it.
async fn project(
    connection: &mut PgConnection,
    partnership_id: &PartnershipId,
    state: &Partnership,
    event: &Event,
    entry: Option<&Entry>,
    recorded_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    let id = partnership_id.as_str();
    match event {
        Event::TermsProposed {
            version,
            referrer,
            acceptor,
            proposed_by,
            terms,
            effective_from,
        } => {
            sqlx::query(
                "INSERT INTO partnerships (partnership_id, referrer_merchant_id, acceptor_merchant_id) VALUES ($1, $2, $3) \
                 ON CONFLICT (partnership_id) DO NOTHING",
            )
            .bind(id)
            .bind(referrer.as_str())
            .bind(acceptor.as_str())
            .execute(&mut *connection)
            .await?;
            sqlx::query(
                "INSERT INTO partnership_versions (partnership_id, version, proposed_by, terms, effective_from) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(i32::try_from(*version).unwrap_or(i32::MAX))
            .bind(proposed_by.as_str())
            .bind(terms_to_proto(terms).encode_to_vec())
            .bind(effective_from)
            .execute(&mut *connection)
            .await?;
        }
        Event::TermsAccepted {
            version,
            accepted_by,
            effective_from,
        } => {
            sqlx::query("UPDATE partnership_versions SET accepted_by = $3, effective_from = $4 WHERE partnership_id = $1 AND version = $2")
                .bind(id)
                .bind(i32::try_from(*version).unwrap_or(i32::MAX))
                .bind(accepted_by.as_str())
                .bind(effective_from)
                .execute(&mut *connection)
                .await?;
        }
        Event::Terminated { at, .. } => {
            sqlx::query("UPDATE partnerships SET terminated_at = $2 WHERE partnership_id = $1")
                .bind(id)
                .bind(at)
                .execute(&mut *connection)
                .await?;
        }
        Event::CommissionAccrued {
            purchase_id,
            referral_id,
            terms_version,
            amount,
            commission,
            calculation,
            purchased_at,
            period_start,
            payable_at,
        } => {
            let (referrer, acceptor) = state.parties().ok_or(LedgerError::Invariant(
                "commission on a partnership without parties",
            ))?;
            insert_line(
                connection,
                id,
                purchase_id.as_str(),
                referral_id.as_str(),
                (referrer.as_str(), acceptor.as_str()),
                *terms_version,
                calculation.rule,
                *amount,
                commission.amount_minor,
                *purchased_at,
                Some(*period_start),
                *payable_at,
                None,
                Some(calculation_to_proto(calculation).encode_to_vec()),
                recorded_at,
            )
            .await?;
            if let Some(entry) = entry {
                post(
                    connection,
                    id,
                    &format!("accrual/{purchase_id}"),
                    "commission_accrual",
                    purchase_id.as_str(),
                    *payable_at,
                    entry,
                    recorded_at,
                )
                .await?;
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
            let (referrer, acceptor) = state.parties().ok_or(LedgerError::Invariant(
                "commission on a partnership without parties",
            ))?;
            let rule = terms_version
                .and_then(|v| state.versions().iter().find(|t| t.version == v))
                .map_or("none", |v| v.terms.rule.name());
            insert_line(
                connection,
                id,
                purchase_id.as_str(),
                referral_id.as_str(),
                (referrer.as_str(), acceptor.as_str()),
                terms_version.unwrap_or(0),
                rule,
                *amount,
                0,
                *purchased_at,
                None,
                *purchased_at,
                Some(reason_to_proto(reason).0),
                None,
                recorded_at,
            )
            .await?;
        }
        Event::RefundApplied {
            refund_id,
            purchase_id,
            refund,
            reversal,
            refunded_at,
            within_holding_period,
        } => {
            let payable_at: Option<DateTime<Utc>> = sqlx::query_scalar(
                "UPDATE commissions SET refunded_minor = refunded_minor + $2, reversed_minor = reversed_minor + $3 \
                 WHERE purchase_id = $1 RETURNING payable_at",
            )
            .bind(purchase_id.as_str())
            .bind(refund.amount_minor)
            .bind(reversal.amount_minor)
            .fetch_optional(&mut *connection)
            .await?;
            if let Some(entry) = entry {
                // A reversal inside the holding period reduces what is accrued; after it, what
                // is payable.
                let effective = if *within_holding_period {
                    payable_at.unwrap_or(*refunded_at)
                } else {
                    *refunded_at
                };
                post(
                    connection,
                    id,
                    &format!("reversal/{refund_id}"),
                    "commission_reversal",
                    purchase_id.as_str(),
                    effective,
                    entry,
                    recorded_at,
                )
                .await?;
            }
        }
        Event::RefundParked { .. } => {}
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn insert_line(
    connection: &mut PgConnection,
    partnership_id: &str,
    purchase_id: &str,
    referral_id: &str,
    (referrer, acceptor): (&str, &str),
    terms_version: u32,
    rule: &str,
    amount: tandem_domain::money::Money,
    commission_minor: i64,
    purchased_at: DateTime<Utc>,
    period_start: Option<DateTime<Utc>>,
    payable_at: DateTime<Utc>,
    not_earned_reason: Option<&str>,
    calculation: Option<Vec<u8>>,
    recorded_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO commissions (purchase_id, partnership_id, referral_id, referrer_merchant_id, acceptor_merchant_id, \
         terms_version, rule, amount_minor, currency, commission_minor, purchased_at, period_start, payable_at, \
         not_earned_reason, calculation, recorded_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(purchase_id)
    .bind(partnership_id)
    .bind(referral_id)
    .bind(referrer)
    .bind(acceptor)
    .bind(i32::try_from(terms_version).unwrap_or(i32::MAX))
    .bind(rule)
    .bind(amount.amount_minor)
    .bind(amount.currency.as_str())
    .bind(commission_minor)
    .bind(purchased_at)
    .bind(period_start)
    .bind(payable_at)
    .bind(not_earned_reason)
    .bind(calculation)
    .bind(recorded_at)
    .execute(connection)
    .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn post(
    connection: &mut PgConnection,
    partnership_id: &str,
    entry_id: &str,
    kind: &str,
    purchase_id: &str,
    payable_at: DateTime<Utc>,
    entry: &Entry,
    recorded_at: DateTime<Utc>,
) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO ledger_entries (entry_id, partnership_id, kind, purchase_id, currency, payable_at, recorded_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(entry_id)
    .bind(partnership_id)
    .bind(kind)
    .bind(purchase_id)
    .bind(entry.currency().as_str())
    .bind(payable_at)
    .bind(recorded_at)
    .execute(&mut *connection)
    .await?;
    for posting in entry.postings() {
        sqlx::query("INSERT INTO ledger_postings (entry_id, account, merchant_id, currency, amount_minor) VALUES ($1, $2, $3, $4, $5)")
            .bind(entry_id)
            .bind(posting.account.as_str())
            .bind(posting.merchant.as_str())
            .bind(entry.currency().as_str())
            .bind(posting.amount_minor)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

/// Drops the projections of the partnership streams and rebuilds them by replaying every stream
/// from the event table, in one transaction.
pub async fn rebuild_projections(pool: &PgPool) -> Result<u64, LedgerError> {
    let mut tx = pool.begin().await?;
    sqlx::query("TRUNCATE ledger_postings, ledger_entries, commissions, partnership_versions, partnerships CASCADE")
        .execute(&mut *tx)
        .await?;
    let rows: Vec<(String, Vec<u8>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT stream_id, payload, recorded_at FROM events WHERE stream_id LIKE 'partnership-%' ORDER BY stream_id, sequence",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut current: Option<(String, PartnershipId, Partnership)> = None;
    let mut replayed = 0u64;
    for (stream, payload, recorded_at) in rows {
        if current.as_ref().is_none_or(|(name, _, _)| *name != stream) {
            let id = stream.strip_prefix("partnership-").unwrap_or_default();
            let partnership_id = PartnershipId::parse("stream_id", id)?;
            current = Some((stream.clone(), partnership_id, Partnership::default()));
        }
        let Some((_, partnership_id, state)) = current.as_mut() else {
            continue;
        };
        let event = decode(&payload)?;
        let entry = state.ledger_entry(&event)?;
        *state = std::mem::take(state).apply(&event);
        project(
            &mut tx,
            partnership_id,
            state,
            &event,
            entry.as_ref(),
            recorded_at,
        )
        .await?;
        replayed += 1;
    }
    tx.commit().await?;
    Ok(replayed)
}
