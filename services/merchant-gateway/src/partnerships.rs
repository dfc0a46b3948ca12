//! The `tandem.v1.PartnershipService`: partnerships between merchants, with versioned terms that
//! both parties must agree to. The partnership aggregate (`tandem_domain::commission`) decides;
//! its terms events are stored in the partnership's stream here and published on the admin topic,
//! where the referral ledger picks them up.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use prost::Message;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use tandem_codec::{
    admin_payload, partnership_event_from_payload, terms_from_proto, terms_to_proto,
};
use tandem_domain::commission::{decide, Command, Event, Partnership};
use tandem_domain::ids::{MerchantId, PartnershipId};
use tandem_domain::partnership::{check_not_self_referral, Terms};
use tandem_domain::text::parse_token;
use tandem_domain::ValidationError;
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tandem_proto::v1::partnership_service_server::PartnershipService;
use tonic::{Request, Response, Status};

use crate::auth::authenticate_merchant;
use crate::commands::MAX_CLOCK_SKEW;
use crate::events::{load_stream, record_events};
use crate::identifiers::{captures_of, require_overlap};
use crate::{idempotency, GatewayError, State};
use tandem_codec::identifiers::captures_to_proto;

pub struct PartnershipApi {
    pub state: Arc<State>,
}

pub fn stream_id(partnership_id: &PartnershipId) -> String {
    format!("partnership-{partnership_id}")
}

/// The partnership's state and the number of events in its stream.
pub async fn load_partnership(
    connection: &mut PgConnection,
    partnership_id: &PartnershipId,
) -> Result<(Partnership, i32), GatewayError> {
    let payloads = load_stream(connection, &stream_id(partnership_id)).await?;
    let mut state = Partnership::default();
    for payload in &payloads {
        match partnership_event_from_payload(payload) {
            Some(Ok((_, event))) => state = state.apply(&event),
            Some(Err(_)) | None => {
                return Err(GatewayError::CorruptEvent(stream_id(partnership_id)))
            }
        }
    }
    Ok((state, i32::try_from(payloads.len()).unwrap_or(i32::MAX)))
}

/// Decides `commands` in turn against the partnership and records the resulting events.
pub async fn decide_and_record(
    connection: &mut PgConnection,
    partnership_id: &PartnershipId,
    mut state: Partnership,
    sequence: i32,
    commands: Vec<Command>,
    now: DateTime<Utc>,
) -> Result<(Partnership, Vec<Event>), GatewayError> {
    let mut events = Vec::new();
    for command in commands {
        for event in decide(&state, command)? {
            state = state.apply(&event);
            events.push(event);
        }
    }
    let payloads = events
        .iter()
        .filter_map(|event| admin_payload(partnership_id, event))
        .collect();
    record_events(
        connection,
        &stream_id(partnership_id),
        sequence,
        payloads,
        now,
    )
    .await?;
    Ok((state, events))
}

/// Registers the merchant pair of a new partnership; one partnership per direction.
pub async fn register_pair(
    connection: &mut PgConnection,
    partnership_id: &PartnershipId,
    referrer: &MerchantId,
    acceptor: &MerchantId,
) -> Result<(), GatewayError> {
    for (field, merchant) in [("referrer", referrer), ("acceptor", acceptor)] {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM merchants WHERE merchant_id = $1)")
                .bind(merchant.as_str())
                .fetch_one(&mut *connection)
                .await?;
        if !exists {
            return Err(GatewayError::FailedPrecondition(format!(
                "the {field} {merchant} is not a registered merchant"
            )));
        }
    }
    let existing: Option<String> = sqlx::query_scalar(
        "INSERT INTO partnerships (partnership_id, referrer_merchant_id, acceptor_merchant_id) VALUES ($1, $2, $3) \
         ON CONFLICT (referrer_merchant_id, acceptor_merchant_id) DO NOTHING RETURNING partnership_id",
    )
    .bind(partnership_id.as_str())
    .bind(referrer.as_str())
    .bind(acceptor.as_str())
    .fetch_optional(&mut *connection)
    .await?;
    if existing.is_none() {
        let id: String = sqlx::query_scalar("SELECT partnership_id FROM partnerships WHERE referrer_merchant_id = $1 AND acceptor_merchant_id = $2")
            .bind(referrer.as_str())
            .bind(acceptor.as_str())
            .fetch_one(&mut *connection)
            .await?;
        return Err(GatewayError::AlreadyExists(format!(
            "a partnership from {referrer} to {acceptor} already exists ({id}); propose an amendment to it"
        )));
    }
    Ok(())
}

