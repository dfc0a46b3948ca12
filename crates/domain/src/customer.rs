//! Customer identifiers and the pseudonymous customer keys made from them.
//!
//! A raw identifier exists only inside a [`RawIdentifier`], whose `Debug` never prints the value,
//! and only for as long as it takes to compute its key:
//! `key = HMAC-SHA256(network_key[version], kind || ":" || normalised)`, written as
//! `ck<version>_<64 hex digits>`. The same customer gives the same key at every merchant, and the
//! key reveals nothing without the network key.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::text::reject_card_number;
use crate::ValidationError;

/// The kinds of identifier a checkout captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentifierKind {
    CardFingerprint,
    Phone,
    Email,
}

impl IdentifierKind {
    fn tag(self) -> &'static str {
        match self {
            Self::CardFingerprint => "card",
            Self::Phone => "phone",
            Self::Email => "email",
        }
    }
}

/// A normalised raw identifier. Its value never appears in `Debug` output, so it cannot reach a
/// log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct RawIdentifier {
    kind: IdentifierKind,
    normalised: String,
}

impl fmt::Debug for RawIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawIdentifier({:?}, <redacted>)", self.kind)
    }
}

impl RawIdentifier {
    pub fn kind(&self) -> IdentifierKind {
        self.kind
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
        // libphonenumber's rules, not hand rules: a national trunk prefix written after the
        // country code (+44 (0)20…, +33 06…) is dropped where the country drops it, and kept
        // where it belongs to the number (Italy's leading 0).
        let parsed = phonenumber::parse(None, format!("+{digits}")).map_err(|error| {
            ValidationError::new(
                field,
                format!("is not a possible phone number ({error}); send it in international format, e.g. +44 20 7946 0958"),
            )
        })?;
        let normalised = parsed.format().mode(phonenumber::Mode::E164).to_string();
        Ok(Self {
            kind: IdentifierKind::Phone,
            normalised,
        })
    }

    /// An e-mail address, trimmed and lower-cased.
    pub fn email(field: &str, value: &str) -> Result<Self, ValidationError> {
        let normalised = value.trim().to_lowercase();
        let valid = normalised.len() <= 254
            && !normalised.chars().any(char::is_whitespace)
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
            normalised,
        })
    }

    /// The payment processor's card fingerprint: an opaque token of 8 to 128 visible ASCII
    /// characters, compared exactly. A value that looks like a card number is rejected.
    pub fn card_fingerprint(field: &str, value: &str) -> Result<Self, ValidationError> {
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
            normalised: normalised.to_owned(),
        })
    }
}

/// The pseudonymous key of one customer identifier. This, never the raw identifier, is what
/// Tandem stores, publishes and matches on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CustomerKey(String);

