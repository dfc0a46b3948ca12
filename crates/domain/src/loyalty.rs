//! Loyalty and coalition programmes: an operator registers each programme once, with the shape of
//! its member numbers, so that every till in the network normalises and checks them the same way.

use std::fmt;

use crate::text::luhn_valid;
use crate::ValidationError;

/// Which characters a programme's member numbers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberAlphabet {
    /// `0`-`9` only.
    Digits,
    /// `0`-`9` and `A`-`Z` (lower case is accepted and upper-cased).
    Alphanumeric,
}

/// The check character a programme puts at the end of its member numbers, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckDigit {
    None,
    /// The Luhn (mod 10) digit, as on most plastic loyalty cards.
    Luhn,
    /// ISO/IEC 7064 MOD 11-2: digits, the last one `0`-`9` or `X`.
    Iso7064Mod11_2,
}

impl CheckDigit {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Luhn => "luhn",
            Self::Iso7064Mod11_2 => "iso7064_mod11_2",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Self::None),
            "luhn" => Some(Self::Luhn),
            "iso7064_mod11_2" => Some(Self::Iso7064Mod11_2),
            _ => None,
        }
    }

    fn holds(self, number: &str) -> bool {
        match self {
            Self::None => true,
            Self::Luhn => {
                let digits: Vec<u8> = number.bytes().map(|b| b.wrapping_sub(b'0')).collect();
                digits.iter().all(|d| *d <= 9) && luhn_valid(&digits)
            }
            Self::Iso7064Mod11_2 => {
                let Some((body, check)) = number.split_at_checked(number.len().saturating_sub(1))
                else {
                    return false;
                };
                if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
                    return false;
                }
                let total = body
                    .bytes()
                    .fold(0u32, |total, b| ((total + u32::from(b - b'0')) * 2) % 11);
                let expected = (12 - total) % 11;
                match check {
                    "X" => expected == 10,
                    digit => digit.parse::<u32>().is_ok_and(|d| d == expected),
                }
            }
        }
    }
}

/// A programme id or a payment processor name: 1 to 64 characters of `a`-`z`, `0`-`9`, `-`,
/// `_` and `.`, compared after trimming and lower-casing (so `Adyen` and `adyen` are one).
pub fn parse_scope(field: &str, value: &str) -> Result<String, ValidationError> {
    let scope = value.trim().to_ascii_lowercase();
    let valid = (1..=64).contains(&scope.len())
        && scope.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        });
    if valid {
        Ok(scope)
    } else {
        Err(ValidationError::new(
            field,
            format!("must be 1 to 64 characters of a-z, 0-9, '-', '_' and '.', got {value:?}"),
        ))
    }
}

/// A registered programme and the shape of its member numbers.
#[derive(Clone, PartialEq, Eq)]
pub struct LoyaltyProgramme {
    pub programme_id: String,
    pub display_name: String,
    pub alphabet: MemberAlphabet,
    pub min_length: u32,
    pub max_length: u32,
    pub check_digit: CheckDigit,
}

impl fmt::Debug for LoyaltyProgramme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "LoyaltyProgramme({}, {:?}, {}..={}, {})",
            self.programme_id,
            self.alphabet,
            self.min_length,
            self.max_length,
            self.check_digit.name()
        )
    }
}

impl LoyaltyProgramme {
    /// Checks a programme definition as an operator sends it.
    pub fn new(
        programme_id: &str,
        display_name: &str,
        alphabet: MemberAlphabet,
        min_length: u32,
        max_length: u32,
        check_digit: CheckDigit,
    ) -> Result<Self, ValidationError> {
        let programme_id = parse_scope("programme_id", programme_id)?;
        let display_name = crate::text::parse_text("display_name", display_name, 200)?;
        if !(4..=32).contains(&min_length) || !(min_length..=32).contains(&max_length) {
            return Err(ValidationError::new(
                "member_number_format",
                format!("lengths must satisfy 4 <= min_length <= max_length <= 32, got {min_length}..{max_length}"),
            ));
        }
        if check_digit != CheckDigit::None && alphabet != MemberAlphabet::Digits {
            return Err(ValidationError::new(
                "member_number_format.check_digit",
                "a check digit needs a digits-only alphabet",
            ));
        }
        Ok(Self {
            programme_id,
            display_name,
            alphabet,
            min_length,
            max_length,
            check_digit,
        })
    }

