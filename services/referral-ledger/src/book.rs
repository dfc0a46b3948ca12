//! Partnership streams: the commission stage's event-sourced core. Each partnership's terms
//! events and commission decisions are appended to `events` as stream `partnership-<id>`; the
//! unique `(stream_id, sequence)` is the optimistic-concurrency fence against a late writer.
//! Beside each stream, `partnership_books` holds its head and a snapshot of its core (the terms
//! events, a handful), written in the same transaction as the events, so loading a partnership
//! reads one row, never its history. [`rebuild_projections`] replays every stream into the
//! projections, key by key, in bounded memory.

// Row and column tuples here mirror the SQL statements' columns one to one.
#![allow(clippy::type_complexity)]

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::{PgConnection, PgPool};
use tandem_codec::{event_from_proto, event_to_proto};
use tandem_domain::commission::{
    record_keys_of_events, Event, Partnership, PurchaseRecord, RecordKeys, TallyKeys,
};
use tandem_domain::ids::{PartnershipId, PurchaseId};
use tandem_proto::v1 as pb;
use uuid::Uuid;

use crate::facts::{self, FactWrites, Keyed, Statements};
use crate::projection::Projection;
use crate::LedgerError;

pub fn stream_id(partnership_id: &PartnershipId) -> String {
    format!("partnership-{partnership_id}")
}

/// A partnership's core as the engine holds it: the stream head and the terms events.
#[derive(Debug, Clone, Default)]
pub struct Book {
    pub sequence: i32,
    pub core: Partnership,
    terms_events: Vec<pb::PartnershipEvent>,
    /// True once a terms event was added since the snapshot was read.
    changed: bool,
}

impl Book {
    fn from_snapshot(
        partnership_id: &PartnershipId,
        sequence: i32,
        snapshot: &[u8],
    ) -> Result<Self, LedgerError> {
        let snapshot = pb::CoreSnapshot::decode(snapshot)
            .map_err(|_| LedgerError::Invariant("undecodable core snapshot"))?;
        let mut core = Partnership::default();
        for event in &snapshot.terms_events {
            core = core.apply(&event_from_proto(event)?);
        }
        let _ = partnership_id;
        Ok(Self {
            sequence,
            core,
            terms_events: snapshot.terms_events,
            changed: false,
        })
    }

    /// Folds a terms event into the core and the snapshot.
    pub fn add_terms(&mut self, partnership_id: &PartnershipId, event: &Event) {
        self.core = std::mem::take(&mut self.core).apply(event);
        self.terms_events
            .push(event_to_proto(partnership_id, event));
        self.changed = true;
    }

    fn snapshot(&self) -> Vec<u8> {
        pb::CoreSnapshot {
            terms_events: self.terms_events.clone(),
        }
        .encode_to_vec()
    }
}

/// The heads and core snapshots of `ids` (a partnership without a row has an empty stream).
pub async fn load_books(
    connection: &mut PgConnection,
    ids: &[PartnershipId],
    statements: &mut Statements,
) -> Result<HashMap<PartnershipId, Book>, LedgerError> {
    let names: Vec<&str> = ids.iter().map(PartnershipId::as_str).collect();
    let rows: Vec<(String, i32, Vec<u8>)> = sqlx::query_as(
        "SELECT partnership_id, sequence, core FROM partnership_books WHERE partnership_id = ANY($1)",
    )
    .bind(&names)
    .fetch_all(&mut *connection)
    .await?;
    statements.add();
    let mut books = HashMap::with_capacity(ids.len());
    for (id, sequence, core) in rows {
        let id = PartnershipId::parse("partnership_id", &id)?;
        let book = Book::from_snapshot(&id, sequence, &core)?;
        books.insert(id, book);
    }
    for id in ids {
        books.entry(id.clone()).or_default();
    }
    Ok(books)
}

/// The heads, sequences only: to check a cached core is still current.
pub async fn load_heads(
    connection: &mut PgConnection,
    ids: &[PartnershipId],
    statements: &mut Statements,
) -> Result<HashMap<PartnershipId, i32>, LedgerError> {
    let names: Vec<&str> = ids.iter().map(PartnershipId::as_str).collect();
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT partnership_id, sequence FROM partnership_books WHERE partnership_id = ANY($1)",
    )
    .bind(&names)
    .fetch_all(&mut *connection)
    .await?;
    statements.add();
    rows.into_iter()
        .map(|(id, sequence)| Ok((PartnershipId::parse("partnership_id", &id)?, sequence)))
        .collect()
}

pub fn event_type(event: &Event) -> &'static str {
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

