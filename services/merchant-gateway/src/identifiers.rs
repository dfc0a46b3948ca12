//! Identifier kinds at the edge: what each merchant's tills capture, the loyalty programmes
//! operators register, raw identifiers to customer keys, and the overlap two partners can match
//! on.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tandem_codec::identifiers::{
    captures_from_proto, captures_to_proto, member_number_format_to_proto, programme_from_proto,
};
use tandem_domain::customer::{
    AttributingKinds, Capture, Captures, CustomerIdentifiers, CustomerKey, IdentifierError,
    IdentifierKind, RawCustomer,
};
use tandem_domain::ids::MerchantId;
use tandem_domain::loyalty::{parse_scope, CheckDigit, LoyaltyProgramme, MemberAlphabet};
use tandem_domain::ValidationError;
use tandem_proto::v1 as pb;
use tonic::metadata::MetadataMap;

use crate::auth::{api_key_sha256, bearer_token};
use crate::{GatewayError, State};

/// An authenticated merchant and what its tills capture.
#[derive(Debug)]
pub struct Caller {
    pub merchant: MerchantId,
    pub captures: Captures,
}

/// The merchant whose API key the request carries, with its declared captures (one query).
pub async fn authenticate_caller(
    pool: &PgPool,
    metadata: &MetadataMap,
) -> Result<Caller, GatewayError> {
    let token = bearer_token(metadata)?;
    let row: Option<(String, Vec<String>)> = sqlx::query_as(
        "SELECT m.merchant_id, m.identifier_captures FROM api_keys k JOIN merchants m USING (merchant_id) \
         WHERE k.sha256 = $1 AND k.revoked_at IS NULL",
    )
    .bind(api_key_sha256(token))
    .fetch_optional(pool)
    .await?;
    let (merchant_id, captures) = row.ok_or(GatewayError::Unauthenticated(
        "API key not recognised or revoked; check the key the operator issued",
    ))?;
    Ok(Caller {
        merchant: MerchantId::parse("merchant_id", &merchant_id)?,
        captures: Captures::from_tags(&captures),
    })
}

/// Registered programmes, cached forever once seen: a programme never changes.
#[derive(Default)]
pub struct Programmes(RwLock<HashMap<String, Arc<LoyaltyProgramme>>>);

impl Programmes {
    pub async fn get(
        &self,
        connection: &mut PgConnection,
        programme_id: &str,
    ) -> Result<Option<Arc<LoyaltyProgramme>>, GatewayError> {
        if let Some(programme) = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(programme_id)
        {
            return Ok(Some(programme.clone()));
        }
        let Some(programme) = load_programme(connection, programme_id).await? else {
            return Ok(None);
        };
        let programme = Arc::new(programme.0);
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(programme_id.to_owned(), programme.clone());
        Ok(Some(programme))
    }
}

type ProgrammeRow = (String, String, String, i32, i32, String, DateTime<Utc>);

async fn load_programme(
    connection: &mut PgConnection,
    programme_id: &str,
) -> Result<Option<(LoyaltyProgramme, DateTime<Utc>)>, GatewayError> {
    let row: Option<ProgrammeRow> = sqlx::query_as(
        "SELECT programme_id, display_name, alphabet, min_length, max_length, check_digit, registered_at \
         FROM loyalty_programmes WHERE programme_id = $1",
    )
    .bind(programme_id)
    .fetch_optional(connection)
    .await?;
    let Some((id, display_name, alphabet, min_length, max_length, check_digit, at)) = row else {
        return Ok(None);
    };
    let corrupt = || GatewayError::CorruptEvent(format!("loyalty programme {id}"));
    let alphabet = match alphabet.as_str() {
        "digits" => MemberAlphabet::Digits,
        "alphanumeric" => MemberAlphabet::Alphanumeric,
        _ => return Err(corrupt()),
    };
    let check_digit = CheckDigit::from_name(&check_digit).ok_or_else(corrupt)?;
    let programme = LoyaltyProgramme::new(
        &id,
        &display_name,
        alphabet,
        u32::try_from(min_length).map_err(|_| corrupt())?,
        u32::try_from(max_length).map_err(|_| corrupt())?,
        check_digit,
    )
    .map_err(|_| corrupt())?;
    Ok(Some((programme, at)))
}

