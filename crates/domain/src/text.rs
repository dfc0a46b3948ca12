//! Free-text fields a POS, a partner or an operator sends (transaction ids, references,
//! idempotency keys, names, reasons, descriptions), and the guard that keeps customer
//! identifiers out of them.
//!
//! A raw card number, phone number or e-mail address must reach Tandem only in the customer
//! fields, which the gateway turns into pseudonymous keys at once. Free text is stored and
//! published as given, so every free-text field refuses a value with something shaped like one
//! of them ([`reject_personal_data`]). The shapes, and why they are drawn where they are:
//!
//! - **Card number**: a run of 13 to 19 digits (single spaces or dashes between digits allowed)
//!   whose first digit is a banking or financial major industry identifier (2 to 6, ISO/IEC
//!   7812: Mastercard, Amex, JCB, Diners, Visa, Maestro, Discover, UnionPay) and that passes the
//!   Luhn check. Zero-padded or 7/8/9/1-led numeric ids are never card numbers; a 2-6-led
//!   numeric id of card length passes Luhn one time in ten, so integrations that number
//!   receipts that way should separate the digits (`/`, `:`, `_` or a letter) into shorter runs.
//! - **E-mail address**: `local@domain.tld`, a top-level domain of two letters or more.
//! - **Phone number**: international (`+` and 8 to 15 digits; `00`, a country code and 8 to 15
//!   digits written in groups), or national shapes with the separators people type: an area code in
//!   parentheses (`(415) 555-2671`), North American `415-555-2671` / `1-800-555-0199`, or a
//!   trunk-`0` number in groups (`020 7946 0958`, `06 12 34 56 78`). Bare digit runs without
//!   `+`, parentheses or grouping are not refused: receipt and order numbers look like that.

use crate::ValidationError;

/// True if `value` contains a card number: a run of 13 to 19 digits that starts with a card
/// major industry identifier (2 to 6) and passes the Luhn check, standing on its own (not glued
/// to a letter, as the digits of a hex token or a UUID are), and if written with spaces or
/// dashes, grouped as cards are printed (4-4-4-4[-1..4], or 4-6-5 / 4-6-4). Such a value must
/// never be stored.
pub fn contains_card_number(value: &str) -> bool {
    let bytes = value.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        if !bytes[index].is_ascii_digit() {
            index += 1;
            continue;
        }
        // A maximal run: digits, and single spaces or dashes between digits.
        let start = index;
        let mut digits: Vec<u8> = Vec::new();
        let mut groups: Vec<usize> = vec![0];
        while index < bytes.len() {
            let byte = bytes[index];
            if byte.is_ascii_digit() {
                digits.push(byte - b'0');
                *groups.last_mut().unwrap_or(&mut 0) += 1;
            } else if (byte == b' ' || byte == b'-')
                && bytes.get(index + 1).is_some_and(u8::is_ascii_digit)
            {
                groups.push(0);
            } else {
                break;
            }
            index += 1;
        }
        let standalone = !continues_token(bytes, start.checked_sub(1), index);
        let printed_as_a_card = match groups.as_slice() {
            [_] => true,
            [4, 6, 5] | [4, 6, 4] => true,
            [init @ .., last] => init.iter().all(|g| *g == 4) && (1..=4).contains(last),
            [] => false,
        };
        if standalone
            && printed_as_a_card
            && (13..=19).contains(&digits.len())
            && (2..=6).contains(&digits[0])
            && luhn_valid(&digits)
        {
            return true;
        }
    }
    false
}

/// Whether the digit run ending before `end` (or starting after `start`) continues a longer
/// token: a letter right next to it, or `-`, `_` or `.` followed (preceded) by a letter or digit,
/// as in UUIDs, hex tokens and `txn-…` ids.
fn continues_token(bytes: &[u8], before_start: Option<usize>, end: usize) -> bool {
    let joiner = |b: u8| b == b'-' || b == b'_' || b == b'.';
    let before = before_start.is_some_and(|at| {
        bytes[at].is_ascii_alphabetic()
            || (joiner(bytes[at]) && at > 0 && bytes[at - 1].is_ascii_alphanumeric())
    });
    let after = bytes.get(end).is_some_and(|&b| {
        b.is_ascii_alphabetic()
            || (joiner(b) && bytes.get(end + 1).is_some_and(u8::is_ascii_alphanumeric))
    });
    before || after
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
    reject_personal_data(field, trimmed)?;
    Ok(trimmed.to_owned())
}

