//! Settlement end to end on the real stack: tills record referrals and purchases through the
//! gateway, the ledger decides commissions, settlement takes them from Kafka, and cycles close
//! (on an operator's request and on schedule) into netted payouts and statements that reconcile
//! to the ledger's lines.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use prost::Message;
use sha2::{Digest, Sha256};
use support::{as_operator, customer, eur, with_bearer, Stack};
use tandem_bus::Topic;
use tandem_domain::settlement::{Cycle, CycleKind};
use tandem_proto::v1 as pb;
use tandem_proto::v1::statement_service_client::StatementServiceClient;
use tonic::Code;

/// Yesterday in Paris, as a daily cycle: ended, so it can close.
fn yesterday() -> Cycle {
    Cycle::containing(
        CycleKind::Daily,
        "Europe/Paris".parse().unwrap(),
        Utc::now() - chrono::Duration::days(1),
    )
}

async fn daily_partnership(stack: &Stack, referrer: &str, acceptor: &str, rate_bps: u32) -> String {
    stack
        .operator()
        .await
        .create_partnership(as_operator(pb::CreatePartnershipRequest {
            referrer_merchant_id: referrer.into(),
            acceptor_merchant_id: acceptor.into(),
            commission_rate_bps: rate_bps,
            attribution_window_days: 30,
            effective_from: Some(tandem_proto::time::timestamp(
                Utc::now() - chrono::Duration::days(3),
            )),
            settlement_cycle: pb::SettlementCycle::Daily as i32,
            minimum_payout_minor: 0,
            idempotency_key: uuid::Uuid::new_v4().to_string(),
        }))
        .await
        .unwrap()
        .into_inner()
        .partnership_id
}

/// A customer referred by `referrer` to `acceptor`, who then buys `amount` there, both within
/// yesterday.
async fn referred_purchase(
    stack: &Stack,
    tag: &str,
    (referrer_key, acceptor): (&str, &str),
    acceptor_key: &str,
    amount: i64,
) -> String {
    let day = yesterday();
    let who = customer(
        &format!("card-fingerprint-{tag}"),
        "",
        &format!("{tag}@example.com"),
    );
    let mut pos = stack.pos().await;
    pos.create_referral(with_bearer(
        pb::CreateReferralRequest {
            idempotency_key: format!("ref-{tag}"),
            merchant_id: String::new(),
            acceptor_merchant_id: acceptor.into(),
            customer: Some(who.clone()),
            referrer_reference: format!("receipt {tag}"),
            referred_at: Some(tandem_proto::time::timestamp(
                day.start + chrono::Duration::hours(2),
            )),
        },
        referrer_key,
    ))
    .await
    .unwrap();
    pos.record_purchase(with_bearer(
        pb::RecordPurchaseRequest {
            idempotency_key: format!("buy-{tag}"),
            merchant_id: String::new(),
            transaction_id: format!("T-{tag}"),
            customer: Some(who),
            amount: eur(amount),
            purchased_at: Some(tandem_proto::time::timestamp(
                day.start + chrono::Duration::hours(12),
            )),
        },
        acceptor_key,
    ))
    .await
    .unwrap()
    .into_inner()
    .purchase_id
}

async fn lines_received(stack: &Stack, expected: i64) {
    let pool = stack.schema("settlement").await;
    tandem_testkit::eventually(
        "settlement received the commissions",
        Duration::from_secs(60),
        || {
            let pool = pool.clone();
            async move {
                let count: i64 = sqlx::query_scalar("SELECT count(*) FROM lines")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
                (count >= expected).then_some(())
            }
        },
    )
    .await;
}

async fn register_account(stack: &Stack, key: &str, iban: &str, bic: &str, holder: &str) {
    StatementServiceClient::new(stack.channel().await)
        .register_payout_account(with_bearer(
            pb::RegisterPayoutAccountRequest {
                merchant_id: String::new(),
                iban: iban.into(),
                bic: bic.into(),
                account_holder: holder.into(),
            },
            key,
        ))
        .await
        .unwrap();
}