impl CustomerKey {
    /// Accepts a key produced by [`NetworkKey::customer_key`], e.g. read back from a topic.
    pub fn parse(field: &str, value: &str) -> Result<Self, ValidationError> {
        let valid = value
            .strip_prefix("ck")
            .and_then(|rest| rest.split_once('_'))
            .is_some_and(|(version, digest)| {
                version.parse::<u16>().is_ok()
                    && digest.len() == 64
                    && digest.bytes().all(|b| b.is_ascii_hexdigit())
            });
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(ValidationError::new(
                field,
                "must be a customer key ck<version>_<64 hex digits>",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
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
    /// At least 32 bytes of secret, as HMAC-SHA256 wants.
    pub fn new(version: u16, secret: Vec<u8>) -> Result<Self, ValidationError> {
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
        mac.update(identifier.kind.tag().as_bytes());
        mac.update(b":");
        mac.update(identifier.normalised.as_bytes());
        CustomerKey(format!(
            "ck{}_{}",
            self.version,
            hex::encode(mac.finalize().into_bytes())
        ))
    }
}

/// The identifiers one checkout captured: at least one, at most one of each kind.
#[derive(Debug, Clone)]
pub struct CustomerIdentifiers(Vec<RawIdentifier>);

impl CustomerIdentifiers {
    /// Parses the optional raw fields of a request; empty strings mean absent. `field` is the
    /// request field holding them, e.g. `customer`.
    pub fn parse(
        field: &str,
        card_fingerprint: &str,
        phone: &str,
        email: &str,
    ) -> Result<Self, ValidationError> {
        let mut identifiers = Vec::with_capacity(3);
        if !card_fingerprint.trim().is_empty() {
            identifiers.push(
                RawIdentifier::card_fingerprint("card_fingerprint", card_fingerprint)
                    .map_err(|e| e.within(field))?,
            );
        }
        if !phone.trim().is_empty() {
            identifiers.push(RawIdentifier::phone("phone", phone).map_err(|e| e.within(field))?);
        }
        if !email.trim().is_empty() {
            identifiers.push(RawIdentifier::email("email", email).map_err(|e| e.within(field))?);
        }
        if identifiers.is_empty() {
            return Err(ValidationError::new(
                field,
                "must carry at least one of card_fingerprint, phone or email",
            ));
        }
        Ok(Self(identifiers))
    }

    /// The customer keys, sorted and without duplicates.
    pub fn keys(&self, network_key: &NetworkKey) -> Vec<CustomerKey> {
        let mut keys: Vec<CustomerKey> = self
            .0
            .iter()
            .map(|identifier| network_key.customer_key(identifier))
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

    fn network_key() -> NetworkKey {
        NetworkKey::new(1, vec![7; 32]).unwrap()
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
    fn e_mail_is_case_and_space_insensitive() {
        let key = network_key();
        let a = key.customer_key(&RawIdentifier::email("email", " Ana@Example.COM").unwrap());
        let b = key.customer_key(&RawIdentifier::email("email", "ana@example.com").unwrap());
        assert_eq!(a, b);
    }

    #[test]
    fn kinds_are_separated_and_versions_never_match() {
        let key = network_key();
        let phone = RawIdentifier::phone("p", "+14155550100").unwrap();
        let card = RawIdentifier::card_fingerprint("c", "+14155550100").unwrap();
        assert_ne!(key.customer_key(&phone), key.customer_key(&card));
        let rotated = NetworkKey::new(2, vec![7; 32]).unwrap();
        assert_ne!(key.customer_key(&phone), rotated.customer_key(&phone));
    }

    #[test]
    fn rejects_card_numbers_and_bad_values_naming_the_field() {
        let error =
            CustomerIdentifiers::parse("customer", "4111 1111 1111 1111", "", "").unwrap_err();
        assert_eq!(error.field, "customer.card_fingerprint");
        assert!(error.reason.contains("card number"));
        assert_eq!(
            CustomerIdentifiers::parse("customer", "", "020 7946 0958", "")
                .unwrap_err()
                .field,
            "customer.phone"
        );
        assert_eq!(
            CustomerIdentifiers::parse("customer", "", "", "not-an-email")
                .unwrap_err()
                .field,
            "customer.email"
        );
        assert_eq!(
            CustomerIdentifiers::parse("customer", "", " ", "")
                .unwrap_err()
                .field,
            "customer"
        );
    }

    #[test]
    fn debug_output_never_shows_the_raw_value() {
        let phone = RawIdentifier::phone("p", "+14155550100").unwrap();
        assert!(!format!("{phone:?}").contains("4155550100"));
        let identifiers = CustomerIdentifiers::parse("c", "", "+14155550100", "a@b.co").unwrap();
        let printed = format!("{identifiers:?}");
        assert!(!printed.contains("4155550100") && !printed.contains("a@b.co"));
        assert!(!format!("{:?}", network_key()).contains("7, 7"));
    }

    #[test]
    fn short_network_keys_are_refused() {
        assert!(NetworkKey::new(1, vec![1; 31]).is_err());
    }
}