/// Events to append, for every partnership of a batch.
#[derive(Debug, Default)]
pub struct Appends {
    stream_id: Vec<String>,
    sequence: Vec<i32>,
    event_id: Vec<Uuid>,
    event_type: Vec<&'static str>,
    payload: Vec<Vec<u8>>,
    recorded_at: Vec<DateTime<Utc>>,
}

impl Appends {
    /// Appends `event` at the book's next sequence and returns that sequence.
    pub fn push(
        &mut self,
        partnership_id: &PartnershipId,
        book: &mut Book,
        event_id: Uuid,
        event: &Event,
        recorded_at: DateTime<Utc>,
    ) -> i32 {
        book.sequence += 1;
        self.stream_id.push(stream_id(partnership_id));
        self.sequence.push(book.sequence);
        self.event_id.push(event_id);
        self.event_type.push(event_type(event));
        self.payload
            .push(event_to_proto(partnership_id, event).encode_to_vec());
        self.recorded_at.push(recorded_at);
        book.sequence
    }

    pub fn len(&self) -> usize {
        self.sequence.len()
    }

    /// One statement. A sequence another writer took first violates the unique key: the batch
    /// fails with a conflict, and is retried from fresh state.
    pub async fn write(
        self,
        connection: &mut PgConnection,
        statements: &mut Statements,
    ) -> Result<(), LedgerError> {
        if self.sequence.is_empty() {
            return Ok(());
        }
        let first = self.stream_id.first().cloned().unwrap_or_default();
        let result = sqlx::query(
            "INSERT INTO events (stream_id, sequence, event_id, event_type, payload, recorded_at) \
             SELECT * FROM UNNEST($1::text[], $2::int[], $3::uuid[], $4::text[], $5::bytea[], $6::timestamptz[])",
        )
        .bind(self.stream_id)
        .bind(self.sequence)
        .bind(self.event_id)
        .bind(self.event_type)
        .bind(self.payload)
        .bind(self.recorded_at)
        .execute(&mut *connection)
        .await;
        statements.add();
        match result {
            Ok(_) => Ok(()),
            Err(error) if tandem_store::is_unique_violation(&error) => {
                Err(LedgerError::Store(tandem_store::StoreError::Conflict {
                    stream_id: first,
                    expected: 0,
                }))
            }
            Err(error) => Err(error.into()),
        }
    }
}

/// Writes the heads of `books` (and the core snapshots that changed): one statement.
pub async fn save_books<'a>(
    connection: &mut PgConnection,
    books: impl IntoIterator<Item = (&'a PartnershipId, &'a Book)>,
    statements: &mut Statements,
) -> Result<(), LedgerError> {
    let (mut ids, mut sequences, mut referrers, mut acceptors, mut cores) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, book) in books {
        ids.push(id.to_string());
        sequences.push(book.sequence);
        let parties = book.core.parties();
        referrers.push(parties.map(|(r, _)| r.to_string()));
        acceptors.push(parties.map(|(_, a)| a.to_string()));
        cores.push(book.changed.then(|| book.snapshot()));
    }
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO partnership_books (partnership_id, sequence, referrer_merchant_id, acceptor_merchant_id, core) \
         SELECT k.id, k.sequence, k.referrer, k.acceptor, coalesce(k.core, '\\x'::bytea) \
         FROM UNNEST($1::text[], $2::int[], $3::text[], $4::text[], $5::bytea[]) AS k(id, sequence, referrer, acceptor, core) \
         ON CONFLICT (partnership_id) DO UPDATE SET sequence = EXCLUDED.sequence, \
         referrer_merchant_id = EXCLUDED.referrer_merchant_id, acceptor_merchant_id = EXCLUDED.acceptor_merchant_id, \
         core = CASE WHEN EXCLUDED.core = '\\x'::bytea THEN partnership_books.core ELSE EXCLUDED.core END",
    )
    .bind(ids)
    .bind(sequences)
    .bind(referrers)
    .bind(acceptors)
    .bind(cores)
    .execute(&mut *connection)
    .await?;
    statements.add();
    Ok(())
}

impl Book {
    /// Marks the snapshot as written.
    pub fn saved(&mut self) {
        self.changed = false;
    }
}