/// Checks a human-readable name or description: trimmed, 1 to `max_chars` characters, no
/// control characters, nothing shaped like a customer identifier.
pub fn parse_text(field: &str, value: &str, max_chars: usize) -> Result<String, ValidationError> {
    let trimmed = value.trim();
    let chars = trimmed.chars().count();
    if chars == 0 || chars > max_chars {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to {max_chars} characters, got {chars}"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must not contain control characters (line breaks, tabs)",
        ));
    }
    reject_personal_data(field, trimmed)?;
    Ok(trimmed.to_owned())
}

/// What a span or log line may record of an id field as the client sent it, before it was
/// validated: the value if it is shaped like an id (1 to 100 letters, digits and `_ - : . /`,
/// nothing shaped like a customer identifier), else a placeholder. Spans name the ids a call
/// was about; a refused call's "id" could be anything the till typed.
pub fn loggable_id(value: &str) -> &str {
    let id_shaped = (1..=100).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-:./".contains(&b))
        && reject_personal_data("", value).is_ok();
    if id_shaped {
        value
    } else if value.is_empty() {
        ""
    } else {
        "<not an id>"
    }
}

/// Refuses a free-text value with something shaped like a card number, an e-mail address or a
/// phone number in it (see the module's documentation for the shapes), naming the field and
/// saying where such a value belongs.
pub fn reject_personal_data(field: &str, value: &str) -> Result<(), ValidationError> {
    reject_card_number(field, value)?;
    if contains_email_address(value) {
        return Err(ValidationError::new(
            field,
            "looks like it contains an e-mail address; free text is stored and published as given, so customer identifiers must never be put there (send a customer's e-mail in the customer field, which is pseudonymised)",
        ));
    }
    if contains_phone_number(value) {
        return Err(ValidationError::new(
            field,
            "looks like it contains a phone number; free text is stored and published as given, so customer identifiers must never be put there (send a customer's phone in the customer field, which is pseudonymised)",
        ));
    }
    Ok(())
}

/// True if `value` contains `local@domain.tld` (a dotted domain whose last label is two letters
/// or more).
pub fn contains_email_address(value: &str) -> bool {
    let bytes = value.as_bytes();
    let local_char = |b: u8| b.is_ascii_alphanumeric() || b"._%+-!#$&'*/=?^`{|}~".contains(&b);
    let domain_char = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-';
    bytes.iter().enumerate().any(|(at, &b)| {
        if b != b'@' || at == 0 || !local_char(bytes[at - 1]) {
            return false;
        }
        let domain: Vec<u8> = bytes[at + 1..]
            .iter()
            .copied()
            .take_while(|&b| domain_char(b))
            .collect();
        let domain = String::from_utf8_lossy(&domain);
        let domain = domain.trim_end_matches(['.', '-']);
        let labels: Vec<&str> = domain.split('.').collect();
        labels.len() >= 2
            && labels.iter().all(|label| !label.is_empty())
            && labels
                .last()
                .is_some_and(|tld| tld.len() >= 2 && tld.bytes().all(|b| b.is_ascii_alphabetic()))
    })
}

/// True if `value` contains something shaped like a phone number (see the module's
/// documentation).
pub fn contains_phone_number(value: &str) -> bool {
    let chars: Vec<char> = value.chars().collect();
    let mut index = 0;
    while index < chars.len() {
        let c = chars[index];
        let joiner = |c: char| c == '-' || c == '_' || c == '.';
        // Not the inside of a longer token ("abc123", "d79bdee2-0102-…").
        let inside_token = index > 0
            && (chars[index - 1].is_ascii_alphanumeric()
                || (joiner(chars[index - 1])
                    && index > 1
                    && chars[index - 2].is_ascii_alphanumeric()));
        let starts = (c.is_ascii_digit() || c == '+' || c == '(') && !inside_token;
        if !starts {
            index += 1;
            continue;
        }
        let (run, end) = number_run(&chars, index);
        if run.is_phone() {
            return true;
        }
        index = end.max(index + 1);
    }
    false
}

