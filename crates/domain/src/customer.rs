//! Customer identifiers and the pseudonymous customer keys made from them.
//!
//! A raw identifier exists only inside a [`RawIdentifier`], whose `Debug` never prints the value,
//! and only for as long as it takes to compute its key. The derivation (docs/IDENTIFIERS.md gives
//! test vectors) is
//!
//! ```text
//! key = HMAC-SHA256(network_key[version],
//!                   "tandem:customer-key:v2" 0x00 kind 0x00 scope 0x00 normalised)
//! written  ck<version>_<kind>_<64 lower-case hex digits>
//! ```
//!
//! `kind` is `card`, `par`, `phone`, `email` or `member`; `scope` is the payment processor of a
//! card fingerprint, the programme of a member number, and empty for the others. No part can hold
//! a 0x00 byte, so the encoding is unambiguous: two different (kind, scope, value) triples never
//! hash the same input. The same customer gives the same key at every merchant, the key says which
//! kind of identifier it came from (never the value), and it reveals nothing without the network
//! key.

use std::collections::BTreeSet;
use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::loyalty::{parse_scope, LoyaltyProgramme};
use crate::text::{contains_card_number, reject_card_number};
use crate::ValidationError;

/// The domain-separation label of the current derivation.
const DERIVATION: &[u8] = b"tandem:customer-key:v2";

/// The kinds of identifier a checkout captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentifierKind {
    /// A payment processor's card fingerprint: matches only fingerprints of the same processor.
    CardFingerprint,
    /// The EMVCo Payment Account Reference: one card account across processors, tokens and
    /// wallets.
    PaymentAccountReference,
    Phone,
    Email,
    /// A loyalty or coalition programme's member number: matches within its programme.
    LoyaltyMember,
}

impl IdentifierKind {
    pub const ALL: [Self; 5] = [
        Self::CardFingerprint,
        Self::PaymentAccountReference,
        Self::Phone,
        Self::Email,
        Self::LoyaltyMember,
    ];

    /// The short tag used in customer keys and in the key derivation.
    pub fn tag(self) -> &'static str {
        match self {
            Self::CardFingerprint => "card",
            Self::PaymentAccountReference => "par",
            Self::Phone => "phone",
            Self::Email => "email",
            Self::LoyaltyMember => "member",
        }
    }

    pub fn from_tag(tag: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.tag() == tag)
    }

    /// Whether identifiers of this kind only match within a scope (a processor, a programme).
    pub fn is_scoped(self) -> bool {
        matches!(self, Self::CardFingerprint | Self::LoyaltyMember)
    }
}

impl fmt::Display for IdentifierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CardFingerprint => "card fingerprint",
            Self::PaymentAccountReference => "payment account reference (PAR)",
            Self::Phone => "phone",
            Self::Email => "e-mail",
            Self::LoyaltyMember => "loyalty member number",
        })
    }
}

/// One kind of identifier a merchant's tills capture, with its scope: the processor of its card
/// fingerprints, the programme of its member numbers, nothing for the other kinds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Capture {
    pub kind: IdentifierKind,
    pub scope: String,
}

impl Capture {
    /// Checks a declared capture: scoped kinds need their scope, the others take none.
    pub fn new(field: &str, kind: IdentifierKind, scope: &str) -> Result<Self, ValidationError> {
        match (kind.is_scoped(), scope.trim().is_empty()) {
            (true, true) => Err(ValidationError::new(
                field,
                match kind {
                    IdentifierKind::CardFingerprint => "a card fingerprint capture needs its scope: the payment processor's name, e.g. adyen",
                    _ => "a loyalty member capture needs its scope: the programme id the operator registered",
                },
            )),
            (false, false) => Err(ValidationError::new(
                field,
                format!("a {kind} capture takes no scope: it matches across processors and programmes"),
            )),
            (true, false) => Ok(Self {
                kind,
                scope: parse_scope(&format!("{field}.scope"), scope)?,
            }),
            (false, true) => Ok(Self {
                kind,
                scope: String::new(),
            }),
        }
    }

    /// `card:adyen`, `member:coalition-plus`, `par`, `phone`, `email`: how a capture is stored.
    pub fn to_tag(&self) -> String {
        if self.scope.is_empty() {
            self.kind.tag().to_owned()
        } else {
            format!("{}:{}", self.kind.tag(), self.scope)
        }
    }

    pub fn from_tag(tag: &str) -> Option<Self> {
        let (kind, scope) = tag.split_once(':').unwrap_or((tag, ""));
        Self::new("capture", IdentifierKind::from_tag(kind)?, scope).ok()
    }
}

impl fmt::Display for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_tag())
    }
}

/// What a merchant's tills capture. A merchant that declared nothing captures the kinds every
/// till can ask for without a processor or a programme: PAR, phone and e-mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captures(BTreeSet<Capture>);

impl Default for Captures {
    fn default() -> Self {
        Self(
            [
                IdentifierKind::PaymentAccountReference,
                IdentifierKind::Phone,
                IdentifierKind::Email,
            ]
            .into_iter()
            .map(|kind| Capture {
                kind,
                scope: String::new(),
            })
            .collect(),
        )
    }
}

