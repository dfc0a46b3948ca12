//! The free-text guard and the id filter for spans: no panic on any input; what is accepted as
//! a token holds nothing shaped like a customer identifier and is trimmed printable ASCII;
//! what the span filter lets through is id-shaped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_domain::text;

fuzz_target!(|input: &str| {
    let guarded = text::reject_personal_data("field", input);
    if let Ok(token) = text::parse_token("field", input, 1, 128) {
        assert!(
            guarded.is_ok(),
            "parse_token accepted what the guard refuses: {input:?}"
        );
        assert_eq!(token, token.trim());
        assert!((1..=128).contains(&token.len()));
        assert!(token.bytes().all(|b| (0x20..0x7f).contains(&b)));
        assert!(!text::contains_card_number(&token));
        assert!(!text::contains_email_address(&token));
        assert!(!text::contains_phone_number(&token));
    }
    if let Ok(name) = text::parse_text("field", input, 200) {
        assert!(text::reject_personal_data("field", &name).is_ok());
        assert!(!name.chars().any(char::is_control));
    }
    let logged = text::loggable_id(input);
    // Passed through means the very input, not an equal placeholder.
    let passed = std::ptr::eq(logged, input);
    assert!(
        passed || logged == "<not an id>" || logged.is_empty(),
        "loggable_id invented {logged:?}"
    );
    if passed && !input.is_empty() {
        assert!(text::reject_personal_data("field", input).is_ok());
        assert!(input
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-:./".contains(&b)));
    }
});