fn programme_to_proto(programme: &LoyaltyProgramme, at: DateTime<Utc>) -> pb::LoyaltyProgramme {
    pb::LoyaltyProgramme {
        programme_id: programme.programme_id.clone(),
        display_name: programme.display_name.clone(),
        member_number_format: Some(member_number_format_to_proto(programme)),
        registered_at: Some(tandem_proto::time::timestamp(at)),
    }
}

/// Registers a programme; the same definition again answers the registered one.
pub async fn register_programme(
    pool: &PgPool,
    request: &pb::RegisterLoyaltyProgrammeRequest,
) -> Result<pb::LoyaltyProgramme, GatewayError> {
    let programme = programme_from_proto(request)?;
    let now = tandem_proto::time::truncate_to_micros(Utc::now());
    let mut connection = pool.acquire().await?;
    sqlx::query(
        "INSERT INTO loyalty_programmes (programme_id, display_name, alphabet, min_length, max_length, check_digit, registered_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (programme_id) DO NOTHING",
    )
    .bind(&programme.programme_id)
    .bind(&programme.display_name)
    .bind(match programme.alphabet {
        MemberAlphabet::Digits => "digits",
        MemberAlphabet::Alphanumeric => "alphanumeric",
    })
    .bind(i32::try_from(programme.min_length).unwrap_or(i32::MAX))
    .bind(i32::try_from(programme.max_length).unwrap_or(i32::MAX))
    .bind(programme.check_digit.name())
    .bind(now)
    .execute(&mut *connection)
    .await?;
    let (stored, at) = load_programme(&mut connection, &programme.programme_id)
        .await?
        .ok_or_else(|| {
            GatewayError::CorruptEvent(format!("loyalty programme {}", programme.programme_id))
        })?;
    if stored != programme {
        return Err(GatewayError::AlreadyExists(format!(
            "programme {} is already registered with another definition ({stored:?}); programmes never change, register a new id",
            programme.programme_id
        )));
    }
    tracing::info!(programme_id = %programme.programme_id, "loyalty programme registered");
    Ok(programme_to_proto(&stored, at))
}

/// Replaces the caller's declaration. Every programme it names must be registered.
pub async fn declare_captures(
    state: &State,
    merchant: &MerchantId,
    request: &pb::DeclareIdentifierCaptureRequest,
) -> Result<pb::IdentifierCaptureDeclaration, GatewayError> {
    let captures = captures_from_proto("captures", &request.captures)?;
    let mut connection = state.pool.acquire().await?;
    require_registered(state, &mut connection, "captures", &captures).await?;
    sqlx::query("UPDATE merchants SET identifier_captures = $2 WHERE merchant_id = $1")
        .bind(merchant.as_str())
        .bind(captures.tags())
        .execute(&mut *connection)
        .await?;
    tracing::info!(captures = %captures, "identifier capture declared");
    Ok(pb::IdentifierCaptureDeclaration {
        merchant_id: merchant.to_string(),
        captures: captures_to_proto(captures.iter()),
    })
}

pub fn declaration(caller: &Caller) -> pb::IdentifierCaptureDeclaration {
    pb::IdentifierCaptureDeclaration {
        merchant_id: caller.merchant.to_string(),
        captures: captures_to_proto(caller.captures.iter()),
    }
}

/// The captures an operator registers a merchant with; PAR, phone and e-mail when it sends none.
pub async fn initial_captures(
    state: &State,
    captures: &[pb::IdentifierCapture],
) -> Result<Captures, GatewayError> {
    if captures.is_empty() {
        return Ok(Captures::default());
    }
    let captures = captures_from_proto("identifier_captures", captures)?;
    let mut connection = state.pool.acquire().await?;
    require_registered(state, &mut connection, "identifier_captures", &captures).await?;
    Ok(captures)
}

