//! `tandem.v1.IdentifierKind`, `IdentifierCapture` and `LoyaltyProgramme` <-> domain types.

use tandem_domain::customer::{AttributingKinds, Capture, Captures, IdentifierKind};
use tandem_domain::loyalty::{CheckDigit, LoyaltyProgramme, MemberAlphabet};
use tandem_domain::ValidationError;
use tandem_proto::v1 as pb;

pub fn kind_from_proto(field: &str, kind: i32) -> Result<IdentifierKind, ValidationError> {
    match pb::IdentifierKind::try_from(kind) {
        Ok(pb::IdentifierKind::CardFingerprint) => Ok(IdentifierKind::CardFingerprint),
        Ok(pb::IdentifierKind::PaymentAccountReference) => {
            Ok(IdentifierKind::PaymentAccountReference)
        }
        Ok(pb::IdentifierKind::Phone) => Ok(IdentifierKind::Phone),
        Ok(pb::IdentifierKind::Email) => Ok(IdentifierKind::Email),
        Ok(pb::IdentifierKind::LoyaltyMember) => Ok(IdentifierKind::LoyaltyMember),
        Ok(pb::IdentifierKind::Unspecified) | Err(_) => Err(ValidationError::new(
            field,
            format!("must be one of CARD_FINGERPRINT, PAYMENT_ACCOUNT_REFERENCE, PHONE, EMAIL or LOYALTY_MEMBER, got {kind}"),
        )),
    }
}

pub fn kind_to_proto(kind: IdentifierKind) -> pb::IdentifierKind {
    match kind {
        IdentifierKind::CardFingerprint => pb::IdentifierKind::CardFingerprint,
        IdentifierKind::PaymentAccountReference => pb::IdentifierKind::PaymentAccountReference,
        IdentifierKind::Phone => pb::IdentifierKind::Phone,
        IdentifierKind::Email => pb::IdentifierKind::Email,
        IdentifierKind::LoyaltyMember => pb::IdentifierKind::LoyaltyMember,
    }
}

/// A kind as stored in a table (its key tag), as the API shows it; UNSPECIFIED when unknown.
pub fn kind_tag_to_proto(tag: Option<&str>) -> i32 {
    tag.and_then(IdentifierKind::from_tag)
        .map_or(pb::IdentifierKind::Unspecified, kind_to_proto) as i32
}

pub fn attributing_kinds_from_proto(
    field: &str,
    kinds: &[i32],
) -> Result<AttributingKinds, ValidationError> {
    let kinds = kinds
        .iter()
        .enumerate()
        .map(|(index, kind)| kind_from_proto(&format!("{field}[{index}]"), *kind))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AttributingKinds::new(kinds))
}

pub fn attributing_kinds_to_proto(kinds: &AttributingKinds) -> Vec<i32> {
    kinds
        .kinds()
        .iter()
        .map(|kind| kind_to_proto(*kind) as i32)
        .collect()
}

pub fn captures_from_proto(
    field: &str,
    captures: &[pb::IdentifierCapture],
) -> Result<Captures, ValidationError> {
    let captures = captures
        .iter()
        .enumerate()
        .map(|(index, capture)| {
            let field = format!("{field}[{index}]");
            let kind = kind_from_proto(&format!("{field}.kind"), capture.kind)?;
            Capture::new(&field, kind, &capture.scope)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Captures::new(field, captures)
}

pub fn capture_to_proto(capture: &Capture) -> pb::IdentifierCapture {
    pb::IdentifierCapture {
        kind: kind_to_proto(capture.kind) as i32,
        scope: capture.scope.clone(),
    }
}

pub fn captures_to_proto<'a>(
    captures: impl IntoIterator<Item = &'a Capture>,
) -> Vec<pb::IdentifierCapture> {
    captures.into_iter().map(capture_to_proto).collect()
}

pub fn programme_from_proto(
    request: &pb::RegisterLoyaltyProgrammeRequest,
) -> Result<LoyaltyProgramme, ValidationError> {
    let format = request.member_number_format.as_ref().ok_or_else(|| {
        ValidationError::new(
            "member_number_format",
            "is required: alphabet, min_length, max_length and check_digit",
        )
    })?;
    let alphabet = match pb::MemberAlphabet::try_from(format.alphabet) {
        Ok(pb::MemberAlphabet::Unspecified | pb::MemberAlphabet::Digits) => MemberAlphabet::Digits,
        Ok(pb::MemberAlphabet::Alphanumeric) => MemberAlphabet::Alphanumeric,
        Err(_) => {
            return Err(ValidationError::new(
                "member_number_format.alphabet",
                "must be DIGITS or ALPHANUMERIC",
            ))
        }
    };
    let check_digit = match pb::CheckDigitScheme::try_from(format.check_digit) {
        Ok(pb::CheckDigitScheme::Unspecified | pb::CheckDigitScheme::None) => CheckDigit::None,
        Ok(pb::CheckDigitScheme::Luhn) => CheckDigit::Luhn,
        Ok(pb::CheckDigitScheme::Iso7064Mod112) => CheckDigit::Iso7064Mod11_2,
        Err(_) => {
            return Err(ValidationError::new(
                "member_number_format.check_digit",
                "must be NONE, LUHN or ISO7064_MOD11_2",
            ))
        }
    };
    LoyaltyProgramme::new(
        &request.programme_id,
        &request.display_name,
        alphabet,
        format.min_length,
        format.max_length,
        check_digit,
    )
}

pub fn member_number_format_to_proto(programme: &LoyaltyProgramme) -> pb::MemberNumberFormat {
    pb::MemberNumberFormat {
        alphabet: match programme.alphabet {
            MemberAlphabet::Digits => pb::MemberAlphabet::Digits,
            MemberAlphabet::Alphanumeric => pb::MemberAlphabet::Alphanumeric,
        } as i32,
        min_length: programme.min_length,
        max_length: programme.max_length,
        check_digit: match programme.check_digit {
            CheckDigit::None => pb::CheckDigitScheme::None,
            CheckDigit::Luhn => pb::CheckDigitScheme::Luhn,
            CheckDigit::Iso7064Mod11_2 => pb::CheckDigitScheme::Iso7064Mod112,
        } as i32,
    }
}