/// The partnership from `referrer` to `acceptor`, if there is one.
pub async fn find_by_pair(
    connection: &mut PgConnection,
    referrer: &MerchantId,
    acceptor: &MerchantId,
) -> Result<Option<PartnershipId>, GatewayError> {
    let id: Option<String> = sqlx::query_scalar(
        "SELECT partnership_id FROM partnerships WHERE referrer_merchant_id = $1 AND acceptor_merchant_id = $2",
    )
    .bind(referrer.as_str())
    .bind(acceptor.as_str())
    .fetch_optional(connection)
    .await?;
    id.map(|id| PartnershipId::parse("partnership_id", &id).map_err(GatewayError::from))
        .transpose()
}

pub(crate) fn fingerprint<M: Message>(operation: &str, message: &M) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(operation.as_bytes());
    hasher.update(message.encode_to_vec());
    hasher.finalize().to_vec()
}

fn version_to_proto(version: &tandem_domain::commission::TermsVersion) -> pb::TermsVersion {
    pb::TermsVersion {
        version: version.version,
        proposed_by: version.proposed_by.to_string(),
        terms: Some(terms_to_proto(&version.terms)),
        effective_from: Some(timestamp(version.effective_from)),
        accepted_by: version
            .accepted_by
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl PartnershipService for PartnershipApi {
    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, partnership_id))]
    async fn propose_terms(
        &self,
        request: Request<pb::ProposeTermsRequest>,
    ) -> Result<Response<pb::ProposeTermsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.propose(request).await?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, partnership_id = %tandem_domain::text::loggable_id(&request.get_ref().partnership_id)))]
    async fn accept_terms(
        &self,
        request: Request<pb::AcceptTermsRequest>,
    ) -> Result<Response<pb::AcceptTermsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.accept(request).await?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, partnership_id = %tandem_domain::text::loggable_id(&request.get_ref().partnership_id)))]
    async fn terminate_partnership(
        &self,
        request: Request<pb::TerminatePartnershipRequest>,
    ) -> Result<Response<pb::TerminatePartnershipResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.terminate(request).await?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, partnership_id = %tandem_domain::text::loggable_id(&request.get_ref().partnership_id)))]
    async fn get_partnership(
        &self,
        request: Request<pb::GetPartnershipRequest>,
    ) -> Result<Response<pb::Partnership>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.get(request).await?))
    }
}