/// Every programme a declaration names must be registered.
async fn require_registered(
    state: &State,
    connection: &mut PgConnection,
    field: &str,
    captures: &Captures,
) -> Result<(), GatewayError> {
    for capture in captures.iter() {
        if capture.kind == IdentifierKind::LoyaltyMember
            && state
                .programmes
                .get(connection, &capture.scope)
                .await?
                .is_none()
        {
            return Err(GatewayError::FailedPrecondition(format!(
                "{field}: programme {:?} is not registered; an operator registers it with RegisterLoyaltyProgramme",
                capture.scope
            )));
        }
    }
    Ok(())
}

/// The request's raw identifiers as customer keys, checked against what the caller declared.
/// Raw values live only inside this call.
pub async fn customer_keys(
    state: &State,
    caller: &Caller,
    customer: Option<&pb::CustomerIdentifiers>,
) -> Result<Vec<CustomerKey>, GatewayError> {
    let customer = customer.ok_or_else(|| {
        ValidationError::new(
            "customer",
            "is required: at least one of payment_account_reference, card_fingerprint, phone, email or loyalty",
        )
    })?;
    let loyalty = customer.loyalty.clone().unwrap_or_default();
    // Look the programme up only when the caller declared it: an undeclared one is refused below
    // without touching the database.
    let programme = match parse_scope("customer.loyalty.programme_id", &loyalty.programme_id) {
        Ok(id) if caller.captures.contains(IdentifierKind::LoyaltyMember, &id) => {
            let mut connection = state.pool.acquire().await?;
            state.programmes.get(&mut connection, &id).await?
        }
        _ => None,
    };
    let raw = RawCustomer {
        card_fingerprint: &customer.card_fingerprint,
        card_processor: &customer.card_processor,
        payment_account_reference: &customer.payment_account_reference,
        phone: &customer.phone,
        email: &customer.email,
        loyalty_programme_id: &loyalty.programme_id,
        member_number: &loyalty.member_number,
    };
    let identifiers =
        CustomerIdentifiers::parse("customer", &raw, &caller.captures, programme.as_deref())
            .map_err(|error| match error {
                IdentifierError::Invalid(invalid) => GatewayError::Invalid(invalid),
                IdentifierError::NotDeclared { field, reason } => {
                    GatewayError::FailedPrecondition(format!("{field}: {reason}"))
                }
            })?;
    Ok(identifiers.keys_under(&state.network_keys))
}

/// What a merchant declared it captures.
pub async fn captures_of(
    connection: &mut PgConnection,
    merchant: &MerchantId,
) -> Result<Captures, GatewayError> {
    let tags: Option<Vec<String>> =
        sqlx::query_scalar("SELECT identifier_captures FROM merchants WHERE merchant_id = $1")
            .bind(merchant.as_str())
            .fetch_optional(connection)
            .await?;
    Ok(Captures::from_tags(&tags.unwrap_or_default()))
}

/// The identifiers two partners can match on under `allowed`; refused with a precise error when
/// there are none.
pub async fn require_overlap(
    connection: &mut PgConnection,
    referrer: &MerchantId,
    acceptor: &MerchantId,
    allowed: &AttributingKinds,
) -> Result<Vec<Capture>, GatewayError> {
    let referrer_captures = captures_of(connection, referrer).await?;
    let acceptor_captures = captures_of(connection, acceptor).await?;
    let overlap = referrer_captures.overlap(&acceptor_captures, allowed);
    if overlap.is_empty() {
        return Err(GatewayError::FailedPrecondition(format!(
            "the two merchants capture no identifier in common that the terms allow, so no purchase could ever be attributed: \
             referrer {referrer} captures [{referrer_captures}], acceptor {acceptor} captures [{acceptor_captures}], \
             the terms allow {allowed}. Card fingerprints match only within one processor and member numbers within one programme; \
             declare a shared kind with DeclareIdentifierCapture (a card's PAR matches across processors), or widen terms.attributing_kinds"
        )));
    }
    Ok(overlap)
}
