//! Payout accounts: where a merchant is paid. An IBAN is checked the way banks check it (its
//! country's length from the SWIFT IBAN registry, then ISO 7064 MOD 97-10: the rearranged number
//! modulo 97 is 1); a BIC by its ISO 9362 shape; the holder's name by length and characters the
//! ISO 20022 payment files accept.

use std::fmt;

use crate::text::parse_token;
use crate::ValidationError;

/// A validated IBAN, in its electronic form (no spaces, upper case).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Iban(String);

/// IBAN lengths by country, from the SWIFT IBAN registry.
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("AZ", 28),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BR", 29),
    ("BY", 28),
    ("CH", 21),
    ("CR", 22),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DK", 18),
    ("DO", 28),
    ("EE", 20),
    ("EG", 29),
    ("ES", 24),
    ("FI", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GE", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("GT", 28),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IQ", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LC", 32),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NL", 18),
    ("NO", 15),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("SA", 24),
    ("SC", 31),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("ST", 25),
    ("SV", 28),
    ("TL", 23),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("VG", 24),
    ("XK", 20),
];

impl Iban {
    /// Accepts the electronic form or the printed one (groups of four separated by spaces),
    /// in either case.
    pub fn parse(field: &str, value: &str) -> Result<Self, ValidationError> {
        let compact: String = value
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let invalid = |reason: String| ValidationError::new(field, reason);
        if compact.is_empty() {
            return Err(invalid(
                "is required: the account's IBAN, e.g. FR76 3000 6000 0112 3456 7890 189".into(),
            ));
        }
        if !compact.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(invalid("may hold only letters, digits and spaces".into()));
        }
        let country = compact.get(..2).unwrap_or_default();
        let Some(&(_, length)) = IBAN_LENGTHS.iter().find(|(code, _)| *code == country) else {
            return Err(invalid(format!(
                "starts with {country:?}, which is not a country that issues IBANs"
            )));
        };
        if compact.len() != length {
            return Err(invalid(format!(
                "has {} characters; an IBAN of {country} has {length}",
                compact.len()
            )));
        }
        if !compact[2..4].chars().all(|c| c.is_ascii_digit()) {
            return Err(invalid(
                "must have two check digits after the country code".into(),
            ));
        }
        if mod97(&compact) != 1 {
            return Err(invalid(
                "has wrong check digits: a character was mistyped or swapped".into(),
            ));
        }
        Ok(Self(compact))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn country(&self) -> &str {
        &self.0[..2]
    }

    /// The printed form: groups of four characters.
    pub fn printed(&self) -> String {
        self.0
            .as_bytes()
            .chunks(4)
            .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Display for Iban {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// ISO 7064 MOD 97-10 of an IBAN: the first four characters moved to the end, letters as
/// 10..35, the number taken modulo 97 digit by digit.
fn mod97(compact: &str) -> u32 {
    let rearranged = compact[4..].chars().chain(compact[..4].chars());
    let mut remainder = 0u32;
    for c in rearranged {
        let value = c.to_digit(36).unwrap_or(0);
        remainder = if value >= 10 {
            (remainder * 100 + value) % 97
        } else {
            (remainder * 10 + value) % 97
        };
    }
    remainder
}

/// A validated BIC (ISO 9362): bank code (4 letters), country (2 letters), location (2 letters
/// or digits), and optionally a branch (3 letters or digits).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bic(String);

impl Bic {
    pub fn parse(field: &str, value: &str) -> Result<Self, ValidationError> {
        let bic = value.trim().to_ascii_uppercase();
        let well_formed = matches!(bic.len(), 8 | 11)
            && bic[..6].chars().all(|c| c.is_ascii_uppercase())
            && bic[6..]
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        if well_formed {
            Ok(Self(bic))
        } else {
            Err(ValidationError::new(
                field,
                format!(
                    "must be a BIC of 8 or 11 characters (bank, country, location, optional branch), e.g. BNPAFRPP; got {value:?}"
                ),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The country the BIC's bank is in.
    pub fn country(&self) -> &str {
        &self.0[4..6]
    }
}

/// Where a merchant is paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutAccount {
    pub iban: Iban,
    pub bic: Bic,
    /// The account holder's name as the bank knows it: 1 to 70 characters (ISO 20022 `Nm`).
    pub holder: String,
}

impl PayoutAccount {
    pub fn parse(iban: &str, bic: &str, holder: &str) -> Result<Self, ValidationError> {
        let iban = Iban::parse("iban", iban)?;
        let bic = Bic::parse("bic", bic)?;
        let holder = parse_token("account_holder", holder, 1, 70)?;
        Ok(Self { iban, bic, holder })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ibans_are_checked_like_banks_check_them() {
        // Examples from the SWIFT IBAN registry and the European Payments Council.
        for valid in [
            "FR76 3000 6000 0112 3456 7890 189",
            "DE89370400440532013000",
            "gb29 nwbk 6016 1331 9268 19",
            "NL91ABNA0417164300",
            "BE68539007547034",
            "NO9386011117947",
            "MT84MALT011000012345MTLCAST001S",
        ] {
            let iban = Iban::parse("iban", valid).unwrap_or_else(|e| panic!("{valid}: {e}"));
            assert!(iban.as_str().chars().all(|c| c.is_ascii_alphanumeric()));
        }
        assert_eq!(
            Iban::parse("iban", "FR7630006000011234567890189")
                .unwrap()
                .printed(),
            "FR76 3000 6000 0112 3456 7890 189"
        );
        let reason = |value: &str| Iban::parse("iban", value).unwrap_err().reason;
        assert!(reason("FR76 3000 6000 0112 3456 7890 198").contains("check digits"));
        assert!(reason("DE89370400440532013001").contains("check digits"));
        assert!(reason("DE8937040044053201300").contains("22"));
        assert!(reason("XX89370400440532013000").contains("not a country"));
        assert!(reason("DE89-3704-0044").contains("letters, digits"));
        assert!(reason("").contains("required"));
    }

    #[test]
    fn bics_and_holders_are_checked() {
        assert_eq!(Bic::parse("bic", "bnpafrpp").unwrap().as_str(), "BNPAFRPP");
        assert_eq!(Bic::parse("bic", "DEUTDEFF500").unwrap().country(), "DE");
        for invalid in ["BNPAFRP", "BNPA1RPP", "BNPAFRPP5", "BNPAFRPP-00"] {
            assert!(Bic::parse("bic", invalid).is_err(), "{invalid}");
        }
        assert!(
            PayoutAccount::parse("DE89370400440532013000", "COBADEFFXXX", "Cafe Lumiere GmbH")
                .is_ok()
        );
        assert_eq!(
            PayoutAccount::parse("DE89370400440532013000", "COBADEFFXXX", " ")
                .unwrap_err()
                .field,
            "account_holder"
        );
    }
}