impl PartnershipApi {
    async fn propose(
        &self,
        request: Request<pb::ProposeTermsRequest>,
    ) -> Result<pb::ProposeTermsResponse, GatewayError> {
        let merchant = authenticate_merchant(&self.state.pool, request.metadata()).await?;
        let span = tracing::Span::current();
        span.record("merchant_id", merchant.as_str());
        let request = request.into_inner();
        let idempotency_key = parse_token("idempotency_key", &request.idempotency_key, 1, 128)?;
        let terms: Terms = terms_from_proto(
            request
                .terms
                .as_ref()
                .ok_or_else(|| ValidationError::new("terms", "is required"))?,
        )?;
        let now = tandem_proto::time::truncate_to_micros(Utc::now());
        let effective_from = match request.effective_from.as_ref() {
            None => now,
            Some(sent) => {
                let instant = tandem_proto::time::datetime(sent).ok_or_else(|| {
                    ValidationError::new("effective_from", "is not a valid timestamp")
                })?;
                if instant < now - MAX_CLOCK_SKEW {
                    return Err(ValidationError::new(
                        "effective_from",
                        "is in the past; terms never apply retroactively",
                    )
                    .into());
                }
                instant.max(now)
            }
        };
        let fingerprint = fingerprint("ProposeTerms", &request);

        let scope = idempotency::Scope {
            owner: merchant.as_str(),
            key: &idempotency_key,
            operation: "ProposeTerms",
            fingerprint: &fingerprint,
        };
        let mut tx = match idempotency::start(&self.state.pool, &scope).await? {
            idempotency::Begun::Replayed(response) => return Ok(response),
            idempotency::Begun::Fresh(tx) => tx,
        };
        let (partnership_id, state, sequence, referrer, acceptor) = if request
            .partnership_id
            .is_empty()
        {
            let counterparty = MerchantId::parse(
                "counterparty_merchant_id",
                &request.counterparty_merchant_id,
            )?;
            let (referrer, acceptor) = match pb::PartnershipRole::try_from(request.caller_role) {
                Ok(pb::PartnershipRole::Referrer) => (merchant.clone(), counterparty),
                Ok(pb::PartnershipRole::Acceptor) => (counterparty, merchant.clone()),
                _ => {
                    return Err(ValidationError::new(
                        "caller_role",
                        "must be REFERRER or ACCEPTOR for a new partnership",
                    )
                    .into())
                }
            };
            check_not_self_referral(&referrer, &acceptor).map_err(|_| {
                ValidationError::new("counterparty_merchant_id", "must be another merchant")
            })?;
            let partnership_id = PartnershipId::generate();
            register_pair(&mut tx, &partnership_id, &referrer, &acceptor).await?;
            (
                partnership_id,
                Partnership::default(),
                0,
                referrer,
                acceptor,
            )
        } else {
            let partnership_id = PartnershipId::parse("partnership_id", &request.partnership_id)?;
            let (state, sequence) = load_partnership(&mut tx, &partnership_id).await?;
            let Some((referrer, acceptor)) = state
                .parties()
                .filter(|(r, a)| *r == &merchant || *a == &merchant)
                .map(|(r, a)| (r.clone(), a.clone()))
            else {
                return Err(not_a_party(&merchant, &partnership_id));
            };
            (partnership_id, state, sequence, referrer, acceptor)
        };
        span.record("partnership_id", partnership_id.as_str());
        require_overlap(&mut tx, &referrer, &acceptor, &terms.attributing_kinds).await?;
        let command = Command::Propose {
            referrer,
            acceptor,
            proposed_by: merchant.clone(),
            terms,
            effective_from,
            now,
        };
        let (_, events) = decide_and_record(
            &mut tx,
            &partnership_id,
            state,
            sequence,
            vec![command],
            now,
        )
        .await?;
        let version = events
            .iter()
            .find_map(|event| match event {
                Event::TermsProposed { version, .. } => Some(*version),
                _ => None,
            })
            .unwrap_or_default();
        let response = pb::ProposeTermsResponse {
            partnership_id: partnership_id.to_string(),
            version,
        };
        idempotency::complete(&self.state, tx, &scope, &response).await?;
        tracing::info!(version, "terms proposed");
        Ok(response)
    }

    async fn accept(
        &self,
        request: Request<pb::AcceptTermsRequest>,
    ) -> Result<pb::AcceptTermsResponse, GatewayError> {
        let version = request.get_ref().version;
        let (partnership_id, key) = (
            request.get_ref().partnership_id.clone(),
            request.get_ref().idempotency_key.clone(),
        );
        let response = self
            .party_command(
                request,
                "AcceptTerms",
                &partnership_id,
                &key,
                |merchant, now| Command::Accept {
                    version,
                    accepted_by: merchant,
                    now,
                },
                |id, state, _| pb::AcceptTermsResponse {
                    partnership_id: id.to_string(),
                    version,
                    effective_from: state
                        .versions()
                        .iter()
                        .find(|v| v.version == version)
                        .map(|v| timestamp(v.effective_from)),
                },
            )
            .await?;
        tracing::info!(version, "terms accepted");
        Ok(response)
    }

    async fn terminate(
        &self,
        request: Request<pb::TerminatePartnershipRequest>,
    ) -> Result<pb::TerminatePartnershipResponse, GatewayError> {
        let (partnership_id, key) = (
            request.get_ref().partnership_id.clone(),
            request.get_ref().idempotency_key.clone(),
        );
        let response = self
            .party_command(
                request,
                "TerminatePartnership",
                &partnership_id,
                &key,
                |merchant, now| Command::Terminate {
                    by: merchant,
                    at: now,
                },
                |id, _, now| pb::TerminatePartnershipResponse {
                    partnership_id: id.to_string(),
                    terminated_at: Some(timestamp(now)),
                },
            )
            .await?;
        tracing::info!("partnership terminated");
        Ok(response)
    }

