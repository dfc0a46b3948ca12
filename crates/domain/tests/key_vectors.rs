//! The customer-key test vectors in `tests/vectors/customer_keys.json` (documented in
//! docs/IDENTIFIERS.md): the Rust derivation, fed each raw value as a till sends it, gives the
//! vector's normalised form's key; and an independent implementation (Python's `hmac` module)
//! agrees with every vector.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

use tandem_domain::customer::{NetworkKey, RawIdentifier};
use tandem_domain::loyalty::{CheckDigit, LoyaltyProgramme, MemberAlphabet};

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors")
}

#[test]
fn the_rust_derivation_gives_every_vector() {
    let text = std::fs::read_to_string(vectors_dir().join("customer_keys.json")).unwrap();
    let document: serde_json::Value = serde_json::from_str(&text).unwrap();
    let network = &document["network_key"];
    let key = NetworkKey::new(
        u16::try_from(network["version"].as_u64().unwrap()).unwrap(),
        hex::decode(network["secret_hex"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let vectors = document["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 5);
    for vector in vectors {
        let field = |name: &str| vector[name].as_str().unwrap();
        let raw = field("raw");
        let identifier = match field("kind") {
            "phone" => RawIdentifier::phone("v", raw),
            "email" => RawIdentifier::email("v", raw),
            "par" => RawIdentifier::payment_account_reference("v", raw),
            "card" => RawIdentifier::card_fingerprint("v", field("scope"), raw),
            "member" => {
                let programme = LoyaltyProgramme::new(
                    field("scope"),
                    "Coalition Plus",
                    MemberAlphabet::Digits,
                    8,
                    12,
                    CheckDigit::Luhn,
                )
                .unwrap();
                RawIdentifier::loyalty_member("v", &programme, raw)
            }
            other => panic!("unknown kind {other}"),
        }
        .unwrap();
        assert_eq!(
            key.customer_key(&identifier).as_str(),
            field("key"),
            "{} {raw:?}",
            field("kind")
        );
    }
}

#[test]
fn python_hmac_agrees_with_every_vector() {
    let output = Command::new("python3")
        .arg(vectors_dir().join("customer_keys.py"))
        .output()
        .expect("python3 runs (the machine has Python; docs/IDENTIFIERS.md)");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