impl Captures {
    /// At least one capture; duplicates collapse.
    pub fn new(field: &str, captures: Vec<Capture>) -> Result<Self, ValidationError> {
        if captures.is_empty() {
            return Err(ValidationError::new(
                field,
                "must declare at least one identifier kind the tills capture",
            ));
        }
        if captures.len() > 32 {
            return Err(ValidationError::new(
                field,
                "may declare at most 32 captures",
            ));
        }
        Ok(Self(captures.into_iter().collect()))
    }

    /// Reads stored tags; an unreadable tag is dropped (it cannot match anything).
    pub fn from_tags<S: AsRef<str>>(tags: &[S]) -> Self {
        Self(
            tags.iter()
                .filter_map(|tag| Capture::from_tag(tag.as_ref()))
                .collect(),
        )
    }

    pub fn tags(&self) -> Vec<String> {
        self.0.iter().map(Capture::to_tag).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Capture> {
        self.0.iter()
    }

    pub fn contains(&self, kind: IdentifierKind, scope: &str) -> bool {
        self.0.iter().any(|c| c.kind == kind && c.scope == scope)
    }

    fn scopes(&self, kind: IdentifierKind) -> Vec<&str> {
        self.0
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.scope.as_str())
            .collect()
    }

    /// The captures both sides declared (same kind and scope) that `allowed` lets attribute:
    /// the identifiers on which a partnership can match.
    pub fn overlap(&self, other: &Captures, allowed: &AttributingKinds) -> Vec<Capture> {
        self.0
            .intersection(&other.0)
            .filter(|c| allowed.allows(Some(c.kind)))
            .cloned()
            .collect()
    }
}

impl fmt::Display for Captures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.tags().join(", "))
    }
}

/// The identifier kinds a partnership lets attribute a purchase; empty means every kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AttributingKinds(Vec<IdentifierKind>);

impl AttributingKinds {
    pub fn new(kinds: impl IntoIterator<Item = IdentifierKind>) -> Self {
        let mut kinds: Vec<IdentifierKind> = kinds.into_iter().collect();
        kinds.sort();
        kinds.dedup();
        if kinds.len() == IdentifierKind::ALL.len() {
            kinds.clear();
        }
        Self(kinds)
    }

    pub fn every() -> Self {
        Self::default()
    }

    /// The kinds listed; empty for every kind.
    pub fn kinds(&self) -> &[IdentifierKind] {
        &self.0
    }

    /// Whether a match on a key of `kind` may attribute. A key of unknown kind (derived before
    /// keys named their kind) attributes only under terms that allow every kind.
    pub fn allows(&self, kind: Option<IdentifierKind>) -> bool {
        self.0.is_empty() || kind.is_some_and(|kind| self.0.contains(&kind))
    }
}

impl fmt::Display for AttributingKinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("every kind");
        }
        let tags: Vec<&str> = self.0.iter().map(|k| k.tag()).collect();
        f.write_str(&tags.join(", "))
    }
}

/// A normalised raw identifier. Its value never appears in `Debug` output, so it cannot reach a
/// log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct RawIdentifier {
    kind: IdentifierKind,
    scope: String,
    normalised: String,
}

impl fmt::Debug for RawIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RawIdentifier({:?}, {:?}, <redacted>)",
            self.kind, self.scope
        )
    }
}

impl RawIdentifier {
    pub fn kind(&self) -> IdentifierKind {
        self.kind
    }

    /// The normalised value: raw customer data, for deriving its key in this process only.
    pub fn normalised(&self) -> &str {
        &self.normalised
    }

    /// A phone number in international format: `+` or `00`, then the country code and number.
    /// Spaces, dots, dashes and parentheses are ignored. Normalised to E.164 (`+` and digits) by
    /// libphonenumber's metadata (the `phonenumber` crate), which also drops a national trunk
    /// prefix kept after the country code.
    pub fn phone(field: &str, value: &str) -> Result<Self, ValidationError> {
        let trimmed = value.trim();
        let rest = if let Some(rest) = trimmed.strip_prefix('+') {
            rest
        } else if let Some(rest) = trimmed.strip_prefix("00") {
            rest
        } else {
            return Err(ValidationError::new(
                field,
                "must be in international format starting with + or 00 and the country code, e.g. +44 20 7946 0958",
            ));
        };
        let mut digits = String::with_capacity(16);
        for character in rest.chars() {
            match character {
                '0'..='9' => digits.push(character),
                ' ' | '.' | '-' | '(' | ')' => {}
                _ => {
                    return Err(ValidationError::new(
                        field,
                        "may contain only digits, spaces, dots, dashes and parentheses after the + or 00",
                    ))
                }
            }
        }
        if !(8..=15).contains(&digits.len()) || digits.starts_with('0') {
            return Err(ValidationError::new(
                field,
                "must have a country code not starting with 0 and 8 to 15 digits in all (E.164)",
            ));
        }
        // A normalised number must normalise to itself (one customer, one key). libphonenumber
        // can take digits after the country code for a national or carrier prefix more than
        // once (found by fuzzing: "+86 12 3 2 3 12 33 98 3" normalised to a number that
        // normalised again to a shorter one), so normalise until nothing changes; a number
        // that does not settle within a few rounds is refused.
        let mut normalised = Self::normalise_phone(field, digits)?;
        for _ in 0..4 {
            let again = Self::normalise_phone(field, normalised[1..].to_owned())?;
            if again == normalised {
                return Ok(Self {
                    kind: IdentifierKind::Phone,
                    scope: String::new(),
                    normalised,
                });
            }
            normalised = again;
        }
        Err(ValidationError::new(
            field,
            "is not a possible phone number: it does not settle to one international form; send it in international format, e.g. +44 20 7946 0958",
        ))
    }