/// Loads the keyed facts `events` (per partnership) touch, folds the events and collects the
/// projection rows and fact writes. Shared by the live engine (for decided events, through
/// [`crate::commissions`]) and by [`rebuild_projections`].
async fn project_stream_chunk(
    connection: &mut PgConnection,
    chunk: Vec<(PartnershipId, Vec<(i32, Event, DateTime<Utc>)>)>,
    books: &mut HashMap<PartnershipId, Book>,
    statements: &mut Statements,
) -> Result<(), LedgerError> {
    let record_keys: Keyed<RecordKeys> = chunk
        .iter()
        .map(|(id, events)| {
            (
                id.clone(),
                record_keys_of_events(events.iter().map(|(_, e, _)| e)),
            )
        })
        .collect();
    let mut loaded = facts::load_records(connection, &record_keys, statements).await?;
    let tally_keys: Keyed<TallyKeys> = chunk
        .iter()
        .map(|(id, events)| {
            let records: std::collections::BTreeMap<PurchaseId, PurchaseRecord> = loaded
                .get(id)
                .map(|f| f.purchases.clone())
                .unwrap_or_default();
            (
                id.clone(),
                Partnership::tally_keys_of_events(events.iter().map(|(_, e, _)| e), &records),
            )
        })
        .collect();
    facts::load_tallies(connection, &tally_keys, &mut loaded, statements).await?;
    let mut projection = Projection::default();
    let mut writes = FactWrites::default();
    for (id, events) in chunk {
        let book = books.entry(id.clone()).or_default();
        let before = loaded.remove(&id).unwrap_or_default();
        let mut state = book.core.clone().with_facts(before.clone());
        for (sequence, event, recorded_at) in &events {
            projection.add(&id, &state, event, *sequence, *recorded_at, &[])?;
            if Partnership::changes_core(event) {
                book.add_terms(&id, event);
            }
            state = state.apply(event);
            book.sequence = *sequence;
        }
        let named: BTreeSet<PurchaseId> = record_keys
            .get(&id)
            .map(|k| k.purchases.clone())
            .unwrap_or_default();
        writes.diff(&id, &before, state.facts(), &named);
    }
    projection.write(connection, false, statements).await?;
    writes.write(connection, statements).await?;
    Ok(())
}

/// Drops the commission stage's projections and rebuilds them by replaying every partnership
/// stream from the event table, in one transaction, a chunk of events at a time (memory is
/// bounded by the chunk and the partnerships' cores, not by the history). The payable timers are
/// a delivery queue, not a projection, and are left alone. Returns the events replayed.
pub async fn rebuild_projections(pool: &PgPool) -> Result<u64, LedgerError> {
    const CHUNK: i64 = 5_000;
    let mut tx = pool.begin().await?;
    sqlx::query(
        "TRUNCATE ledger_postings, ledger_entries, commissions, customer_tallies, period_tallies, \
         partnership_refunds, parked_refunds, partnership_books, partnership_versions, partnerships CASCADE",
    )
    .execute(&mut *tx)
    .await?;
    let mut books: HashMap<PartnershipId, Book> = HashMap::new();
    let mut statements = Statements::default();
    let mut after = (String::new(), 0i32);
    let mut replayed = 0u64;
    loop {
        let rows: Vec<(String, i32, Vec<u8>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT stream_id, sequence, payload, recorded_at FROM events \
             WHERE stream_id LIKE 'partnership-%' AND (stream_id, sequence) > ($1, $2) \
             ORDER BY stream_id, sequence LIMIT $3",
        )
        .bind(&after.0)
        .bind(after.1)
        .bind(CHUNK)
        .fetch_all(&mut *tx)
        .await?;
        let Some((last_stream, last_sequence, _, _)) = rows.last() else {
            break;
        };
        after = (last_stream.clone(), *last_sequence);
        replayed += rows.len() as u64;
        let mut chunk: Vec<(PartnershipId, Vec<(i32, Event, DateTime<Utc>)>)> = Vec::new();
        for (stream, sequence, payload, recorded_at) in rows {
            let id = stream.strip_prefix("partnership-").unwrap_or_default();
            let id = PartnershipId::parse("stream_id", id)?;
            let event = pb::PartnershipEvent::decode(payload.as_slice())
                .map_err(|_| LedgerError::Invariant("undecodable partnership event"))?;
            let event = event_from_proto(&event)?;
            match chunk.last_mut() {
                Some((last, events)) if *last == id => events.push((sequence, event, recorded_at)),
                _ => chunk.push((id, vec![(sequence, event, recorded_at)])),
            }
        }
        let ids: Vec<PartnershipId> = chunk.iter().map(|(id, _)| id.clone()).collect();
        project_stream_chunk(&mut tx, chunk, &mut books, &mut statements).await?;
        save_books(
            &mut tx,
            ids.iter().filter_map(|id| books.get(id).map(|b| (id, b))),
            &mut statements,
        )
        .await?;
        for id in &ids {
            if let Some(book) = books.get_mut(id) {
                book.saved();
            }
        }
    }
    tx.commit().await?;
    Ok(replayed)
}
