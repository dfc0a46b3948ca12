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

    /// Drops a partnership whose terms changed in this batch.
    pub fn forget(&mut self, partnership_id: &PartnershipId) {
        self.cores.remove(partnership_id);
    }
}

type VersionRow = (i32, String, Vec<u8>, DateTime<Utc>, Option<String>);

async fn load(
    connection: &mut PgConnection,
    partnership_id: &PartnershipId,
) -> Result<Partnership, LedgerError> {
    let parties: Option<(String, String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT referrer_merchant_id, acceptor_merchant_id, terminated_at FROM partnerships WHERE partnership_id = $1",
    )
    .bind(partnership_id.as_str())
    .fetch_optional(&mut *connection)
    .await?;
    let Some((referrer, acceptor, terminated_at)) = parties else {
        return Ok(Partnership::default());
    };
    let referrer = MerchantId::parse("referrer_merchant_id", &referrer)?;
    let acceptor = MerchantId::parse("acceptor_merchant_id", &acceptor)?;
    let versions: Vec<VersionRow> = sqlx::query_as(
        "SELECT version, proposed_by, terms, effective_from, accepted_by FROM partnership_versions \
         WHERE partnership_id = $1 ORDER BY version",
    )
    .bind(partnership_id.as_str())
    .fetch_all(&mut *connection)
    .await?;
    let mut core = Partnership::default();
    for (version, proposed_by, terms, effective_from, accepted_by) in versions {
        let version =
            u32::try_from(version).map_err(|_| LedgerError::Invariant("negative terms version"))?;
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
    Ok(core)
}
