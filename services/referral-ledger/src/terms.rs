//! The attribution stage's view of partnerships' terms (touch policy, automatic referrals,
//! termination), read from the terms projection it keeps from the admin topic: a few rows per
//! partnership, cached for one batch.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::PgConnection;
use tandem_codec::terms_from_proto;
use tandem_domain::commission::{Event, Partnership};
use tandem_domain::ids::{MerchantId, PartnershipId};
use tandem_proto::v1 as pb;

use crate::LedgerError;

#[derive(Debug, Default)]
pub struct TermsCache {
    cores: HashMap<PartnershipId, Partnership>,
}

impl TermsCache {
    /// The partnership's core (parties, versions, termination) as projected so far.
    pub async fn get(
        &mut self,
        connection: &mut PgConnection,
        partnership_id: &PartnershipId,
    ) -> Result<&Partnership, LedgerError> {
        if !self.cores.contains_key(partnership_id) {
            let core = load(connection, partnership_id).await?;
            self.cores.insert(partnership_id.clone(), core);
        }
        self.cores.get(partnership_id).ok_or(LedgerError::Invariant(
            "partnership vanished from the terms cache",
        ))
    }

    /// Loads, in two statements, every partnership of `ids` not cached yet: a batch that touches
    /// many partnerships reads their terms at once instead of one partnership at a time.
    pub async fn prefetch(
        &mut self,
        connection: &mut PgConnection,
        ids: impl IntoIterator<Item = &PartnershipId>,
    ) -> Result<(), LedgerError> {
        let mut missing: Vec<String> = ids
            .into_iter()
            .filter(|id| !self.cores.contains_key(*id))
            .map(|id| id.as_str().to_owned())
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let mut loaded = load_many(connection, &missing).await?;
        for id in missing {
            let id = PartnershipId::parse("partnership_id", &id)?;
            let core = loaded.remove(&id).unwrap_or_default();
            self.cores.insert(id, core);
        }
        Ok(())
    }

    /// Drops a partnership whose terms changed in this batch.
    pub fn forget(&mut self, partnership_id: &PartnershipId) {
        self.cores.remove(partnership_id);
    }
}

type VersionRow = (String, i32, String, Vec<u8>, DateTime<Utc>, Option<String>);

async fn load(
    connection: &mut PgConnection,
    partnership_id: &PartnershipId,
) -> Result<Partnership, LedgerError> {
    let mut loaded = load_many(connection, &[partnership_id.as_str().to_owned()]).await?;
    Ok(loaded.remove(partnership_id).unwrap_or_default())
}

/// The cores of `ids` that exist; an unknown partnership is absent from the map.
async fn load_many(
    connection: &mut PgConnection,
    ids: &[String],
) -> Result<HashMap<PartnershipId, Partnership>, LedgerError> {
    let parties: Vec<(String, String, String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT partnership_id, referrer_merchant_id, acceptor_merchant_id, terminated_at FROM partnerships \
         WHERE partnership_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *connection)
    .await?;
    let versions: Vec<VersionRow> = sqlx::query_as(
        "SELECT partnership_id, version, proposed_by, terms, effective_from, accepted_by FROM partnership_versions \
         WHERE partnership_id = ANY($1) ORDER BY partnership_id, version",
    )
    .bind(ids)
    .fetch_all(&mut *connection)
    .await?;
    let mut versions_of: HashMap<String, Vec<VersionRow>> = HashMap::new();
    for row in versions {
        versions_of.entry(row.0.clone()).or_default().push(row);
    }
    let mut cores = HashMap::with_capacity(parties.len());
    for (partnership_id, referrer, acceptor, terminated_at) in parties {
        let referrer = MerchantId::parse("referrer_merchant_id", &referrer)?;
        let acceptor = MerchantId::parse("acceptor_merchant_id", &acceptor)?;
        let mut core = Partnership::default();
        for (_, version, proposed_by, terms, effective_from, accepted_by) in
            versions_of.remove(&partnership_id).unwrap_or_default()
        {
            let version = u32::try_from(version)
                .map_err(|_| LedgerError::Invariant("negative terms version"))?;
            let terms = pb::Terms::decode(terms.as_slice())
                .map_err(|_| LedgerError::Invariant("undecodable terms"))?;
            core = core.apply(&Event::TermsProposed {
                version,
                referrer: referrer.clone(),
                acceptor: acceptor.clone(),
                proposed_by: MerchantId::parse("proposed_by", &proposed_by)?,
                terms: terms_from_proto(&terms)?,
                effective_from,
            });
            if let Some(accepted_by) = accepted_by {
                core = core.apply(&Event::TermsAccepted {
                    version,
                    accepted_by: MerchantId::parse("accepted_by", &accepted_by)?,
                    effective_from,
                });
            }
        }
        if let Some(at) = terminated_at {
            core = core.apply(&Event::Terminated { by: referrer, at });
        }
        cores.insert(
            PartnershipId::parse("partnership_id", &partnership_id)?,
            core,
        );
    }
    Ok(cores)
}
