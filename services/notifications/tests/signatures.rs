//! Tandem's webhook signatures checked by independent implementations of the Standard Webhooks
//! specification: the `standardwebhooks` packages from PyPI and from npm (installed by
//! `deploy/local/test.sh`). A genuine delivery verifies; a tampered body, an old timestamp and a
//! retired secret do not; during a rotation either secret verifies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use notifications::webhook::{headers, SigningSecret};

fn python() -> String {
    std::env::var("TANDEM_TOOLS_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/tandem/checkers-sepaxml-2.7.0-lxml-6.1.3/bin/python")
    })
}

fn node_path() -> String {
    std::env::var("TANDEM_NODE_PATH").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/tandem/checkers-npm-standardwebhooks-1.1.1/node_modules")
    })
}

/// Whether each independent library accepts the delivery: (Python, Node).
fn verdicts(secret: &SigningSecret, header: &[(&str, String); 3], body: &[u8]) -> (bool, bool) {
    let directory = std::env::temp_dir().join(format!("tandem-webhook-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&directory).unwrap();
    let body_file = directory.join("body.json");
    std::fs::write(&body_file, body).unwrap();
    let checkers = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/checkers");
    let args = [
        secret.expose(),
        header[0].1.clone(),
        header[1].1.clone(),
        header[2].1.clone(),
        body_file.to_str().unwrap().to_owned(),
    ];
    let run = |program: &str, script: &str, env: Option<(&str, String)>| {
        let mut command = std::process::Command::new(program);
        command.arg(format!("{checkers}/{script}")).args(&args);
        if let Some((name, value)) = env {
            command.env(name, value);
        }
        let output = command.output().unwrap_or_else(|e| {
            panic!("{program} could not run ({e}); deploy/local/test.sh installs it")
        });
        let said = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            said.starts_with("verified") || said.starts_with("rejected"),
            "{program} {script}: {said}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.status.success()
    };
    let python = run(&python(), "verify_webhook.py", None);
    let node = run(
        "node",
        "verify_webhook.js",
        Some(("NODE_PATH", node_path())),
    );
    std::fs::remove_dir_all(&directory).ok();
    (python, node)
}

#[test]
fn deliveries_verify_with_the_standard_webhooks_libraries_of_python_and_node() {
    let secret = SigningSecret::generate();
    let body = br#"{"id":"6b1f2c1e-0000-4000-8000-000000000001","type":"purchase.attributed","version":1,"data":{"amount":{"amount_minor":4555,"currency":"EUR"}}}"#;
    let id = "6b1f2c1e-0000-4000-8000-000000000001";
    let now = chrono::Utc::now().timestamp();

    let genuine = headers(&[&secret], id, now, body);
    assert_eq!(verdicts(&secret, &genuine, body), (true, true));

    // A body changed on the way: both refuse.
    let mut tampered = body.to_vec();
    let at = tampered.len() - 4;
    tampered[at] = b'6';
    assert_eq!(verdicts(&secret, &genuine, &tampered), (false, false));

    // A delivery signed an hour ago (a replay): both refuse, it is outside their tolerance.
    let old = headers(&[&secret], id, now - 3600, body);
    assert_eq!(verdicts(&secret, &old, body), (false, false));

    // A secret rotation: while both sign, a receiver with either verifies; once the old one is
    // retired, only the new one does.
    let next = SigningSecret::generate();
    let overlap = headers(&[&next, &secret], id, now, body);
    assert!(
        overlap[2].1.contains(' '),
        "two signatures: {}",
        overlap[2].1
    );
    assert_eq!(verdicts(&secret, &overlap, body), (true, true));
    assert_eq!(verdicts(&next, &overlap, body), (true, true));
    let after = headers(&[&next], id, now, body);
    assert_eq!(verdicts(&next, &after, body), (true, true));
    assert_eq!(verdicts(&secret, &after, body), (false, false));
}