    /// One party's command on an existing partnership, as an idempotent write: authenticate,
    /// check the caller is a party, decide, record, answer with `respond(id, state after, now)`.
    #[allow(clippy::too_many_arguments)]
    async fn party_command<Req: Message, Resp: Message + Default>(
        &self,
        request: Request<Req>,
        operation: &'static str,
        partnership_id: &str,
        idempotency_key: &str,
        command: impl FnOnce(MerchantId, DateTime<Utc>) -> Command,
        respond: impl FnOnce(&PartnershipId, &Partnership, DateTime<Utc>) -> Resp,
    ) -> Result<Resp, GatewayError> {
        let merchant = authenticate_merchant(&self.state.pool, request.metadata()).await?;
        tracing::Span::current().record("merchant_id", merchant.as_str());
        let idempotency_key = parse_token("idempotency_key", idempotency_key, 1, 128)?;
        let partnership_id = PartnershipId::parse("partnership_id", partnership_id)?;
        // The key is part of the request, so the fingerprint is the same exactly when the rest is.
        let fingerprint = fingerprint(operation, request.get_ref());
        let now = tandem_proto::time::truncate_to_micros(Utc::now());
        let scope = idempotency::Scope {
            owner: merchant.as_str(),
            key: &idempotency_key,
            operation,
            fingerprint: &fingerprint,
        };
        let mut tx = match idempotency::start(&self.state.pool, &scope).await? {
            idempotency::Begun::Replayed(response) => return Ok(response),
            idempotency::Begun::Fresh(tx) => tx,
        };
        let (state, sequence) = self
            .party_state(&mut tx, &partnership_id, &merchant)
            .await?;
        let (state, _) = decide_and_record(
            &mut tx,
            &partnership_id,
            state,
            sequence,
            vec![command(merchant.clone(), now)],
            now,
        )
        .await?;
        let response = respond(&partnership_id, &state, now);
        idempotency::complete(&self.state, tx, &scope, &response).await?;
        Ok(response)
    }

    async fn get(
        &self,
        request: Request<pb::GetPartnershipRequest>,
    ) -> Result<pb::Partnership, GatewayError> {
        let merchant = authenticate_merchant(&self.state.pool, request.metadata()).await?;
        tracing::Span::current().record("merchant_id", merchant.as_str());
        let partnership_id =
            PartnershipId::parse("partnership_id", &request.get_ref().partnership_id)?;
        let mut connection = self.state.pool.acquire().await?;
        let (state, _) = self
            .party_state(&mut connection, &partnership_id, &merchant)
            .await?;
        let (referrer, acceptor) = state
            .parties()
            .ok_or(GatewayError::CorruptEvent(stream_id(&partnership_id)))?;
        let referrer_captures = captures_of(&mut connection, referrer).await?;
        let acceptor_captures = captures_of(&mut connection, acceptor).await?;
        // The terms in force now, or before any is, the latest proposed.
        let now = Utc::now();
        let allowed = state
            .terms_at(now)
            .map(|(_, terms)| terms)
            .or_else(|| state.versions().last().map(|version| &version.terms))
            .map(|terms| terms.attributing_kinds.clone())
            .unwrap_or_default();
        let overlap = referrer_captures.overlap(&acceptor_captures, &allowed);
        Ok(pb::Partnership {
            partnership_id: partnership_id.to_string(),
            referrer_merchant_id: referrer.to_string(),
            acceptor_merchant_id: acceptor.to_string(),
            versions: state.versions().iter().map(version_to_proto).collect(),
            terminated_at: state.terminated_at().map(timestamp),
            identifier_overlap: captures_to_proto(&overlap),
            referrer_captures: captures_to_proto(referrer_captures.iter()),
            acceptor_captures: captures_to_proto(acceptor_captures.iter()),
        })
    }

    /// The partnership's state, if it exists and `merchant` is one of its parties.
    async fn party_state(
        &self,
        connection: &mut PgConnection,
        partnership_id: &PartnershipId,
        merchant: &MerchantId,
    ) -> Result<(Partnership, i32), GatewayError> {
        let (state, sequence) = load_partnership(connection, partnership_id).await?;
        match state.parties() {
            Some((referrer, acceptor)) if referrer == merchant || acceptor == merchant => {
                Ok((state, sequence))
            }
            _ => Err(not_a_party(merchant, partnership_id)),
        }
    }
}

/// The answer about a partnership the caller is not a party to, whether it exists or not: the
/// answer must not tell a merchant that another merchant's partnership id exists.
fn not_a_party(merchant: &MerchantId, partnership_id: &PartnershipId) -> GatewayError {
    GatewayError::PermissionDenied(format!(
        "{merchant} is not a party to partnership {partnership_id} (or it does not exist)"
    ))
}