/// Every ledger commission line of `merchant` (as referrer, positive; as acceptor, negative),
/// by purchase.
async fn ledger_lines(stack: &Stack, key: &str) -> BTreeMap<String, i64> {
    let mut lines = BTreeMap::new();
    for (role, sign) in [
        (pb::PartnershipRole::Referrer, 1),
        (pb::PartnershipRole::Acceptor, -1),
    ] {
        let response = stack
            .pos()
            .await
            .list_commissions(with_bearer(
                pb::ListCommissionsRequest {
                    role: role as i32,
                    ..Default::default()
                },
                key,
            ))
            .await
            .unwrap()
            .into_inner();
        for line in response.lines {
            let net = line.net_commission.map_or(0, |m| m.amount_minor);
            if net != 0 {
                lines.insert(line.purchase_id, sign * net);
            }
        }
    }
    lines
}

#[tokio::test]
async fn two_merchants_referring_each_other_get_one_netted_payout_and_every_statement_reconciles() {
    let mut stack = Stack::start(true).await;
    // A grace period of a day: only the operator closes cycles in this test.
    stack.start_settlement(86_400).await;
    let (a, a_key) = stack.merchant("A").await;
    let (b, b_key) = stack.merchant("B").await;
    let (c, c_key) = stack.merchant("C").await;
    let ab = daily_partnership(&stack, &a, &b, 500).await;
    daily_partnership(&stack, &b, &a, 500).await;
    daily_partnership(&stack, &c, &b, 500).await;
    register_account(
        &stack,
        &a_key,
        "FR76 3000 6000 0112 3456 7890 189",
        "BNPAFRPPXXX",
        "A SARL",
    )
    .await;
    register_account(
        &stack,
        &b_key,
        "DE89 3704 0044 0532 0130 00",
        "COBADEFFXXX",
        "B GmbH",
    )
    .await;
    register_account(&stack, &c_key, "NL91ABNA0417164300", "ABNANL2A", "C B.V.").await;

    // A sends a customer to B (100.00), B one to A (40.00), C one to B (30.00); 5 % each.
    let to_b = referred_purchase(&stack, "ab", (&a_key, &b), &b_key, 10_000).await;
    let to_a = referred_purchase(&stack, "ba", (&b_key, &a), &a_key, 4_000).await;
    let from_c = referred_purchase(&stack, "cb", (&c_key, &b), &b_key, 3_000).await;
    lines_received(&stack, 3).await;
    let cycle = yesterday().key();

    // Before the close, A sees what its next statement will hold.
    let mut statements = StatementServiceClient::new(stack.channel().await);
    let pending = statements
        .list_unsettled_lines(with_bearer(
            pb::ListUnsettledLinesRequest::default(),
            &a_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .lines;
    let mut upcoming: Vec<(String, i64, String)> = pending
        .iter()
        .map(|p| {
            let line = p.line.as_ref().unwrap();
            (
                line.purchase_id.clone(),
                line.amount_minor,
                p.expected_cycle.clone(),
            )
        })
        .collect();
    upcoming.sort();
    let mut expected = vec![
        (to_b.clone(), 500, cycle.clone()),
        (to_a.clone(), -200, cycle.clone()),
    ];
    expected.sort();
    assert_eq!(upcoming, expected);

    let mut operator = stack.operator().await;
    let summary = operator
        .close_settlement_cycle(as_operator(pb::CloseCycleRequest {
            cycle: cycle.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(summary.closed_now);
    assert_eq!((summary.statements, summary.settled_lines), (3, 3));
    // A is owed 500 by B and owes B 200: one transfer of 300 between them, not two. C is paid
    // 150 by B. Three non-zero positions, two transfers.
    assert_eq!(summary.payout_instructions, 2);
    let again = operator
        .close_settlement_cycle(as_operator(pb::CloseCycleRequest {
            cycle: cycle.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.closed_now, "closing twice gives one statement set");
    let instructions = operator
        .list_payout_instructions(as_operator(pb::ListPayoutInstructionsRequest {
            cycle: cycle.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .instructions;
    let transfers: Vec<(&str, &str, i64)> = instructions
        .iter()
        .map(|i| {
            (
                i.from_merchant_id.as_str(),
                i.to_merchant_id.as_str(),
                i.amount_minor,
            )
        })
        .collect();
    assert_eq!(
        transfers,
        [(b.as_str(), a.as_str(), 300), (b.as_str(), c.as_str(), 150)]
    );
    assert_eq!(
        instructions[0].to_account.as_ref().unwrap().iban,
        "FR7630006000011234567890189"
    );
    let file = operator
        .get_payout_file(as_operator(pb::GetPayoutFileRequest {
            cycle: cycle.clone(),
            currency: "EUR".into(),
            requested_execution_date: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (file.number_of_transactions, file.control_sum_minor),
        (2, 450)
    );
    let xml = String::from_utf8(file.content).unwrap();
    assert!(
        xml.contains("<InstdAmt Ccy=\"EUR\">3.00</InstdAmt>"),
        "{xml}"
    );

    // Settled: nothing is pending any more.
    let pending = statements
        .list_unsettled_lines(with_bearer(
            pb::ListUnsettledLinesRequest::default(),
            &a_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .lines;
    assert!(pending.is_empty(), "{pending:?}");

    // Each merchant's statement reconciles line by line to its ledger lines.
    for (merchant, key, expected_net) in [(&a, &a_key, 300), (&b, &b_key, -450), (&c, &c_key, 150)]
    {
        let listed = statements
            .list_statements(with_bearer(pb::ListStatementsRequest::default(), key))
            .await
            .unwrap()
            .into_inner()
            .statements;
        assert_eq!(listed.len(), 1, "{merchant}");
        let statement = statements
            .get_statement(with_bearer(
                pb::GetStatementRequest {
                    merchant_id: String::new(),
                    number: listed[0].number,
                },
                key,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&statement.merchant_id, merchant);
        assert_eq!(statement.cycle, cycle);
        assert_eq!(statement.totals.len(), 1);
        assert_eq!(statement.totals[0].net_minor, expected_net, "{merchant}");
        let on_statement: BTreeMap<String, i64> = statement
            .lines
            .iter()
            .map(|l| (l.purchase_id.clone(), l.amount_minor))
            .collect();
        assert_eq!(on_statement, ledger_lines(&stack, key).await, "{merchant}");
        for line in &statement.lines {
            assert!(line.referrer_reference.starts_with("receipt "), "{line:?}");
            assert!(line.transaction_id.starts_with("T-"));
            assert_eq!(line.rule, "percentage 500 bps");
        }

        // The CSV's SHA-256 is the statement's hash; the JSON verifies too; a changed byte does
        // not.
        let csv = statements
            .export_statement(with_bearer(
                pb::ExportStatementRequest {
                    merchant_id: String::new(),
                    number: statement.number,
                    format: pb::ExportFormat::Csv as i32,
                },
                key,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            hex::encode(Sha256::digest(&csv.content)),
            statement.content_hash
        );
        let json = statements
            .export_statement(with_bearer(
                pb::ExportStatementRequest {
                    merchant_id: String::new(),
                    number: statement.number,
                    format: pb::ExportFormat::Json as i32,
                },
                key,
            ))
            .await
            .unwrap()
            .into_inner();
        let verify = |claim| pb::VerifyStatementRequest {
            merchant_id: String::new(),
            number: statement.number,
            claim: Some(claim),
        };
        use pb::verify_statement_request::Claim;
        for claim in [
            Claim::Csv(csv.content.clone()),
            Claim::Json(json.content.clone()),
        ] {
            let verdict = statements
                .verify_statement(with_bearer(verify(claim), key))
                .await
                .unwrap()
                .into_inner();
            assert!(verdict.matches, "{verdict:?}");
        }
        let mut tampered = csv.content.clone();
        let last_digit = tampered.iter().rposition(u8::is_ascii_digit).unwrap();
        tampered[last_digit] = if tampered[last_digit] == b'9' {
            b'8'
        } else {
            tampered[last_digit] + 1
        };
        let verdict = statements
            .verify_statement(with_bearer(verify(Claim::Csv(tampered)), key))
            .await
            .unwrap()
            .into_inner();
        assert!(!verdict.matches);
        let pdf = statements
            .export_statement(with_bearer(
                pb::ExportStatementRequest {
                    merchant_id: String::new(),
                    number: statement.number,
                    format: pb::ExportFormat::Pdf as i32,
                },
                key,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(pdf.content.starts_with(b"%PDF-"));
    }
    assert!([&to_b, &to_a, &from_c]
        .iter()
        .all(|id| id.starts_with("pur_")));

    // A merchant sees only its own statements; the operator's calls need the operator token.
    let denied = statements
        .get_statement(with_bearer(
            pb::GetStatementRequest {
                merchant_id: a.clone(),
                number: 1,
            },
            &b_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let missing = statements
        .get_statement(with_bearer(
            pb::GetStatementRequest {
                merchant_id: String::new(),
                number: 2,
            },
            &a_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let not_operator = operator
        .close_settlement_cycle(with_bearer(
            pb::CloseCycleRequest {
                cycle: cycle.clone(),
            },
            &a_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(not_operator.code(), Code::Unauthenticated);
    for (bad, says) in [
        (
            "fortnightly:Europe/Paris:2026-03-01",
            "daily, weekly or monthly",
        ),
        ("daily:Europe/Pariss:2026-03-01", "IANA"),
        (
            "monthly:Europe/Paris:2026-03-02",
            "does not start a monthly cycle",
        ),
        ("daily:Europe/Paris", "not a cycle name"),
    ] {
        let refused = operator
            .close_settlement_cycle(as_operator(pb::CloseCycleRequest { cycle: bad.into() }))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{bad}");
        assert!(
            refused.message().contains(says),
            "{bad}: {}",
            refused.message()
        );
    }
    let today = Cycle::containing(
        CycleKind::Daily,
        "Europe/Paris".parse().unwrap(),
        Utc::now(),
    );
    let early = operator
        .close_settlement_cycle(as_operator(pb::CloseCycleRequest { cycle: today.key() }))
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition);

    // An operator corrects A's statement: a correction statement naming it, for A and for B.
    let correction = pb::IssueCorrectionRequest {
        idempotency_key: "goodwill-1".into(),
        merchant_id: a.clone(),
        statement_number: 1,
        partnership_id: ab.clone(),
        amount: eur(100),
        reason: "purchase T-ab2 missed by B's till".into(),
    };
    let corrected = operator
        .issue_settlement_correction(as_operator(correction.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(corrected.created_now);
    let mut named: Vec<(String, u32, u32)> = corrected
        .statements
        .iter()
        .map(|s| (s.merchant_id.clone(), s.number, s.corrects_statement_number))
        .collect();
    named.sort();
    let mut expected = vec![(a.clone(), 2, 1), (b.clone(), 2, 1)];
    expected.sort();
    assert_eq!(named, expected);
    let again = operator
        .issue_settlement_correction(as_operator(correction.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created_now);
    let reused = operator
        .issue_settlement_correction(as_operator(pb::IssueCorrectionRequest {
            amount: eur(101),
            ..correction.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    let by_merchant = operator
        .issue_settlement_correction(with_bearer(correction, &a_key))
        .await
        .unwrap_err();
    assert_eq!(by_merchant.code(), Code::Unauthenticated);
    let upcoming = statements
        .list_unsettled_lines(with_bearer(
            pb::ListUnsettledLinesRequest::default(),
            &a_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .lines;
    assert_eq!(upcoming.len(), 1);
    let adjustment = upcoming[0].line.as_ref().unwrap();
    assert_eq!(
        (adjustment.kind, adjustment.amount_minor),
        (pb::StatementLineKind::Adjustment as i32, 100)
    );

    // Settlement announced each statement and payout for notifications.
    let announced = tandem_testkit::eventually(
        "settlement events published",
        Duration::from_secs(30),
        || {
            let bus = stack.bus.clone();
            async move {
                let events: Vec<pb::SettlementEvent> =
                    tandem_testkit::read_topic(&bus, Topic::Settlement)
                        .into_iter()
                        .map(|m| pb::SettlementEvent::decode(m.payload.as_slice()).unwrap())
                        .collect();
                (events.len() >= 7).then_some(events)
            }
        },
    )
    .await;
    let issued = announced
        .iter()
        .filter(|e| {
            matches!(
                e.event,
                Some(pb::settlement_event::Event::StatementIssued(_))
            )
        })
        .count();
    // Three statements and two payouts at the close, two correction statements.
    assert_eq!((issued, announced.len()), (5, 7));
    stack.stop().await;
}

#[tokio::test]
async fn payout_accounts_are_validated_precisely() {
    let stack = Stack::start(false).await;
    let (_, key) = stack.merchant("A").await;
    let mut statements = StatementServiceClient::new(stack.channel().await);
    for (iban, bic, holder, field) in [
        (
            "FR76 3000 6000 0112 3456 7890 188",
            "BNPAFRPPXXX",
            "A",
            "iban",
        ),
        ("FR76", "BNPAFRPPXXX", "A", "iban"),
        ("FR7630006000011234567890189", "BNPA", "A", "bic"),
        (
            "FR7630006000011234567890189",
            "BNPAFRPPXXX",
            "",
            "account_holder",
        ),
    ] {
        let refused = statements
            .register_payout_account(with_bearer(
                pb::RegisterPayoutAccountRequest {
                    merchant_id: String::new(),
                    iban: iban.into(),
                    bic: bic.into(),
                    account_holder: holder.into(),
                },
                &key,
            ))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{iban} {bic} {holder:?}"
        );
        assert!(
            refused.message().starts_with(field),
            "{}",
            refused.message()
        );
    }
    let missing = statements
        .get_payout_account(with_bearer(pb::GetPayoutAccountRequest::default(), &key))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let registered = statements
        .register_payout_account(with_bearer(
            pb::RegisterPayoutAccountRequest {
                merchant_id: String::new(),
                iban: "fr76 3000 6000 0112 3456 7890 189".into(),
                bic: "bnpafrppxxx".into(),
                account_holder: "A SARL".into(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(registered.iban, "FR7630006000011234567890189");
    let shown = statements
        .get_payout_account(with_bearer(pb::GetPayoutAccountRequest::default(), &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown, registered);
    stack.stop().await;
}

#[tokio::test]
async fn cycles_close_on_schedule_by_themselves_and_through_a_restart() {
    let mut stack = Stack::start(true).await;
    stack.start_settlement(0).await;
    let (a, a_key) = stack.merchant("A").await;
    let (b, b_key) = stack.merchant("B").await;
    daily_partnership(&stack, &a, &b, 1_000).await;
    referred_purchase(&stack, "one", (&a_key, &b), &b_key, 5_000).await;
    let pool = stack.schema("settlement").await;
    let cycle = yesterday().key();
    let closed = |pool: sqlx::PgPool, cycle: String| async move {
        let statements: Option<i32> =
            sqlx::query_scalar("SELECT statements FROM cycles WHERE cycle = $1")
                .bind(&cycle)
                .fetch_optional(&pool)
                .await
                .ok()?;
        statements.filter(|n| *n == 2)
    };
    tandem_testkit::eventually(
        "the schedule closed yesterday",
        Duration::from_secs(60),
        || closed(pool.clone(), cycle.clone()),
    )
    .await;
    // A restart does not close it again.
    if let Some(settlement) = stack.settlement.take() {
        settlement.stop().await;
    }
    stack.start_settlement(0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let statements: i64 = sqlx::query_scalar("SELECT count(*) FROM statements")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(statements, 2);
    stack.stop().await;
}
