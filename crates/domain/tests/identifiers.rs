//! Property tests of identifier normalisation and customer keys: every accepted spelling of one
//! phone, e-mail, PAR or member number gives one key; different values never share a key; a card
//! number is refused in every identifier field.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use tandem_domain::customer::{
    Captures, CustomerIdentifiers, CustomerKey, NetworkKey, RawCustomer, RawIdentifier,
};
use tandem_domain::loyalty::{CheckDigit, LoyaltyProgramme, MemberAlphabet};

fn network_key() -> NetworkKey {
    NetworkKey::new(3, b"an example network key of 32+ bytes!".to_vec()).unwrap()
}

fn key(identifier: &RawIdentifier) -> CustomerKey {
    network_key().customer_key(identifier)
}

/// Countries whose national numbers begin with a trunk prefix `0` that international form drops,
/// with a national significant number shape: (country code, leading digits, digits after them).
const TRUNK_COUNTRIES: [(&str, &str, usize); 3] =
    [("44", "20", 8), ("33", "6", 8), ("49", "30", 8)];

/// A random way of writing `digits` with separators.
fn spell_digits(digits: &str, separators: &[u8]) -> String {
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        out.push(digit);
        match separators.get(index).copied().unwrap_or(0) % 6 {
            1 => out.push(' '),
            2 => out.push('-'),
            3 => out.push('.'),
            _ => {}
        }
    }
    out.trim_end_matches([' ', '-', '.']).to_owned()
}