/// Digits with the separators people type in phone numbers, read from one starting point.
struct NumberRun {
    plus: bool,
    parenthesised: bool,
    groups: Vec<String>,
    separators: Vec<char>,
}

/// Reads a run starting at `start`: an optional `+`, digit groups separated by one space, dot
/// or dash, parentheses around a group. Returns the run and the index after it.
fn number_run(chars: &[char], start: usize) -> (NumberRun, usize) {
    let mut run = NumberRun {
        plus: false,
        parenthesised: false,
        groups: Vec::new(),
        separators: Vec::new(),
    };
    let mut index = start;
    if chars.get(index) == Some(&'+') {
        run.plus = true;
        index += 1;
        if chars.get(index) == Some(&' ') {
            index += 1;
        }
    }
    let mut group = String::new();
    let mut open = false;
    while let Some(&c) = chars.get(index) {
        match c {
            '0'..='9' => group.push(c),
            '(' if group.is_empty() && !open => open = true,
            ')' if open && !group.is_empty() => {
                open = false;
                run.parenthesised = true;
                run.groups.push(std::mem::take(&mut group));
                // "(415) 555" or "(415)555": a space after the parenthesis is part of it.
                if chars.get(index + 1) == Some(&' ') {
                    index += 1;
                }
                run.separators.push(' ');
            }
            ' ' | '.' | '-'
                if !group.is_empty()
                    && chars
                        .get(index + 1)
                        .is_some_and(|next| next.is_ascii_digit() || *next == '(') =>
            {
                run.groups.push(std::mem::take(&mut group));
                run.separators.push(c);
            }
            _ => break,
        }
        index += 1;
    }
    if !group.is_empty() {
        run.groups.push(group);
    } else if run.separators.len() > run.groups.len().saturating_sub(1) {
        run.separators.pop();
    }
    // Digits glued to a letter after them ("555-2671x") are still a run; a run that ends
    // inside a word ("2671abc") is part of an id, not a phone number.
    let glued = chars.get(index).is_some_and(|c| {
        c.is_ascii_alphabetic()
            || (matches!(c, '-' | '_' | '.')
                && chars
                    .get(index + 1)
                    .is_some_and(char::is_ascii_alphanumeric))
    });
    if glued {
        run.groups.clear();
    }
    (run, index)
}

impl NumberRun {
    fn digits(&self) -> String {
        self.groups.concat()
    }

    fn is_phone(&self) -> bool {
        let digits = self.digits();
        let count = digits.len();
        if count == 0 {
            return false;
        }
        if self.plus {
            return (8..=15).contains(&count);
        }
        // `00` and a country code, grouped as people write phone numbers. Ungrouped `00…` runs
        // are zero-padded ids as often as numbers, and are let through.
        if let Some(international) = digits.strip_prefix("00") {
            if (10..=17).contains(&count)
                && !international.starts_with('0')
                && self.groups.len() >= 2
            {
                return true;
            }
        }
        if self.parenthesised && (7..=15).contains(&count) && self.groups.len() >= 2 {
            return true;
        }
        let lengths: Vec<usize> = self.groups.iter().map(String::len).collect();
        let one_separator = self.separators.windows(2).all(|pair| pair[0] == pair[1]);
        if self.groups.len() >= 2 && one_separator {
            if lengths == [3, 3, 4] || (lengths == [1, 3, 3, 4] && digits.starts_with('1')) {
                return true;
            }
            if digits.starts_with('0')
                && !digits.starts_with("00")
                && (9..=12).contains(&count)
                && lengths.iter().all(|length| (2..=6).contains(length))
            {
                return true;
            }
        }
        false
    }
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
    fn uuids_and_hex_tokens_are_not_card_numbers() {
        // Digit runs inside UUIDs, however they fall, are glued to hex letters or grouped
        // as no card is printed (found by the benchmark's UUID idempotency keys).
        for value in [
            "a1b2c3d4-4111-1111-1111-111111111111",
            "4111-1111-1111-1111-11111111111a",
            "abcd1234-5500-0055-5555-5559abcdef12",
            "12345678-4111-1111-1111-1111e2b3c4d5",
            "deadbeef4111111111111111",
        ] {
            assert!(!contains_card_number(value), "{value}");
        }
        // Cards as people print them are still found.
        for value in [
            "4111 1111 1111 1111",
            "3782 822463 10005",
            "card: 4111-1111-1111-1111.",
        ] {
            assert!(contains_card_number(value), "{value}");
        }
        // Random UUIDs never trip the guard.
        for _ in 0..20_000 {
            let id = uuid::Uuid::new_v4().to_string();
            assert!(reject_personal_data("idempotency_key", &id).is_ok(), "{id}");
        }
    }