    /// A member number of this programme as the till read it, normalised: surrounding
    /// whitespace, inner spaces and dashes dropped, letters upper-cased. Then checked against the
    /// programme's alphabet, lengths and check digit. A value that looks like a payment card number
    /// (13 to 19 digits in a card network's range, passing Luhn) is refused whatever the programme
    /// says: a till must never send a card number as a member number.
    pub fn normalise_member_number(
        &self,
        field: &str,
        value: &str,
    ) -> Result<String, ValidationError> {
        let number: String = value
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if looks_like_card_number(&number) {
            return Err(ValidationError::new(
                field,
                "looks like a payment card number; send the loyalty member number printed on the member's card, never a card number",
            ));
        }
        let alphabet_ok = match self.alphabet {
            MemberAlphabet::Digits => number.bytes().all(|b| b.is_ascii_digit()),
            MemberAlphabet::Alphanumeric => number
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()),
        };
        let length = u32::try_from(number.len()).unwrap_or(u32::MAX);
        let format_ok = alphabet_ok
            && (self.min_length..=self.max_length).contains(&length)
            // ISO 7064 MOD 11-2 ends in a digit or X.
            || (self.check_digit == CheckDigit::Iso7064Mod11_2
                && (self.min_length..=self.max_length).contains(&length)
                && number.bytes().rev().skip(1).all(|b| b.is_ascii_digit())
                && number.ends_with('X'));
        if !format_ok {
            return Err(ValidationError::new(
                field,
                format!(
                    "is not a member number of programme {}: it takes {} to {} {}",
                    self.programme_id,
                    self.min_length,
                    self.max_length,
                    match self.alphabet {
                        MemberAlphabet::Digits => "digits",
                        MemberAlphabet::Alphanumeric => "letters and digits",
                    }
                ),
            ));
        }
        if !self.check_digit.holds(&number) {
            return Err(ValidationError::new(
                field,
                format!(
                    "fails programme {}'s {} check digit; the number was probably mistyped",
                    self.programme_id,
                    self.check_digit.name()
                ),
            ));
        }
        Ok(number)
    }
}

/// 13 to 19 digits, a first digit in the ranges ISO/IEC 7812 gives the card networks (2 to 6),
/// and a valid Luhn digit: a payment card number.
pub fn looks_like_card_number(value: &str) -> bool {
    (13..=19).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_digit())
        && matches!(value.as_bytes().first(), Some(b'2'..=b'6'))
        && luhn_valid(&value.bytes().map(|b| b - b'0').collect::<Vec<u8>>())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn programme(check_digit: CheckDigit) -> LoyaltyProgramme {
        LoyaltyProgramme::new(
            "Coalition-Plus",
            "Coalition Plus",
            MemberAlphabet::Digits,
            8,
            16,
            check_digit,
        )
        .unwrap()
    }

    #[test]
    fn luhn_member_numbers_are_normalised_and_checked() {
        let programme = programme(CheckDigit::Luhn);
        assert_eq!(programme.programme_id, "coalition-plus");
        // 7992739871 + Luhn digit 3.
        assert_eq!(
            programme
                .normalise_member_number("m", " 7992-7398 713 ")
                .unwrap(),
            "79927398713"
        );
        let typo = programme
            .normalise_member_number("m", "79927398714")
            .unwrap_err();
        assert!(typo.reason.contains("check digit"), "{typo}");
        assert!(programme.normalise_member_number("m", "1234567").is_err());
    }

    #[test]
    fn iso_7064_mod_11_2_accepts_x() {
        let programme = programme(CheckDigit::Iso7064Mod11_2);
        // The ISO 7064 example: 079 + check digit X.
        assert!(CheckDigit::Iso7064Mod11_2.holds("079X"));
        // An ORCID iD's digits: 0000-0002-1825-0097.
        assert_eq!(
            programme
                .normalise_member_number("m", "0000-0002-1825-0097")
                .unwrap(),
            "0000000218250097"
        );
        assert!(programme
            .normalise_member_number("m", "0000000218250098")
            .is_err());
        assert!(programme
            .normalise_member_number("m", "000000021825009x")
            .is_err());
    }

    #[test]
    fn card_numbers_are_refused_even_when_the_format_fits() {
        let programme = programme(CheckDigit::None);
        let error = programme
            .normalise_member_number("m", "4111 1111 1111 1111")
            .unwrap_err();
        assert!(error.reason.contains("card number"));
        // The same shape outside the card networks' ranges is a member number.
        assert!(programme
            .normalise_member_number("m", "9111111111111116")
            .is_ok());
    }

    #[test]
    fn definitions_are_checked() {
        for (id, name, min, max, alphabet, check) in [
            ("", "n", 8, 10, MemberAlphabet::Digits, CheckDigit::None),
            ("a b", "n", 8, 10, MemberAlphabet::Digits, CheckDigit::None),
            ("p", "", 8, 10, MemberAlphabet::Digits, CheckDigit::None),
            ("p", "n", 3, 10, MemberAlphabet::Digits, CheckDigit::None),
            ("p", "n", 10, 8, MemberAlphabet::Digits, CheckDigit::None),
            ("p", "n", 8, 33, MemberAlphabet::Digits, CheckDigit::None),
            (
                "p",
                "n",
                8,
                10,
                MemberAlphabet::Alphanumeric,
                CheckDigit::Luhn,
            ),
        ] {
            assert!(
                LoyaltyProgramme::new(id, name, alphabet, min, max, check).is_err(),
                "{id:?} {name:?} {min} {max}"
            );
        }
    }
}