    /// One round of phone normalisation: the E.164 form of `digits` (country code first).
    fn normalise_phone(field: &str, mut digits: String) -> Result<String, ValidationError> {
        // libphonenumber's rules, not hand rules: a national trunk prefix written after the
        // country code (+44 (0)20…, +33 06…) is dropped where the country drops it, and kept
        // where it belongs to the number (Italy's leading 0).
        let parse = |digits: &str| {
            phonenumber::parse(None, format!("+{digits}")).map_err(|error| {
                ValidationError::new(
                    field,
                    format!("is not a possible phone number ({error}); send it in international format, e.g. +44 20 7946 0958"),
                )
            })
        };
        let mut parsed = parse(&digits)?;
        // libphonenumber drops a trunk prefix only where the rest is a number it knows to be
        // allocated. E.164 is stricter: where a country's trunk prefix is 0 and no national
        // number of it starts with 0, a 0 right after the country code is always the trunk prefix,
        // in unallocated ranges too (so that one number has one key, whatever range it is in).
        // Every such 0 goes, not only the first: "+44 0044…" kept one and normalised again to a
        // different number (found by fuzzing).
        loop {
            let code = parsed.country().code();
            let national = digits.get(code.to_string().len()..).unwrap_or_default();
            let Some(rest) = national.strip_prefix('0') else {
                break;
            };
            let trunk_zero =
                phonenumber::metadata::DATABASE
                    .by_code(&code)
                    .is_some_and(|regions| {
                        regions
                            .iter()
                            .any(|region| region.national_prefix() == Some("0"))
                            && !regions
                                .iter()
                                .any(|region| region.descriptors().general().is_match(national))
                    });
            if !trunk_zero || rest.is_empty() {
                break;
            }
            digits = format!("{code}{rest}");
            parsed = parse(&digits)?;
        }
        let normalised = parsed.format().mode(phonenumber::Mode::E164).to_string();
        // The same rule for the number as stored: with the trunk prefix dropped, a number
        // written at the edge of the length rule can fall below it (found by fuzzing:
        // "+44 (0)20 790" would have become "+4420790", which this function refuses as input).
        if !(8..=15).contains(&normalised.len().saturating_sub(1)) {
            return Err(ValidationError::new(
                field,
                "must have 8 to 15 digits in all (E.164) once the national trunk prefix is dropped",
            ));
        }
        Ok(normalised)
    }

    /// An e-mail address, trimmed and lower-cased, nothing more: no provider-specific rewriting
    /// (dots and `+tags` in Gmail addresses are kept), because what one provider ignores another
    /// delivers to a different person.
    pub fn email(field: &str, value: &str) -> Result<Self, ValidationError> {
        let normalised = value.trim().to_lowercase();
        if contains_card_number(&normalised) {
            return Err(ValidationError::new(
                field,
                "contains what looks like a payment card number; send the customer's e-mail address only",
            ));
        }
        let valid = normalised.len() <= 254
            && !normalised
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
            && normalised.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty()
                    && local.len() <= 64
                    && !domain.contains('@')
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
            });
        if !valid {
            return Err(ValidationError::new(
                field,
                "must be an e-mail address such as name@example.com",
            ));
        }
        Ok(Self {
            kind: IdentifierKind::Email,
            scope: String::new(),
            normalised,
        })
    }

    /// A payment processor's card fingerprint: an opaque token of 8 to 128 visible ASCII
    /// characters, compared exactly, and only with fingerprints of the same processor. A value that
    /// looks like a card number is rejected.
    pub fn card_fingerprint(
        field: &str,
        processor: &str,
        value: &str,
    ) -> Result<Self, ValidationError> {
        let normalised = value.trim();
        reject_card_number(field, normalised)?;
        if !(8..=128).contains(&normalised.len())
            || !normalised.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ValidationError::new(
                field,
                "must be the processor's card fingerprint: 8 to 128 visible ASCII characters without spaces",
            ));
        }
        Ok(Self {
            kind: IdentifierKind::CardFingerprint,
            scope: parse_scope("card_processor", processor)?,
            normalised: normalised.to_owned(),
        })
    }

    /// The EMVCo Payment Account Reference: exactly 29 characters of `A`-`Z` and `0`-`9` (lower
    /// case is upper-cased, surrounding whitespace dropped), whose first four are the BIN
    /// Controller Identifier EMVCo assigned to the card's BIN controller (never `0000`). It is
    /// the same for a card account at every acquirer, token and wallet, so it matches across
    /// processors. A card number in its place is refused.
    pub fn payment_account_reference(field: &str, value: &str) -> Result<Self, ValidationError> {
        let normalised = value.trim().to_ascii_uppercase();
        let digits: String = normalised
            .chars()
            .filter(|c| !matches!(c, ' ' | '-'))
            .collect();
        if (13..=19).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValidationError::new(
                field,
                "is a card number, not a PAR; send the 29-character Payment Account Reference the processor or terminal reports for the card, never the card number",
            ));
        }
        if normalised.len() != 29
            || !normalised
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return Err(ValidationError::new(
                field,
                "must be an EMVCo Payment Account Reference: exactly 29 letters and digits, e.g. V0010013018276458729101214380",
            ));
        }
        if normalised.starts_with("0000") {
            return Err(ValidationError::new(
                field,
                "starts with 0000, which is no BIN Controller Identifier; the first four characters of a PAR name the card's BIN controller",
            ));
        }
        Ok(Self {
            kind: IdentifierKind::PaymentAccountReference,
            scope: String::new(),
            normalised,
        })
    }

    /// A loyalty programme's member number, checked against the programme's registered format.
    pub fn loyalty_member(
        field: &str,
        programme: &LoyaltyProgramme,
        value: &str,
    ) -> Result<Self, ValidationError> {
        Ok(Self {
            kind: IdentifierKind::LoyaltyMember,
            scope: programme.programme_id.clone(),
            normalised: programme.normalise_member_number(field, value)?,
        })
    }
}