    #[test]
    fn card_numbers_start_with_a_card_industry_digit() {
        // 16 digits passing Luhn, but led by 0, 1, 7, 8 or 9: receipt numbers, not cards.
        assert!(luhn_valid(&[
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
        ]));
        assert!(!contains_card_number("0000000000000000"));
        assert!(!contains_card_number("7111111111111114"));
        assert!(contains_card_number("6011111111111117")); // Discover test number
        assert!(contains_card_number("3530111333300000")); // JCB test number
    }

    #[test]
    fn detects_email_addresses() {
        for value in [
            "b.martin@example.com",
            "ref for jane.doe+tag@mail.example.co.uk please",
            "x@y.io",
        ] {
            assert!(contains_email_address(value), "{value}");
        }
        for value in [
            "@handle",
            "user@localhost",
            "a@b.c1",
            "ref@",
            "2026@11.24",
            "a @b.com",
        ] {
            assert!(!contains_email_address(value), "{value}");
        }
    }

    #[test]
    fn detects_phone_numbers_in_the_shapes_people_type() {
        for value in [
            "+33612345678",
            "+33 6 12 34 56 78",
            "+1 (415) 555-2671",
            "call +44 20 7946 0958",
            "0044 20 7946 0958",
            "(415) 555-2671",
            "(415)555-2671",
            "415-555-2671",
            "415.555.2671",
            "1-800-555-0199",
            "020 7946 0958",
            "07700 900123",
            "06 12 34 56 78",
            "ref:06.12.34.56.78",
        ] {
            assert!(contains_phone_number(value), "{value}");
        }
    }

    #[test]
    fn leaves_ids_dates_and_amounts_alone() {
        for value in [
            "txn-2026-11-24-000123",
            "2026-11-24",
            "order 4155552671",
            "000000123456789",
            "0012345678",
            "00447946095812",
            "R-20261124-0001",
            "f47ac10b-58cc-4372-a567-0e02b2c3d479",
            "12345678-1234-1234-1234-123456789012",
            "POS7-415-555-2671x",
            "C-0001",
            "batch 12 of 30",
            "v1.2.3",
            "refund of 12.50 EUR",
            "A+B 2026",
        ] {
            assert!(!contains_phone_number(value), "{value}");
            assert!(
                reject_personal_data("transaction_id", value).is_ok(),
                "{value}"
            );
        }
    }

    #[test]
    fn the_refusal_names_the_field_and_says_where_identifiers_go() {
        let error = reject_personal_data("referrer_reference", "for jane@example.com").unwrap_err();
        assert_eq!(error.field, "referrer_reference");
        assert!(error.reason.contains("e-mail"));
        let error = parse_token("transaction_id", "+33 6 12 34 56 78", 1, 128).unwrap_err();
        assert!(error.reason.contains("phone number"));
        let error = parse_text("display_name", "Café 4111 1111 1111 1111", 200).unwrap_err();
        assert!(error.reason.contains("card number"));
        assert_eq!(
            parse_text("display_name", " Café Lumière ", 200).unwrap(),
            "Café Lumière"
        );
        assert!(parse_text("display_name", "two\nlines", 200).is_err());
    }

    #[test]
    fn only_id_shaped_values_are_logged() {
        assert_eq!(loggable_id("mer_0123abcd"), "mer_0123abcd");
        assert_eq!(
            loggable_id("monthly:Europe/Paris:2026-03-01"),
            "monthly:Europe/Paris:2026-03-01"
        );
        assert_eq!(loggable_id(""), "");
        for raw in [
            "+33698765432",
            "jane@example.com",
            "4111111111111111",
            "a b",
            "06.12.34.56.78",
        ] {
            assert_eq!(loggable_id(raw), "<not an id>", "{raw}");
        }
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
