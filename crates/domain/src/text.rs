//! Free-text fields a POS sends (transaction ids, references, idempotency keys), and the guard
//! that keeps card numbers out of them.

use crate::ValidationError;

/// True if `value` contains a run of 13 to 19 digits (spaces and dashes between digits allowed)
/// that passes the Luhn check: that is what a payment card number looks like, and such a value
/// must never be stored.
pub fn contains_card_number(value: &str) -> bool {
    let mut digits: Vec<u8> = Vec::with_capacity(value.len());
    let flush = |digits: &mut Vec<u8>| -> bool {
        let found = (13..=19).contains(&digits.len()) && luhn_valid(digits);
        digits.clear();
        found
    };
    let bytes = value.as_bytes();
    for (index, &byte) in bytes.iter().enumerate() {
        if byte.is_ascii_digit() {
            digits.push(byte - b'0');
        } else if (byte == b' ' || byte == b'-')
            && !digits.is_empty()
            && bytes.get(index + 1).is_some_and(u8::is_ascii_digit)
        {
            // A separator inside a digit run, as in "4111 1111 1111 1111".
        } else if flush(&mut digits) {
            return true;
        }
    }
    flush(&mut digits)
}

pub(crate) fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(position, &digit)| {
            let digit = u32::from(digit);
            if position % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                digit
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Checks a POS-supplied token such as a transaction id or an idempotency key: trimmed,
/// `min_len..=max_len` characters, printable ASCII.
pub fn parse_token(
    field: &str,
    value: &str,
    min_len: usize,
    max_len: usize,
) -> Result<String, ValidationError> {
    let trimmed = value.trim();
    if trimmed.len() < min_len || trimmed.len() > max_len {
        return Err(ValidationError::new(
            field,
            format!(
                "must be {min_len} to {max_len} characters, got {}",
                trimmed.len()
            ),
        ));
    }
    if !trimmed.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(ValidationError::new(
            field,
            "must contain printable ASCII characters only",
        ));
    }
    Ok(trimmed.to_owned())
}

/// Rejects a value that contains something shaped like a card number. Used on the card
/// fingerprint and on human-typed references, where a card number is most likely to be pasted by
/// mistake. Machine-generated numeric ids (transaction ids) are not checked: one in ten 16-digit
/// ids passes Luhn by chance, and rejecting them would break honest integrations.
pub fn reject_card_number(field: &str, value: &str) -> Result<(), ValidationError> {
    if contains_card_number(value) {
        return Err(ValidationError::new(
            field,
            "looks like a payment card number; send the processor's card fingerprint, never the card number",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn detects_card_numbers_with_and_without_separators() {
        assert!(contains_card_number("4111111111111111"));
        assert!(contains_card_number("4111 1111 1111 1111"));
        assert!(contains_card_number("4111-1111-1111-1111"));
        assert!(contains_card_number("receipt 5500005555555559 thanks"));
        assert!(contains_card_number("378282246310005")); // 15-digit Amex test number
    }

    #[test]
    fn leaves_ordinary_tokens_alone() {
        assert!(!contains_card_number("4111111111111112")); // fails Luhn
        assert!(!contains_card_number("txn-2026-11-24-000123"));
        assert!(!contains_card_number("411111111111")); // 12 digits: too short
        assert!(!contains_card_number(""));
    }

    #[test]
    fn parse_token_names_the_field() {
        let error = parse_token("transaction_id", " ", 1, 128).unwrap_err();
        assert_eq!(error.field, "transaction_id");
        let error = reject_card_number("referrer_reference", "4111111111111111").unwrap_err();
        assert!(error.reason.contains("card number"));
        assert_eq!(
            parse_token("transaction_id", " t-1 ", 1, 128).unwrap(),
            "t-1"
        );
    }
}