/// The pseudonymous key of one customer identifier. This, never the raw identifier, is what
/// Tandem stores, publishes and matches on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CustomerKey(String);

impl CustomerKey {
    /// Accepts a key produced by [`NetworkKey::customer_key`], e.g. read back from a topic:
    /// `ck<version>_<kind>_<64 hex>`, or `ck<version>_<64 hex>` as written before keys named
    /// their kind.
    pub fn parse(field: &str, value: &str) -> Result<Self, ValidationError> {
        let valid = value
            .strip_prefix("ck")
            .and_then(|rest| rest.split_once('_'))
            .is_some_and(|(version, rest)| {
                let digest = match rest.split_once('_') {
                    Some((kind, digest)) if IdentifierKind::from_tag(kind).is_some() => digest,
                    Some(_) => return false,
                    None => rest,
                };
                version.parse::<u16>().is_ok()
                    && digest.len() == 64
                    && digest
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            });
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(ValidationError::new(
                field,
                "must be a customer key ck<version>_<kind>_<64 hex digits>",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The version of the network key it was derived with.
    pub fn version(&self) -> Option<u16> {
        self.0.strip_prefix("ck")?.split_once('_')?.0.parse().ok()
    }

    /// The kind of identifier the key was derived from; `None` for a key derived before keys
    /// named their kind.
    pub fn kind(&self) -> Option<IdentifierKind> {
        let mut parts = self.0.split('_');
        parts.next();
        let kind = parts.next()?;
        parts.next()?;
        IdentifierKind::from_tag(kind)
    }
}

impl fmt::Display for CustomerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The network-wide secret that customer keys are derived with, and its version. Rotating the
/// key means a new version; keys of different versions never match.
#[derive(Clone)]
pub struct NetworkKey {
    version: u16,
    secret: Vec<u8>,
}

impl fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetworkKey(v{}, <redacted>)", self.version)
    }
}

impl NetworkKey {
    /// At least 32 bytes of secret, as HMAC-SHA256 wants; version 0 to 65533.
    pub fn new(version: u16, secret: Vec<u8>) -> Result<Self, ValidationError> {
        if version >= u16::MAX - 1 {
            return Err(ValidationError::new(
                "network_key",
                "version must be from 0 to 65533 (65534 and 65535 are reserved)",
            ));
        }
        if secret.len() < 32 {
            return Err(ValidationError::new(
                "network_key",
                format!("must be at least 32 bytes, got {}", secret.len()),
            ));
        }
        Ok(Self { version, secret })
    }

    pub fn version(&self) -> u16 {
        self.version
    }

    pub fn customer_key(&self, identifier: &RawIdentifier) -> CustomerKey {
        #[allow(clippy::expect_used)]
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret)
            .expect("HMAC accepts keys of any length");
        mac.update(DERIVATION);
        mac.update(&[0]);
        mac.update(identifier.kind.tag().as_bytes());
        mac.update(&[0]);
        mac.update(identifier.scope.as_bytes());
        mac.update(&[0]);
        mac.update(identifier.normalised.as_bytes());
        CustomerKey(format!(
            "ck{}_{}_{}",
            self.version,
            identifier.kind.tag(),
            hex::encode(mac.finalize().into_bytes())
        ))
    }
}

/// The raw identifier fields of one request, as the till sent them; empty means absent. Its
/// `Debug` says which fields are present, never their values.
#[derive(Clone, Copy, Default)]
pub struct RawCustomer<'a> {
    pub card_fingerprint: &'a str,
    pub card_processor: &'a str,
    pub payment_account_reference: &'a str,
    pub phone: &'a str,
    pub email: &'a str,
    pub loyalty_programme_id: &'a str,
    pub member_number: &'a str,
}

