//! Partnerships end to end on the real broker and Postgres: two merchants agree terms, amend them,
//! refund a purchase in part, and every amount, explanation and balance is checked. Then the
//! ledger's projections are rebuilt from its event table and must equal the live ones.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::*;
use tandem_proto::v1 as pb;
use tandem_proto::v1::partnership_service_client::PartnershipServiceClient;
use tonic::Code;

const B_PHONE: &str = "+33 6 98 76 54 32";
const E_EMAIL: &str = "eve.cancelled@example.net";

fn percentage_terms(rate_bps: u32) -> pb::Terms {
    pb::Terms {
        currency: "EUR".into(),
        attribution_window_days: 30,
        rule: Some(pb::terms::Rule::PercentageBps(rate_bps)),
        holding_period_days: 14,
        ..Default::default()
    }
}

async fn partnerships(stack: &Stack) -> PartnershipServiceClient<tonic::transport::Channel> {
    PartnershipServiceClient::new(stack.channel().await)
}

async fn lines(stack: &Stack, key: &str, role: pb::PartnershipRole) -> Vec<pb::CommissionLine> {
    stack
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
        .into_inner()
        .lines
}

/// Waits until the acceptor's commission lines satisfy `done`.
async fn wait_lines(
    stack: &Stack,
    key: &str,
    what: &str,
    done: impl Fn(&[pb::CommissionLine]) -> bool,
) -> Vec<pb::CommissionLine> {
    tandem_testkit::eventually(what, Duration::from_secs(60), || async {
        let lines = lines(stack, key, pb::PartnershipRole::Acceptor).await;
        done(&lines).then_some(lines)
    })
    .await
}

fn line<'a>(lines: &'a [pb::CommissionLine], purchase_id: &str) -> &'a pb::CommissionLine {
    lines
        .iter()
        .find(|l| l.purchase_id == purchase_id)
        .unwrap_or_else(|| panic!("no line for {purchase_id}: {lines:#?}"))
}

fn status_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Code {
    result.expect_err("should be refused").code()
}