fn luhn_complete(body: &str) -> String {
    for check in 0..10 {
        let candidate = format!("{body}{check}");
        let sum: u32 = candidate
            .bytes()
            .rev()
            .enumerate()
            .map(|(position, b)| {
                let digit = u32::from(b - b'0');
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
        if sum.is_multiple_of(10) {
            return candidate;
        }
    }
    unreachable!("one of ten check digits completes any body")
}

/// A payment card number: 13 to 19 digits, a card network's first digit (2 to 6), a valid Luhn
/// digit.
fn card_number() -> impl Strategy<Value = String> {
    (2u8..=6, 12usize..=18, any::<u64>(), any::<u64>()).prop_map(|(first, len, a, b)| {
        let mut body = format!("{first}{a:020}{b:020}");
        body.truncate(len);
        luhn_complete(&body)
    })
}

fn programme() -> LoyaltyProgramme {
    LoyaltyProgramme::new(
        "coalition",
        "Coalition",
        MemberAlphabet::Digits,
        8,
        19,
        CheckDigit::None,
    )
    .unwrap()
}

fn alphanumeric_programme() -> LoyaltyProgramme {
    LoyaltyProgramme::new(
        "club",
        "Club",
        MemberAlphabet::Alphanumeric,
        6,
        12,
        CheckDigit::None,
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_spelling_of_one_phone_gives_one_key(
        country in 0usize..3,
        rest in proptest::collection::vec(0u8..10, 8),
        separators in proptest::collection::vec(any::<u8>(), 16),
        double_zero in any::<bool>(),
        trunk in any::<bool>(),
        padding in "[ ]{0,2}",
    ) {
        let (code, lead, _) = TRUNK_COUNTRIES[country];
        let national: String = format!("{lead}{}", rest.iter().map(|d| char::from(b'0' + d)).collect::<String>());
        let canonical = RawIdentifier::phone("p", &format!("+{code}{national}")).unwrap();
        let written = format!(
            "{padding}{}{code} {}{}{padding}",
            if double_zero { "00" } else { "+" },
            if trunk { "(0)" } else { "" },
            spell_digits(&national, &separators),
        );
        let spelled = RawIdentifier::phone("p", &written).unwrap();
        prop_assert_eq!(key(&canonical), key(&spelled), "{}", written);
    }

    #[test]
    fn every_spelling_of_one_email_gives_one_key(
        local in "[a-z0-9._+]{1,20}",
        domain in "[a-z0-9]{1,12}\\.(com|org|co\\.uk|fr)",
        upper in proptest::collection::vec(any::<bool>(), 40),
        padding in "[ \t]{0,2}",
    ) {
        let canonical = format!("{local}@{domain}");
        prop_assume!(!tandem_domain::text::contains_card_number(&canonical));
        let spelled: String = canonical
            .chars()
            .zip(upper.iter().cycle())
            .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
            .collect();
        let a = RawIdentifier::email("e", &canonical).unwrap();
        let b = RawIdentifier::email("e", &format!("{padding}{spelled}{padding}")).unwrap();
        prop_assert_eq!(key(&a), key(&b));
    }

    #[test]
    fn every_spelling_of_one_par_gives_one_key(
        bcid in "[A-Z][0-9]{3}",
        rest in "[A-Z0-9]{25}",
        lower in any::<bool>(),
        padding in "[ ]{0,2}",
    ) {
        let canonical = format!("{bcid}{rest}");
        let spelled = if lower { canonical.to_lowercase() } else { canonical.clone() };
        let a = RawIdentifier::payment_account_reference("par", &canonical).unwrap();
        let b = RawIdentifier::payment_account_reference("par", &format!("{padding}{spelled}{padding}")).unwrap();
        prop_assert_eq!(key(&a), key(&b));
    }

    #[test]
    fn every_spelling_of_one_member_number_gives_one_key(
        number in "[A-Z0-9]{6,12}",
        separators in proptest::collection::vec(any::<u8>(), 12),
        lower in any::<bool>(),
    ) {
        let programme = alphanumeric_programme();
        let spelled: String = number
            .chars()
            .zip(separators.iter())
            .flat_map(|(c, s)| {
                let c = if lower { c.to_ascii_lowercase() } else { c };
                match s % 4 { 1 => vec![c, ' '], 2 => vec![c, '-'], _ => vec![c] }
            })
            .collect();
        let a = RawIdentifier::loyalty_member("m", &programme, &number).unwrap();
        let b = RawIdentifier::loyalty_member("m", &programme, &format!(" {spelled} ")).unwrap();
        prop_assert_eq!(key(&a), key(&b));
    }

    #[test]
    fn different_values_never_share_a_key(
        a in "[A-Z][0-9]{3}[A-Z0-9]{25}",
        b in "[A-Z][0-9]{3}[A-Z0-9]{25}",
        m in "[0-9]{8,12}",
        n in "[0-9]{8,12}",
    ) {
        prop_assume!(a != b);
        let par = |v: &str| key(&RawIdentifier::payment_account_reference("p", v).unwrap());
        prop_assert_ne!(par(&a), par(&b));
        let programme = programme();
        let member = |v: &str| key(&RawIdentifier::loyalty_member("m", &programme, v).unwrap());
        if m != n {
            prop_assert_ne!(member(&m), member(&n));
        }
        // The same characters as two different kinds never share a key either. (A value whose
        // digits happen to form a card number, Luhn check included, is refused as a fingerprint:
        // that case is `a_card_number_is_refused_in_every_identifier_field`'s.)
        let fingerprint = RawIdentifier::card_fingerprint("c", "adyen", &a);
        prop_assume!(fingerprint.is_ok());
        prop_assert_ne!(par(&a), key(&fingerprint.unwrap()));
    }

    #[test]
    fn a_card_number_is_refused_in_every_identifier_field(
        pan in card_number(),
        spaced in any::<bool>(),
    ) {
        let written = if spaced {
            pan.as_bytes().chunks(4).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join(" ")
        } else {
            pan.clone()
        };
        let declared = Captures::from_tags(&["card:adyen", "par", "phone", "email", "member:coalition"]);
        let programme = programme();
        let fields: [(&str, RawCustomer<'_>); 5] = [
            ("card_fingerprint", RawCustomer { card_fingerprint: &written, ..RawCustomer::default() }),
            ("payment_account_reference", RawCustomer { payment_account_reference: &written, ..RawCustomer::default() }),
            ("phone", RawCustomer { phone: &written, ..RawCustomer::default() }),
            ("email", RawCustomer { email: &written, ..RawCustomer::default() }),
            ("loyalty.member_number", RawCustomer { loyalty_programme_id: "coalition", member_number: &written, ..RawCustomer::default() }),
        ];
        for (field, raw) in fields {
            let result = CustomerIdentifiers::parse("customer", &raw, &declared, Some(&programme));
            prop_assert!(result.is_err(), "{} accepted a card number", field);
        }
        // Also as an e-mail's local part.
        let in_email = format!("{written}@example.com");
        prop_assert!(RawIdentifier::email("e", &in_email).is_err());
    }
}

#[test]
fn fingerprints_of_two_processors_never_match_and_pars_match_across_them() {
    let same_token = "card_1NXWPnCo6bFb1KQt";
    let adyen = key(&RawIdentifier::card_fingerprint("c", "adyen", same_token).unwrap());
    let stripe = key(&RawIdentifier::card_fingerprint("c", "stripe", same_token).unwrap());
    assert_ne!(adyen, stripe);
    // A PAR reported by either processor is the same identifier.
    let par = "V0010013018276458729101214380";
    let at_adyen = CustomerIdentifiers::parse(
        "customer",
        &RawCustomer {
            payment_account_reference: par,
            card_fingerprint: same_token,
            ..RawCustomer::default()
        },
        &Captures::from_tags(&["card:adyen", "par"]),
        None,
    )
    .unwrap()
    .keys(&network_key());
    let at_stripe = CustomerIdentifiers::parse(
        "customer",
        &RawCustomer {
            payment_account_reference: &par.to_lowercase(),
            card_fingerprint: same_token,
            ..RawCustomer::default()
        },
        &Captures::from_tags(&["card:stripe", "par"]),
        None,
    )
    .unwrap()
    .keys(&network_key());
    let shared: Vec<_> = at_adyen.iter().filter(|k| at_stripe.contains(k)).collect();
    assert_eq!(shared.len(), 1, "only the PAR matches");
    assert!(shared[0].as_str().contains("_par_"));
}