impl fmt::Debug for RawCustomer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let present = [
            ("card_fingerprint", self.card_fingerprint),
            ("payment_account_reference", self.payment_account_reference),
            ("phone", self.phone),
            ("email", self.email),
            ("member_number", self.member_number),
        ]
        .into_iter()
        .filter(|(_, value)| !value.trim().is_empty())
        .map(|(name, _)| name)
        .collect::<Vec<_>>();
        write!(
            f,
            "RawCustomer({present:?}, processor {:?}, programme {:?}, <redacted>)",
            self.card_processor, self.loyalty_programme_id
        )
    }
}

/// Why a request's identifiers were refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentifierError {
    /// The value is malformed (INVALID_ARGUMENT).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The value is well-formed but the merchant has not declared that its tills capture this
    /// kind (or this processor, or this programme) (FAILED_PRECONDITION).
    #[error("{field}: {reason}")]
    NotDeclared { field: String, reason: String },
}

impl IdentifierError {
    fn not_declared(field: &str, reason: String) -> Self {
        Self::NotDeclared {
            field: field.to_owned(),
            reason,
        }
    }
}

/// The identifiers one checkout captured: at least one, at most one of each kind.
#[derive(Debug, Clone)]
pub struct CustomerIdentifiers(Vec<RawIdentifier>);

impl CustomerIdentifiers {
    /// Parses the raw fields of a request. `field` is the request field holding them, e.g.
    /// `customer`; `declared` is what the calling merchant declared its tills capture;
    /// `programme` is the registered programme `raw.loyalty_programme_id` names, if the caller
    /// found one. Each identifier must be of a kind (and processor, and programme) the merchant
    /// declared.
    pub fn parse(
        field: &str,
        raw: &RawCustomer<'_>,
        declared: &Captures,
        programme: Option<&LoyaltyProgramme>,
    ) -> Result<Self, IdentifierError> {
        let within = |name: &str| format!("{field}.{name}");
        let mut identifiers = Vec::with_capacity(5);
        let present = |value: &str| !value.trim().is_empty();

        if present(raw.card_fingerprint) {
            let processors = declared.scopes(IdentifierKind::CardFingerprint);
            let processor = if present(raw.card_processor) {
                let processor = parse_scope(&within("card_processor"), raw.card_processor)?;
                if !processors.contains(&processor.as_str()) {
                    return Err(IdentifierError::not_declared(
                        &within("card_processor"),
                        format!("your merchant has not declared processor {processor:?} (declared: {declared}); declare it with DeclareIdentifierCapture, or send the card's PAR, which matches across processors"),
                    ));
                }
                processor
            } else {
                match processors.as_slice() {
                    [only] => (*only).to_owned(),
                    [] => return Err(IdentifierError::not_declared(
                        &within("card_fingerprint"),
                        format!("a card fingerprint only matches fingerprints of the same processor, and your merchant has declared no card processor (declared: {declared}); declare one with DeclareIdentifierCapture (kind CARD_FINGERPRINT, scope = processor name), or send the card's PAR instead"),
                    )),
                    several => {
                        return Err(ValidationError::new(
                            within("card_processor"),
                            format!("is required: your merchant declared several card processors ({}), so say which one issued this fingerprint", several.join(", ")),
                        )
                        .into())
                    }
                }
            };
            identifiers.push(RawIdentifier::card_fingerprint(
                &within("card_fingerprint"),
                &processor,
                raw.card_fingerprint,
            )?);
        } else if present(raw.card_processor) {
            return Err(ValidationError::new(
                within("card_processor"),
                "names the processor of card_fingerprint, which is empty; send both or neither",
            )
            .into());
        }

        let unscoped = [
            (
                IdentifierKind::PaymentAccountReference,
                "payment_account_reference",
                raw.payment_account_reference,
            ),
            (IdentifierKind::Phone, "phone", raw.phone),
            (IdentifierKind::Email, "email", raw.email),
        ];
        for (kind, name, value) in unscoped {
            if !present(value) {
                continue;
            }
            let field = within(name);
            let identifier = match kind {
                IdentifierKind::PaymentAccountReference => {
                    RawIdentifier::payment_account_reference(&field, value)?
                }
                IdentifierKind::Phone => RawIdentifier::phone(&field, value)?,
                _ => RawIdentifier::email(&field, value)?,
            };
            if !declared.contains(kind, "") {
                return Err(IdentifierError::not_declared(
                    &field,
                    format!("your merchant has not declared that its tills capture {kind} (declared: {declared}); declare it with DeclareIdentifierCapture"),
                ));
            }
            identifiers.push(identifier);
        }

        match (
            present(raw.loyalty_programme_id),
            present(raw.member_number),
        ) {
            (false, false) => {}
            (true, false) | (false, true) => {
                return Err(ValidationError::new(
                    within("loyalty"),
                    "needs both programme_id and member_number",
                )
                .into())
            }
            (true, true) => {
                let programme_id =
                    parse_scope(&within("loyalty.programme_id"), raw.loyalty_programme_id)?;
                if !declared.contains(IdentifierKind::LoyaltyMember, &programme_id) {
                    return Err(IdentifierError::not_declared(
                        &within("loyalty.programme_id"),
                        format!("your merchant has not declared programme {programme_id:?} (declared: {declared}); declare it with DeclareIdentifierCapture"),
                    ));
                }
                let programme = programme
                    .filter(|programme| programme.programme_id == programme_id)
                    .ok_or_else(|| {
                        IdentifierError::not_declared(
                            &within("loyalty.programme_id"),
                            format!("programme {programme_id:?} is not registered; an operator registers it with RegisterLoyaltyProgramme"),
                        )
                    })?;
                identifiers.push(RawIdentifier::loyalty_member(
                    &within("loyalty.member_number"),
                    programme,
                    raw.member_number,
                )?);
            }
        }

        if identifiers.is_empty() {
            return Err(ValidationError::new(
                field,
                "must carry at least one identifier: payment_account_reference, card_fingerprint, phone, email or loyalty",
            )
            .into());
        }
        Ok(Self(identifiers))
    }