#[tokio::test]
async fn a_partnership_through_agreement_amendment_refunds_and_termination() {
    let stack = Stack::start(true).await;
    let (acceptor, acceptor_key) = stack.merchant("Atelier Bikes").await;
    let (referrer, referrer_key) = stack.merchant("Cafe Lumiere").await;
    let (_, stranger_key) = stack.merchant("Stranger").await;
    let mut agreements = partnerships(&stack).await;
    let mut pos = stack.pos().await;

    // C proposes 10% to A. Until A accepts, C cannot refer anyone.
    let proposed = agreements
        .propose_terms(with_bearer(
            pb::ProposeTermsRequest {
                idempotency_key: "p-1".into(),
                counterparty_merchant_id: acceptor.clone(),
                caller_role: pb::PartnershipRole::Referrer as i32,
                terms: Some(percentage_terms(1000)),
                ..Default::default()
            },
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(proposed.version, 1);
    let partnership = proposed.partnership_id.clone();
    let refer = |key: &str, customer: pb::CustomerIdentifiers| referral(key, &acceptor, customer);
    assert_eq!(
        status_code(
            pos.create_referral(with_bearer(
                refer("r-0", customer("", B_PHONE, "")),
                &referrer_key
            ))
            .await
        ),
        Code::FailedPrecondition
    );
    let accept = |key: &str, version| pb::AcceptTermsRequest {
        idempotency_key: key.into(),
        partnership_id: partnership.clone(),
        version,
    };
    assert_eq!(
        status_code(
            agreements
                .accept_terms(with_bearer(accept("a-0", 1), &referrer_key))
                .await
        ),
        Code::FailedPrecondition,
        "own proposal"
    );
    assert_eq!(
        status_code(
            agreements
                .accept_terms(with_bearer(accept("a-0", 1), &stranger_key))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        status_code(
            agreements
                .accept_terms(with_bearer(accept("a-9", 7), &acceptor_key))
                .await
        ),
        Code::FailedPrecondition,
        "unknown version"
    );
    agreements
        .accept_terms(with_bearer(accept("a-1", 1), &acceptor_key))
        .await
        .unwrap();

    // Invalid terms name the field.
    let invalid = agreements
        .propose_terms(with_bearer(
            pb::ProposeTermsRequest {
                idempotency_key: "p-bad".into(),
                partnership_id: partnership.clone(),
                terms: Some(pb::Terms {
                    cap_per_customer_minor: Some(0),
                    ..percentage_terms(500)
                }),
                ..Default::default()
            },
            &acceptor_key,
        ))
        .await
        .expect_err("invalid terms");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid.message().contains("terms.cap_per_customer_minor"),
        "{}",
        invalid.message()
    );

    // C refers B and E at its checkout; E's referral is then cancelled.
    pos.create_referral(with_bearer(
        pb::CreateReferralRequest {
            referrer_reference: "C-77".into(),
            ..refer("r-b", customer("", B_PHONE, ""))
        },
        &referrer_key,
    ))
    .await
    .unwrap();
    let e_referral = pos
        .create_referral(with_bearer(
            refer("r-e", customer("", "", E_EMAIL)),
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner();
    let cancel = |key: &str| pb::CancelReferralRequest {
        idempotency_key: key.into(),
        referral_id: e_referral.referral_id.clone(),
    };
    // Only its referrer cancels it; to anyone else it answers as an id that does not exist.
    assert_eq!(
        status_code(
            pos.cancel_referral(with_bearer(cancel("c-0"), &acceptor_key))
                .await
        ),
        Code::NotFound
    );
    pos.cancel_referral(with_bearer(cancel("c-1"), &referrer_key))
        .await
        .unwrap();
    assert_eq!(
        status_code(
            pos.cancel_referral(with_bearer(cancel("c-2"), &referrer_key))
                .await
        ),
        Code::FailedPrecondition,
        "already cancelled"
    );

    // Purchase under version 1: 200.00 at 10% = 20.00. E's purchase is not attributed.
    let p1 = pos
        .record_purchase(with_bearer(
            purchase("b-1", "A-1", customer("", B_PHONE, ""), 20_000),
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    pos.record_purchase(with_bearer(
        purchase("e-1", "A-2", customer("", "", E_EMAIL), 9_000),
        &acceptor_key,
    ))
    .await
    .unwrap();

    // A proposes 5% from now on; C accepts. The next purchase uses version 2.
    let amendment = agreements
        .propose_terms(with_bearer(
            pb::ProposeTermsRequest {
                idempotency_key: "p-2".into(),
                partnership_id: partnership.clone(),
                terms: Some(percentage_terms(500)),
                ..Default::default()
            },
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amendment.version, 2);
    agreements
        .accept_terms(with_bearer(accept("a-2", 2), &referrer_key))
        .await
        .unwrap();
    let p2 = pos
        .record_purchase(with_bearer(
            purchase("b-2", "A-3", customer("", B_PHONE, ""), 10_000),
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();

    // A refunds 50.00 of the first purchase: 20.00 × 50/200 = 5.00 clawed back. Refunding more
    // than is left is refused; a void refunds the rest of the second purchase.
    let refund = |key: &str, txn: &str, amount: Option<i64>| pb::RecordRefundRequest {
        idempotency_key: key.into(),
        transaction_id: txn.into(),
        amount: amount.and_then(eur),
        void: amount.is_none(),
        ..Default::default()
    };
    let refunded = pos
        .record_refund(with_bearer(
            refund("f-1", "A-1", Some(5_000)),
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refunded.purchase_id, p1.purchase_id);
    assert_eq!(
        status_code(
            pos.record_refund(with_bearer(
                refund("f-2", "A-1", Some(15_001)),
                &acceptor_key
            ))
            .await
        ),
        Code::FailedPrecondition
    );
    // Beyond the maximum amount of any refund: refused as invalid before anything is looked up.
    assert_eq!(
        status_code(
            pos.record_refund(with_bearer(
                refund("f-2b", "A-1", Some(1_000_000_000_001)),
                &acceptor_key
            ))
            .await
        ),
        Code::InvalidArgument
    );
    pos.record_refund(with_bearer(refund("f-3", "A-3", None), &acceptor_key))
        .await
        .unwrap();

    // A refund that reaches Tandem before its purchase waits for it.
    assert_eq!(
        status_code(
            pos.record_refund(with_bearer(
                refund("f-4", "A-4", Some(3_000)),
                &acceptor_key
            ))
            .await
        ),
        Code::FailedPrecondition,
        "needs identifiers"
    );
    pos.record_refund(with_bearer(
        pb::RecordRefundRequest {
            customer: Some(customer("", B_PHONE, "")),
            ..refund("f-5", "A-4", Some(3_000))
        },
        &acceptor_key,
    ))
    .await
    .unwrap();
    let p4 = pos
        .record_purchase(with_bearer(
            purchase("b-4", "A-4", customer("", B_PHONE, ""), 10_000),
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();

    let seen = wait_lines(
        &stack,
        &acceptor_key,
        "three lines with their refunds",
        |lines| {
            lines.len() == 3
                && lines
                    .iter()
                    .map(|l| l.reversed.as_ref().map_or(0, |m| m.amount_minor))
                    .sum::<i64>()
                    == 500 + 500 + 150
        },
    )
    .await;
    let first = line(&seen, &p1.purchase_id);
    assert_eq!(
        (first.terms_version, first.rule.as_str()),
        (1, "percentage")
    );
    assert_eq!(first.commission, eur(2_000));
    assert_eq!(first.refunded, eur(5_000));
    assert_eq!(first.reversed, eur(500));
    assert_eq!(first.net_commission, eur(1_500));
    assert_eq!(
        first.status,
        pb::CommissionStatus::Accrued as i32,
        "inside the 14-day holding period"
    );
    assert_eq!(first.referrer_merchant_id, referrer);
    let second = line(&seen, &p2.purchase_id);
    assert_eq!(
        (
            second.terms_version,
            second.commission.clone(),
            second.net_commission.clone()
        ),
        (2, eur(500), eur(0))
    );
    let fourth = line(&seen, &p4.purchase_id);
    assert_eq!(
        (
            fourth.commission.clone(),
            fourth.refunded.clone(),
            fourth.net_commission.clone()
        ),
        (eur(500), eur(3_000), eur(350))
    );

    // Both sides see the same lines; nobody else sees any.
    assert_eq!(
        lines(&stack, &referrer_key, pb::PartnershipRole::Referrer).await,
        seen
    );
    assert!(lines(&stack, &stranger_key, pb::PartnershipRole::Acceptor)
        .await
        .is_empty());

    // Totals per partnership and period (summed over periods, in case the test straddles a
    // month boundary).
    let totals = pos
        .get_commission_totals(with_bearer(
            pb::GetCommissionTotalsRequest {
                role: pb::PartnershipRole::Acceptor as i32,
                partnership_id: partnership.clone(),
                ..Default::default()
            },
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .totals;
    let sum = |pick: fn(&pb::CommissionTotal) -> i64| totals.iter().map(pick).sum::<i64>();
    assert!(totals
        .iter()
        .all(|t| t.counterparty_merchant_id == referrer && t.partnership_id == partnership));
    assert_eq!(sum(|t| i64::from(t.purchases)), 3);
    assert_eq!(
        sum(|t| t.attributed_amount.as_ref().unwrap().amount_minor),
        40_000
    );
    assert_eq!(sum(|t| t.commission.as_ref().unwrap().amount_minor), 3_000);
    assert_eq!(sum(|t| t.reversed.as_ref().unwrap().amount_minor), 1_150);
    assert_eq!(
        sum(|t| t.net_commission.as_ref().unwrap().amount_minor),
        1_850
    );

    // Why 20.00, and what happened since.
    let explained = pos
        .explain_commission(with_bearer(
            pb::ExplainCommissionRequest {
                purchase_id: p1.purchase_id.clone(),
            },
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner();
    for expected in [
        "terms version 1",
        "10.00% of EUR 200.00 = EUR 20.00",
        "clawed back EUR 5.00",
        "leaving EUR 15.00",
    ] {
        assert!(
            explained.explanation.contains(expected),
            "{expected:?} missing from {:?}",
            explained.explanation
        );
    }
    assert_eq!(
        explained.terms.unwrap().rule,
        Some(pb::terms::Rule::PercentageBps(1000))
    );
    assert_eq!(
        status_code(
            pos.explain_commission(with_bearer(
                pb::ExplainCommissionRequest {
                    purchase_id: p1.purchase_id.clone()
                },
                &stranger_key
            ))
            .await
        ),
        Code::NotFound
    );

    // Balances: all still accrued (holding period), the same amount on both sides.
    let balances = |key: String| {
        let mut pos = pos.clone();
        async move {
            pos.get_balances(with_bearer(pb::GetBalancesRequest {}, &key))
                .await
                .unwrap()
                .into_inner()
                .balances
        }
    };
    let expected_owed = 1_500 + 350;
    assert_eq!(
        balances(referrer_key.clone()).await,
        vec![pb::Balance {
            currency: "EUR".into(),
            role: pb::PartnershipRole::Referrer as i32,
            accrued_minor: expected_owed,
            payable_minor: 0,
            settled_minor: 0
        }]
    );
    assert_eq!(
        balances(acceptor_key.clone()).await,
        vec![pb::Balance {
            currency: "EUR".into(),
            role: pb::PartnershipRole::Acceptor as i32,
            accrued_minor: expected_owed,
            payable_minor: 0,
            settled_minor: 0
        }]
    );

    // C's referrals and their states.
    let referrals = pos
        .list_referrals(with_bearer(
            pb::ListReferralsRequest::default(),
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .referrals;
    let state_of = |reference_or_id: &str| {
        referrals
            .iter()
            .find(|r| r.referrer_reference == reference_or_id || r.referral_id == reference_or_id)
            .map(|r| r.state)
    };
    assert_eq!(state_of("C-77"), Some(pb::ReferralState::Converted as i32));
    assert_eq!(
        state_of(&e_referral.referral_id),
        Some(pb::ReferralState::Cancelled as i32)
    );

    // The ledger's projections, rebuilt from its event table, equal the live ones.
    let ledger = stack.schema("ledger").await;
    let projections = [
        "partnerships",
        "partnership_versions",
        "commissions",
        "ledger_entries",
        "ledger_postings",
    ];
    let live = dump_tables_named(&ledger, "ledger", &projections).await;
    assert!(
        live.iter()
            .any(|row| row.starts_with("ledger.ledger_postings")),
        "projections are not empty"
    );
    let replayed = referral_ledger::rebuild_projections(&ledger).await.unwrap();
    assert!(replayed >= 10, "replayed {replayed} events");
    assert_eq!(
        dump_tables_named(&ledger, "ledger", &projections).await,
        live,
        "a rebuilt projection differs from the live one"
    );

    // Termination: later purchases earn nothing, and no new referral is taken.
    agreements
        .terminate_partnership(with_bearer(
            pb::TerminatePartnershipRequest {
                idempotency_key: "t-1".into(),
                partnership_id: partnership.clone(),
            },
            &acceptor_key,
        ))
        .await
        .unwrap();
    assert_eq!(
        status_code(
            pos.create_referral(with_bearer(
                refer("r-late", customer("", B_PHONE, "")),
                &referrer_key
            ))
            .await
        ),
        Code::FailedPrecondition
    );
    let p5 = pos
        .record_purchase(with_bearer(
            purchase("b-5", "A-5", customer("", B_PHONE, ""), 10_000),
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    let after = wait_lines(
        &stack,
        &acceptor_key,
        "the post-termination purchase",
        |lines| lines.len() == 4,
    )
    .await;
    let late = line(&after, &p5.purchase_id);
    assert_eq!(
        (late.status, late.not_earned_reason.as_str()),
        (pb::CommissionStatus::NotEarned as i32, "terminated")
    );
    let partnership_view = agreements
        .get_partnership(with_bearer(
            pb::GetPartnershipRequest {
                partnership_id: partnership.clone(),
            },
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(partnership_view.versions.len(), 2);
    assert!(partnership_view.terminated_at.is_some());
    stack.stop().await;
}

#[tokio::test]
async fn automatic_referrals_and_paged_filtered_lists() {
    let stack = Stack::start(true).await;
    let (_acceptor, acceptor_key) = stack.merchant("Atelier Bikes").await;
    let (referrer, referrer_key) = stack.merchant("Cafe Lumiere").await;
    let mut agreements = partnerships(&stack).await;
    let mut pos = stack.pos().await;

    // A proposes: every customer of C is referred to A automatically, 2% on A's purchases.
    let proposed = agreements
        .propose_terms(with_bearer(
            pb::ProposeTermsRequest {
                idempotency_key: "p-auto".into(),
                counterparty_merchant_id: referrer.clone(),
                caller_role: pb::PartnershipRole::Acceptor as i32,
                terms: Some(pb::Terms {
                    auto_refer: true,
                    ..percentage_terms(200)
                }),
                ..Default::default()
            },
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    // A retry of the proposal answers the same; accepting it twice is harmless too.
    let again = agreements
        .propose_terms(with_bearer(
            pb::ProposeTermsRequest {
                idempotency_key: "p-auto".into(),
                counterparty_merchant_id: referrer.clone(),
                caller_role: pb::PartnershipRole::Acceptor as i32,
                terms: Some(pb::Terms {
                    auto_refer: true,
                    ..percentage_terms(200)
                }),
                ..Default::default()
            },
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, proposed);
    let accept = pb::AcceptTermsRequest {
        idempotency_key: "a-auto".into(),
        partnership_id: proposed.partnership_id.clone(),
        version: 1,
    };
    agreements
        .accept_terms(with_bearer(accept.clone(), &referrer_key))
        .await
        .unwrap();
    agreements
        .accept_terms(with_bearer(accept, &referrer_key))
        .await
        .unwrap();

    // Three customers pay at C (no referral call at all), then at A.
    let phones = ["+44 7700 900001", "+44 7700 900002", "+44 7700 900003"];
    let mut at_acceptor = Vec::new();
    for (index, phone) in phones.iter().enumerate() {
        pos.record_purchase(with_bearer(
            purchase(
                &format!("c-{index}"),
                &format!("C-{index}"),
                customer("", phone, ""),
                1_000,
            ),
            &referrer_key,
        ))
        .await
        .unwrap();
        let bought = pos
            .record_purchase(with_bearer(
                purchase(
                    &format!("a-{index}"),
                    &format!("A-{index}"),
                    customer("", phone, ""),
                    10_000 * (index as i64 + 1),
                ),
                &acceptor_key,
            ))
            .await
            .unwrap()
            .into_inner();
        at_acceptor.push(bought.purchase_id);
    }
    let seen = wait_lines(
        &stack,
        &acceptor_key,
        "three automatically referred purchases",
        |lines| lines.len() == 3,
    )
    .await;
    assert_eq!(
        seen.iter()
            .map(|l| l.commission.clone().unwrap().amount_minor)
            .collect::<Vec<_>>(),
        vec![600, 400, 200]
    );

    // Newest first.
    let newest_first: Vec<String> = at_acceptor.iter().rev().cloned().collect();
    assert_eq!(
        seen.iter()
            .map(|l| l.purchase_id.clone())
            .collect::<Vec<_>>(),
        newest_first
    );

    let referrals = pos
        .list_referrals(with_bearer(
            pb::ListReferralsRequest::default(),
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .referrals;
    assert_eq!(referrals.len(), 3);
    assert!(referrals.iter().all(|r| r.automatic
        && r.state == pb::ReferralState::Converted as i32
        && r.referrer_reference.starts_with("auto:C-")));

    // Paging: one line per page, in the same order as one big page.
    let mut paged = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = pos
            .list_commissions(with_bearer(
                pb::ListCommissionsRequest {
                    role: pb::PartnershipRole::Referrer as i32,
                    page_size: 1,
                    page_token,
                    ..Default::default()
                },
                &referrer_key,
            ))
            .await
            .unwrap()
            .into_inner();
        paged.extend(page.lines);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(paged, seen);
    // Filters: by partnership and by settlement period (monthly: the first of this month).
    let period_start = seen[0].period_start;
    let filtered = pos
        .list_commissions(with_bearer(
            pb::ListCommissionsRequest {
                role: pb::PartnershipRole::Acceptor as i32,
                partnership_id: proposed.partnership_id.clone(),
                period_start,
                ..Default::default()
            },
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .lines;
    assert_eq!(filtered, seen);
    let bad_token = pos
        .list_commissions(with_bearer(
            pb::ListCommissionsRequest {
                role: pb::PartnershipRole::Acceptor as i32,
                page_token: "nonsense".into(),
                ..Default::default()
            },
            &acceptor_key,
        ))
        .await
        .expect_err("bad token");
    assert_eq!(bad_token.code(), Code::InvalidArgument);
    assert_eq!(
        status_code(
            pos.list_commissions(with_bearer(
                pb::ListCommissionsRequest::default(),
                &acceptor_key
            ))
            .await
        ),
        Code::InvalidArgument,
        "role is required"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_refund_recorded_before_its_purchase_and_larger_than_it_claws_back_the_whole_commission()
{
    let stack = Stack::start(true).await;
    let (acceptor, acceptor_key) = stack.merchant("Atelier Bikes").await;
    let (referrer, referrer_key) = stack.merchant("Cafe Lumiere").await;
    stack.partnership(&referrer, &acceptor, 500, 30).await;
    let mut pos = stack.pos().await;
    pos.create_referral(with_bearer(
        referral("r-1", &acceptor, customer("", B_PHONE, "")),
        &referrer_key,
    ))
    .await
    .unwrap();
    // The till that refunds knows more than the one that sold: 150.00 back on a sale of 100.00
    // that has not reached Tandem yet. Nothing can check it now.
    pos.record_refund(with_bearer(
        pb::RecordRefundRequest {
            idempotency_key: "f-early".into(),
            transaction_id: "A-early".into(),
            amount: eur(15_000),
            customer: Some(customer("", B_PHONE, "")),
            ..Default::default()
        },
        &acceptor_key,
    ))
    .await
    .unwrap();
    let purchased = pos
        .record_purchase(with_bearer(
            purchase("p-early", "A-early", customer("", B_PHONE, ""), 10_000),
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();

    // The ledger cuts the refund down to the purchase and claws back the whole commission.
    let ledger = stack.schema("ledger").await;
    let (commission, reversed, refunded): (i64, i64, i64) = tandem_testkit::eventually(
        "the early refund applied",
        Duration::from_secs(60),
        || async {
            let row: Option<(i64, i64, i64)> = sqlx::query_as(
                "SELECT commission_minor, reversed_minor, refunded_minor FROM commissions WHERE purchase_id = $1",
            )
            .bind(&purchased.purchase_id)
            .fetch_optional(&ledger)
            .await
            .unwrap();
            row.filter(|(_, reversed, _)| *reversed > 0)
        },
    )
    .await;
    assert_eq!((commission, reversed, refunded), (500, 500, 10_000));
    let sum: Option<i64> =
        sqlx::query_scalar("SELECT sum(amount_minor)::bigint FROM ledger_postings")
            .fetch_one(&ledger)
            .await
            .unwrap();
    assert_eq!(sum.unwrap_or(0), 0, "the ledger balances");

    // The gateway never counts more refunded than was sold: nothing is left, never less.
    let gateway = stack.schema("gateway").await;
    let (amount, refunded): (i64, i64) = sqlx::query_as(
        "SELECT amount_minor, refunded_minor FROM purchases WHERE transaction_id = 'A-early'",
    )
    .fetch_one(&gateway)
    .await
    .unwrap();
    assert_eq!((amount, refunded), (10_000, 10_000));
    assert_eq!(
        status_code(
            pos.record_refund(with_bearer(
                pb::RecordRefundRequest {
                    idempotency_key: "f-more".into(),
                    transaction_id: "A-early".into(),
                    amount: eur(1),
                    ..Default::default()
                },
                &acceptor_key,
            ))
            .await
        ),
        Code::FailedPrecondition
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_list_filtered_on_a_partnership_not_the_callers_is_refused() {
    let stack = Stack::start(true).await;
    let (acceptor, acceptor_key) = stack.merchant("A").await;
    let (referrer, referrer_key) = stack.merchant("C").await;
    let (_, outsider_key) = stack.merchant("X").await;
    let partnership = stack.partnership(&referrer, &acceptor, 500, 30).await;
    let filtered = |role: pb::PartnershipRole, id: &str| pb::ListCommissionsRequest {
        role: role as i32,
        partnership_id: id.into(),
        ..Default::default()
    };
    // The referrer's own filter works once the ledger knows the partnership.
    tandem_testkit::eventually(
        "the partnership reaches the ledger",
        Duration::from_secs(60),
        || async {
            stack
                .pos()
                .await
                .list_commissions(with_bearer(
                    filtered(pb::PartnershipRole::Referrer, &partnership),
                    &referrer_key,
                ))
                .await
                .ok()
        },
    )
    .await;
    let mut pos = stack.pos().await;
    let outsider = pos
        .list_commissions(with_bearer(
            filtered(pb::PartnershipRole::Referrer, &partnership),
            &outsider_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(outsider.code(), Code::NotFound, "{outsider:?}");
    let totals = pos
        .get_commission_totals(with_bearer(
            pb::GetCommissionTotalsRequest {
                role: pb::PartnershipRole::Acceptor as i32,
                partnership_id: partnership.clone(),
                ..Default::default()
            },
            &outsider_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(totals.code(), Code::NotFound, "{totals:?}");
    // A party asking in the other party's role is told which role it has.
    let wrong_role = pos
        .list_commissions(with_bearer(
            filtered(pb::PartnershipRole::Referrer, &partnership),
            &acceptor_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong_role.code(), Code::InvalidArgument);
    assert!(wrong_role.message().contains("ACCEPTOR"), "{wrong_role:?}");
    pos.list_commissions(with_bearer(
        filtered(pb::PartnershipRole::Acceptor, &partnership),
        &acceptor_key,
    ))
    .await
    .unwrap();
    stack.stop().await;
}