    /// The kinds present.
    pub fn kinds(&self) -> Vec<IdentifierKind> {
        self.0.iter().map(RawIdentifier::kind).collect()
    }

    /// The customer keys, sorted and without duplicates.
    pub fn keys(&self, network_key: &NetworkKey) -> Vec<CustomerKey> {
        self.keys_under(std::slice::from_ref(network_key))
    }

    /// The keys under every one of `network_keys`: during a rotation of the network secret the
    /// gateway derives each identifier's key under the new version and the old ones, so that a
    /// referral recorded under either matches (docs/IDENTIFIERS.md, "Rotating the network key").
    pub fn keys_under(&self, network_keys: &[NetworkKey]) -> Vec<CustomerKey> {
        let mut keys: Vec<CustomerKey> = network_keys
            .iter()
            .flat_map(|network_key| {
                self.0
                    .iter()
                    .map(|identifier| network_key.customer_key(identifier))
            })
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::loyalty::{CheckDigit, MemberAlphabet};

    fn network_key() -> NetworkKey {
        NetworkKey::new(1, vec![7; 32]).unwrap()
    }

    fn everything() -> Captures {
        Captures::new(
            "c",
            vec![
                Capture::new("c", IdentifierKind::CardFingerprint, "adyen").unwrap(),
                Capture::new("c", IdentifierKind::PaymentAccountReference, "").unwrap(),
                Capture::new("c", IdentifierKind::Phone, "").unwrap(),
                Capture::new("c", IdentifierKind::Email, "").unwrap(),
                Capture::new("c", IdentifierKind::LoyaltyMember, "coalition").unwrap(),
            ],
        )
        .unwrap()
    }

    fn programme() -> LoyaltyProgramme {
        LoyaltyProgramme::new(
            "coalition",
            "Coalition",
            MemberAlphabet::Digits,
            8,
            12,
            CheckDigit::Luhn,
        )
        .unwrap()
    }

    #[test]
    fn a_normalised_phone_is_itself_a_valid_phone() {
        // Found by fuzzing: accepted, but normalised below the E.164 length rule.
        let error = RawIdentifier::phone("phone", "+44 (0)20 790").unwrap_err();
        assert!(error.reason.contains("trunk prefix"), "{}", error.reason);
        // Found by fuzzing: libphonenumber took a carrier-like prefix off the normalised form
        // too, so it normalised again to a number below the length rule. Normalisation now runs
        // to a fixed point, and this one is refused.
        assert!(RawIdentifier::phone("phone", "+86 12 3 2 3 12 33 98 3").is_err());
        for written in [
            "+44 (0)20 7946 0958",
            "0033 06 12 34 56 78",
            "+1 415 555 2671",
            // Found by fuzzing: two zeros after the country code; one was kept, and normalising
            // the result dropped it.
            "+44  ()0044 220 0 08958",
        ] {
            let phone = RawIdentifier::phone("phone", written).unwrap();
            let again = RawIdentifier::phone("phone", phone.normalised()).unwrap();
            assert_eq!(again.normalised(), phone.normalised());
        }
    }

    #[test]
    fn keys_under_two_versions_hold_both_and_name_their_version() {
        let captures = everything();
        let raw = RawCustomer {
            phone: "+44 20 7946 0958",
            email: "a@example.org",
            ..Default::default()
        };
        let identifiers = CustomerIdentifiers::parse("customer", &raw, &captures, None).unwrap();
        let old = network_key();
        let new = NetworkKey::new(2, vec![9; 32]).unwrap();
        let both = identifiers.keys_under(&[new.clone(), old.clone()]);
        assert_eq!(both.len(), 4);
        let mut expected = identifiers.keys(&old);
        expected.extend(identifiers.keys(&new));
        expected.sort();
        assert_eq!(both, expected);
        assert_eq!(
            both.iter().map(|key| key.version()).collect::<Vec<_>>(),
            [Some(1), Some(1), Some(2), Some(2)]
        );
    }

    #[test]
    fn one_phone_written_three_ways_gives_one_key() {
        let key = network_key();
        let written = [
            "+44 20 7946 0958",
            "0044 (20) 7946-0958",
            " +44.20.7946.0958 ",
        ];
        let keys: Vec<CustomerKey> = written
            .iter()
            .map(|phone| key.customer_key(&RawIdentifier::phone("phone", phone).unwrap()))
            .collect();
        assert_eq!(keys[0], keys[1]);
        assert_eq!(keys[1], keys[2]);
        assert!(CustomerKey::parse("k", keys[0].as_str()).is_ok());
        assert_eq!(keys[0].kind(), Some(IdentifierKind::Phone));
        assert!(keys[0].as_str().starts_with("ck1_phone_"));
    }

    #[test]
    fn a_national_trunk_prefix_kept_after_the_country_code_gives_the_same_key() {
        let key = network_key();
        let key_of = |phone: &str| key.customer_key(&RawIdentifier::phone("phone", phone).unwrap());
        for (usual, with_trunk_prefix) in [
            ("+44 20 7946 0958", "+44 (0)20 7946 0958"),
            ("+44 20 7946 0958", "0044 020 7946 0958"),
            ("+33 6 12 34 56 78", "+33 06 12 34 56 78"),
            ("+33 6 12 34 56 78", "0033 (0)6 12 34 56 78"),
            ("+49 30 1234 5678", "+49 030 1234 5678"),
        ] {
            assert_eq!(
                key_of(usual),
                key_of(with_trunk_prefix),
                "{with_trunk_prefix}"
            );
        }
        // In Italy the leading 0 is part of the number, not a trunk prefix.
        assert_eq!(
            RawIdentifier::phone("phone", "+39 06 1234 5678")
                .unwrap()
                .normalised,
            "+390612345678"
        );
    }

    #[test]
    fn e_mail_is_case_and_space_insensitive_and_never_rewritten() {
        let key = network_key();
        let key_of = |email: &str| key.customer_key(&RawIdentifier::email("email", email).unwrap());
        assert_eq!(key_of(" Ana@Example.COM"), key_of("ana@example.com"));
        // No provider-specific rewriting: these are different mailboxes as far as Tandem knows.
        assert_ne!(key_of("ana.b@gmail.com"), key_of("anab@gmail.com"));
        assert_ne!(key_of("ana+shop@gmail.com"), key_of("ana@gmail.com"));
        assert!(RawIdentifier::email("e", "ana\u{0}@example.com").is_err());
    }

    #[test]
    fn a_par_is_checked_and_matches_across_processors() {
        let key = network_key();
        let par = "V0010013018276458729101214380";
        let a = key.customer_key(&RawIdentifier::payment_account_reference("p", par).unwrap());
        let b = key.customer_key(
            &RawIdentifier::payment_account_reference("p", &format!(" {} ", par.to_lowercase()))
                .unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.kind(), Some(IdentifierKind::PaymentAccountReference));
        for (bad, says) in [
            ("4111111111111111", "card number"),
            ("4111 1111 1111 1111", "card number"),
            ("V001001301827645872910121438", "29"),
            ("V00100130182764587291012143800", "29"),
            ("V001001301827645872910121438!", "29"),
            ("0000123456789012345678901234A", "BIN Controller"),
        ] {
            let error = RawIdentifier::payment_account_reference("p", bad).unwrap_err();
            assert!(error.reason.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn fingerprints_of_two_processors_never_match_each_other() {
        let key = network_key();
        let adyen = RawIdentifier::card_fingerprint("c", "adyen", "fp_8a7b6c5d4e3f").unwrap();
        let stripe = RawIdentifier::card_fingerprint("c", "stripe", "fp_8a7b6c5d4e3f").unwrap();
        let adyen_again =
            RawIdentifier::card_fingerprint("c", " Adyen ", "fp_8a7b6c5d4e3f").unwrap();
        assert_ne!(key.customer_key(&adyen), key.customer_key(&stripe));
        assert_eq!(key.customer_key(&adyen), key.customer_key(&adyen_again));
    }

    #[test]
    fn kinds_and_scopes_are_separated_and_versions_never_match() {
        let key = network_key();
        let phone = RawIdentifier::phone("p", "+14155550100").unwrap();
        let card = RawIdentifier::card_fingerprint("c", "adyen", "+14155550100").unwrap();
        assert_ne!(key.customer_key(&phone), key.customer_key(&card));
        let programme = programme();
        let other = LoyaltyProgramme::new(
            "other",
            "Other",
            MemberAlphabet::Digits,
            8,
            12,
            CheckDigit::Luhn,
        )
        .unwrap();
        let member = RawIdentifier::loyalty_member("m", &programme, "79927398713").unwrap();
        let elsewhere = RawIdentifier::loyalty_member("m", &other, "79927398713").unwrap();
        assert_ne!(key.customer_key(&member), key.customer_key(&elsewhere));
        let rotated = NetworkKey::new(2, vec![7; 32]).unwrap();
        assert_ne!(key.customer_key(&phone), rotated.customer_key(&phone));
    }

    #[test]
    fn keys_parse_with_and_without_their_kind() {
        let digest = "a".repeat(64);
        let with_kind = CustomerKey::parse("k", &format!("ck1_par_{digest}")).unwrap();
        assert_eq!(
            with_kind.kind(),
            Some(IdentifierKind::PaymentAccountReference)
        );
        let legacy = CustomerKey::parse("k", &format!("ck1_{digest}")).unwrap();
        assert_eq!(legacy.kind(), None);
        for bad in [
            format!("ck1_iban_{digest}"),
            format!("ck1_par_{}", "A".repeat(64)),
            format!("ckx_par_{digest}"),
            format!("ck1_par_{}", "a".repeat(63)),
        ] {
            assert!(CustomerKey::parse("k", &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_request_may_only_send_what_its_merchant_declared() {
        let declared = Captures::default();
        let phone_only = RawCustomer {
            phone: "+14155550100",
            ..RawCustomer::default()
        };
        assert!(CustomerIdentifiers::parse("customer", &phone_only, &declared, None).is_ok());
        let card = RawCustomer {
            card_fingerprint: "fp_8a7b6c5d4e3f",
            ..RawCustomer::default()
        };
        let error = CustomerIdentifiers::parse("customer", &card, &declared, None).unwrap_err();
        assert!(
            matches!(error, IdentifierError::NotDeclared { ref field, .. } if field == "customer.card_fingerprint"),
            "{error}"
        );
        // Declared once: the processor is implied; a processor not declared is refused.
        let everything = everything();
        assert!(CustomerIdentifiers::parse("customer", &card, &everything, None).is_ok());
        let stripe = RawCustomer {
            card_processor: "stripe",
            ..card
        };
        assert!(matches!(
            CustomerIdentifiers::parse("customer", &stripe, &everything, None).unwrap_err(),
            IdentifierError::NotDeclared { .. }
        ));
        let member = RawCustomer {
            loyalty_programme_id: "coalition",
            member_number: "7992 7398 713",
            ..RawCustomer::default()
        };
        let programme = programme();
        assert!(
            CustomerIdentifiers::parse("customer", &member, &everything, Some(&programme)).is_ok()
        );
        // Not registered (the caller found no programme): refused.
        assert!(matches!(
            CustomerIdentifiers::parse("customer", &member, &everything, None).unwrap_err(),
            IdentifierError::NotDeclared { .. }
        ));
        let half = RawCustomer {
            member_number: "79927398713",
            ..RawCustomer::default()
        };
        assert!(matches!(
            CustomerIdentifiers::parse("customer", &half, &everything, Some(&programme))
                .unwrap_err(),
            IdentifierError::Invalid(_)
        ));
    }

    #[test]
    fn rejects_card_numbers_and_bad_values_naming_the_field() {
        let declared = everything();
        let parse = |raw: RawCustomer<'_>| match CustomerIdentifiers::parse(
            "customer", &raw, &declared, None,
        ) {
            Err(IdentifierError::Invalid(error)) => error,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        };
        let error = parse(RawCustomer {
            card_fingerprint: "4111 1111 1111 1111",
            ..RawCustomer::default()
        });
        assert_eq!(error.field, "customer.card_fingerprint");
        assert!(error.reason.contains("card number"));
        assert_eq!(
            parse(RawCustomer {
                phone: "020 7946 0958",
                ..RawCustomer::default()
            })
            .field,
            "customer.phone"
        );
        assert_eq!(
            parse(RawCustomer {
                email: "not-an-email",
                ..RawCustomer::default()
            })
            .field,
            "customer.email"
        );
        assert_eq!(
            parse(RawCustomer {
                phone: " ",
                ..RawCustomer::default()
            })
            .field,
            "customer"
        );
    }

    #[test]
    fn captures_overlap_on_kind_and_scope_within_the_allowed_kinds() {
        let referrer = Captures::from_tags(&["card:adyen", "par", "phone", "member:coalition"]);
        let acceptor = Captures::from_tags(&["card:stripe", "par", "email", "member:coalition"]);
        let tags =
            |captures: Vec<Capture>| captures.iter().map(Capture::to_tag).collect::<Vec<_>>();
        assert_eq!(
            tags(referrer.overlap(&acceptor, &AttributingKinds::every())),
            ["par", "member:coalition"]
        );
        let members_only = AttributingKinds::new([IdentifierKind::LoyaltyMember]);
        assert_eq!(
            tags(referrer.overlap(&acceptor, &members_only)),
            ["member:coalition"]
        );
        assert!(referrer
            .overlap(&acceptor, &AttributingKinds::new([IdentifierKind::Phone]))
            .is_empty());
        assert!(members_only.allows(Some(IdentifierKind::LoyaltyMember)));
        assert!(!members_only.allows(Some(IdentifierKind::Phone)));
        assert!(!members_only.allows(None));
        assert!(AttributingKinds::every().allows(None));
        assert!(Capture::new("c", IdentifierKind::CardFingerprint, "").is_err());
        assert!(Capture::new("c", IdentifierKind::Phone, "x").is_err());
        assert_eq!(
            Capture::from_tag("card:Adyen").unwrap().to_tag(),
            "card:adyen"
        );
    }

    #[test]
    fn debug_output_never_shows_the_raw_value() {
        let phone = RawIdentifier::phone("p", "+14155550100").unwrap();
        assert!(!format!("{phone:?}").contains("4155550100"));
        let raw = RawCustomer {
            phone: "+14155550100",
            email: "a@b.co",
            ..RawCustomer::default()
        };
        let identifiers =
            CustomerIdentifiers::parse("c", &raw, &Captures::default(), None).unwrap();
        let printed = format!("{identifiers:?}");
        assert!(!printed.contains("4155550100") && !printed.contains("a@b.co"));
        assert!(!format!("{:?}", network_key()).contains("7, 7"));
    }

    #[test]
    fn short_network_keys_are_refused() {
        assert!(NetworkKey::new(1, vec![1; 31]).is_err());
    }
}
