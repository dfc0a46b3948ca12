//! Settlement against a real Postgres: facts go in through the same intake the Kafka consumers
//! use (synthetic deliveries of the admin and ledger topics), cycles close, and the statements,
//! netting and payout instructions are checked. The end-to-end path over Kafka is in
//! `tests/tests/settlement.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Duration, Utc};
use prost::Message;
use settlement::close::CloseRefused;
use settlement::{close_cycle, parse_cycle, rebuild_projections, Intake};
use sqlx::PgPool;
use tandem_bus::{BatchHandler, Delivery, Topic};
use tandem_domain::ids::{MerchantId, PartnershipId, PurchaseId, RefundId};
use tandem_domain::settlement::{Cycle, CycleKind};
use tandem_domain::statement::{LineKind, LineStatus, Statement};
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tandem_testkit::TestDatabase;
use tokio::sync::Notify;

struct World {
    _database: TestDatabase,
    pool: PgPool,
    intake: Intake,
    offset: AtomicI64,
    wake: Notify,
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

impl World {
    async fn new() -> World {
        let database = TestDatabase::create().await;
        let pool = tandem_store::connect(&tandem_store::StoreConfig {
            database_url: database.url.clone(),
            schema: "settlement".into(),
            max_connections: 5,
        })
        .await
        .unwrap();
        settlement::migrate(&pool).await.unwrap();
        World {
            _database: database,
            intake: Intake { pool: pool.clone() },
            pool,
            offset: AtomicI64::new(0),
            wake: Notify::new(),
        }
    }

    async fn deliver(&self, topic: Topic, key: &str, payload: Vec<u8>) {
        let delivery = Delivery {
            topic,
            topic_name: topic.logical_name().to_owned(),
            partition: 0,
            offset: self.offset.fetch_add(1, Ordering::SeqCst),
            key: key.as_bytes().to_vec(),
            payload,
            headers: Vec::new(),
        };
        self.intake.handle(&[delivery]).await.unwrap();
    }

    /// Delivers `payloads` as one batch, as the consumer would.
    async fn deliver_batch(&self, topic: Topic, key: &str, payloads: Vec<Vec<u8>>) {
        let batch: Vec<Delivery> = payloads
            .into_iter()
            .map(|payload| Delivery {
                topic,
                topic_name: topic.logical_name().to_owned(),
                partition: 0,
                offset: self.offset.fetch_add(1, Ordering::SeqCst),
                key: key.as_bytes().to_vec(),
                payload,
                headers: Vec::new(),
            })
            .collect();
        self.intake.handle(&batch).await.unwrap();
    }

    async fn account(&self, merchant: &str, iban: &str, bic: &str, holder: &str) {
        self.admin(
            merchant,
            pb::event_envelope::Payload::PayoutAccountRegistered(pb::PayoutAccountRegistered {
                merchant_id: merchant.into(),
                iban: iban.into(),
                bic: bic.into(),
                account_holder: holder.into(),
                registered_at: Some(timestamp(Utc::now())),
            }),
        )
        .await;
    }

    async fn admin(&self, key: &str, payload: pb::event_envelope::Payload) {
        let envelope = pb::EventEnvelope {
            event_id: uuid::Uuid::now_v7().to_string(),
            recorded_at: Some(timestamp(Utc::now())),
            customer_key: String::new(),
            admin_sequence: 1,
            payload: Some(payload),
        };
        self.deliver(Topic::Admin, key, envelope.encode_to_vec())
            .await;
    }

    async fn merchant(&self, zone: &str) -> String {
        let id = MerchantId::generate().to_string();
        self.admin(
            &id,
            pb::event_envelope::Payload::MerchantRegistered(pb::MerchantRegistered {
                merchant_id: id.clone(),
                display_name: "A merchant".into(),
                settlement_currency: "EUR".into(),
                time_zone: zone.into(),
            }),
        )
        .await;
        id
    }

    /// A partnership from `referrer` to `acceptor` settling on `cycle` with `minimum_payout`.
    async fn partnership(
        &self,
        referrer: &str,
        acceptor: &str,
        cycle: pb::SettlementCycle,
        minimum_payout: i64,
    ) -> Partnership {
        let id = PartnershipId::generate().to_string();
        let terms = pb::Terms {
            currency: "EUR".into(),
            attribution_window_days: 30,
            rule: Some(pb::terms::Rule::PercentageBps(500)),
            settlement_cycle: cycle as i32,
            minimum_payout_minor: minimum_payout,
            ..Default::default()
        };
        self.admin(
            &id,
            pb::event_envelope::Payload::PartnershipTermsProposed(pb::PartnershipTermsProposed {
                partnership_id: id.clone(),
                version: 1,
                referrer_merchant_id: referrer.into(),
                acceptor_merchant_id: acceptor.into(),
                proposed_by: referrer.into(),
                terms: Some(terms),
                effective_from: Some(timestamp(at("2020-01-01T00:00:00Z"))),
            }),
        )
        .await;
        Partnership {
            id,
            referrer: referrer.into(),
            acceptor: acceptor.into(),
        }
    }

    async fn ledger(
        &self,
        partnership: &Partnership,
        event: pb::ledger_event::Event,
        recorded_at: DateTime<Utc>,
    ) {
        let message = pb::LedgerEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            schema_version: 1,
            partnership_id: partnership.id.clone(),
            referrer_merchant_id: partnership.referrer.clone(),
            acceptor_merchant_id: partnership.acceptor.clone(),
            recorded_at: Some(timestamp(recorded_at)),
            event: Some(event),
        };
        self.deliver(Topic::Ledger, &partnership.id, message.encode_to_vec())
            .await;
    }

    /// A purchase of `amount` earning `commission`, payable at `payable_at`. Returns its id.
    async fn commission(
        &self,
        partnership: &Partnership,
        amount: i64,
        commission: i64,
        payable_at: DateTime<Utc>,
    ) -> String {
        let purchase_id = self.attributed(partnership, amount, commission).await;
        self.payable(partnership, &purchase_id, payable_at).await;
        purchase_id
    }

    async fn attributed(&self, partnership: &Partnership, amount: i64, commission: i64) -> String {
        let purchase_id = PurchaseId::generate().to_string();
        self.ledger(
            partnership,
            pb::ledger_event::Event::PurchaseAttributed(pb::PurchaseAttributed {
                purchase_id: purchase_id.clone(),
                referral_id: "ref_00000000000000000000000000000001".into(),
                // Quoting in the canonical CSV: a comma and double quotes.
                referrer_reference: "receipt 42, \"window\"".into(),
                transaction_id: format!("T-{amount}"),
                amount: Some(eur(amount)),
                purchased_at: Some(timestamp(Utc::now())),
                terms_version: 1,
                commission: Some(eur(commission)),
                not_earned_reason: String::new(),
                matched_by: 0,
            }),
            Utc::now(),
        )
        .await;
        purchase_id
    }

    async fn payable(
        &self,
        partnership: &Partnership,
        purchase_id: &str,
        payable_at: DateTime<Utc>,
    ) {
        self.ledger(
            partnership,
            pb::ledger_event::Event::CommissionPayable(pb::CommissionPayable {
                purchase_id: purchase_id.into(),
                commission: Some(eur(0)),
                payable_at: Some(timestamp(payable_at)),
            }),
            payable_at,
        )
        .await;
    }

    async fn refund(
        &self,
        partnership: &Partnership,
        purchase_id: &str,
        refund: i64,
        reversal: i64,
        recorded_at: DateTime<Utc>,
    ) -> String {
        let refund_id = RefundId::generate().to_string();
        self.ledger(
            partnership,
            pb::ledger_event::Event::CommissionReversed(pb::CommissionReversed {
                refund_id: refund_id.clone(),
                purchase_id: purchase_id.into(),
                refund: Some(eur(refund)),
                reversal: Some(eur(reversal)),
                refunded_at: Some(timestamp(recorded_at)),
                within_holding_period: false,
            }),
            recorded_at,
        )
        .await;
        refund_id
    }

    async fn close(&self, cycle: &Cycle) -> settlement::ClosureSummary {
        close_cycle(&self.pool, cycle, Utc::now(), &self.wake)
            .await
            .unwrap()
            .unwrap_or_else(|refused| panic!("{} refused: {refused}", cycle.key()))
    }

    async fn statements(&self, merchant: &str) -> Vec<Statement> {
        settlement::statements::all_of(&self.pool, merchant)
            .await
            .unwrap()
    }
}

struct Partnership {
    id: String,
    referrer: String,
    acceptor: String,
}

fn eur(amount_minor: i64) -> pb::Money {
    pb::Money {
        amount_minor,
        currency: "EUR".into(),
    }
}

fn net(statement: &Statement) -> i128 {
    statement.totals().values().map(|t| t.net_minor).sum()
}

fn daily(zone: &str, day: &str) -> Cycle {
    parse_cycle(&format!("daily:{zone}:{day}")).unwrap()
}

#[tokio::test]
async fn a_commission_one_second_before_the_cut_off_is_in_the_cycle_and_one_second_after_is_not() {
    let world = World::new().await;
    let referrer = world.merchant("Europe/Paris").await;
    let acceptor = world.merchant("Europe/Paris").await;
    let p = world
        .partnership(&referrer, &acceptor, pb::SettlementCycle::Daily, 0)
        .await;
    let day = daily("Europe/Paris", "2026-06-10");
    // Local midnight in Paris in June is 22:00 UTC the day before.
    assert_eq!(day.end, at("2026-06-10T22:00:00Z"));
    let before = world
        .commission(&p, 10_000, 500, day.end - Duration::seconds(1))
        .await;
    let after = world
        .commission(&p, 20_000, 1_000, day.end + Duration::seconds(1))
        .await;
    let summary = world.close(&day).await;
    assert_eq!(summary.settled_lines, 1);
    assert_eq!(summary.statements, 2);
    let statements = world.statements(&referrer).await;
    assert_eq!(statements.len(), 1);
    assert_eq!(statements[0].lines.len(), 1);
    assert_eq!(statements[0].lines[0].purchase_id, before);
    assert_eq!(statements[0].lines[0].amount_minor, 500);
    assert_eq!(statements[0].cut_off, day.end);

    let next = world.close(&day.next()).await;
    assert_eq!(next.settled_lines, 1);
    let statements = world.statements(&referrer).await;
    assert_eq!(statements.len(), 2);
    assert_eq!(statements[1].number, 2);
    assert_eq!(statements[1].lines[0].purchase_id, after);
    // The acceptor's side: what it owes, negative.
    let acceptor_side = world.statements(&acceptor).await;
    assert_eq!(acceptor_side[1].lines[0].amount_minor, -1_000);
}

#[tokio::test]
async fn monthly_cycles_cut_off_at_local_midnight_across_daylight_saving_changes() {
    for (zone, month, start, end) in [
        // Paris moves to summer time on 29 March 2026: 00:00 CET to 00:00 CEST.
        (
            "Europe/Paris",
            "2026-03-01",
            "2026-02-28T23:00:00Z",
            "2026-03-31T22:00:00Z",
        ),
        // New York returns to standard time on 1 November 2026 at 02:00, after midnight.
        (
            "America/New_York",
            "2026-11-01",
            "2026-11-01T04:00:00Z",
            "2026-12-01T05:00:00Z",
        ),
        // And moves to summer time on 8 March 2026.
        (
            "America/New_York",
            "2026-03-01",
            "2026-03-01T05:00:00Z",
            "2026-04-01T04:00:00Z",
        ),
    ] {
        // Each case on its own database: cycles of one kind and zone close in order.
        let world = World::new().await;
        let referrer = world.merchant(zone).await;
        let acceptor = world.merchant(zone).await;
        let p = world
            .partnership(&referrer, &acceptor, pb::SettlementCycle::Monthly, 0)
            .await;
        let cycle = parse_cycle(&format!("monthly:{zone}:{month}")).unwrap();
        assert_eq!(
            (cycle.start, cycle.end),
            (at(start), at(end)),
            "{zone} {month}"
        );
        let first = world.commission(&p, 1_000, 50, at(start)).await;
        let last = world
            .commission(&p, 2_000, 100, at(end) - Duration::seconds(1))
            .await;
        let _later = world.commission(&p, 3_000, 150, at(end)).await;
        // The month before holds nothing; this month takes exactly its two lines.
        let summary = world.close(&cycle).await;
        assert_eq!(summary.settled_lines, 2, "{zone} {month}");
        let statement = world.statements(&referrer).await.pop().unwrap();
        let ids: Vec<&str> = statement
            .lines
            .iter()
            .map(|l| l.purchase_id.as_str())
            .collect();
        assert_eq!(ids, [first.as_str(), last.as_str()]);
        assert_eq!(statement.cycle, format!("monthly:{zone}:{month}"));
    }
}

#[tokio::test]
async fn a_refund_after_settlement_is_a_negative_line_in_the_next_cycle_which_may_hold_only_adjustments(
) {
    let world = World::new().await;
    let referrer = world.merchant("UTC").await;
    let acceptor = world.merchant("UTC").await;
    let p = world
        .partnership(&referrer, &acceptor, pb::SettlementCycle::Daily, 0)
        .await;
    let day = daily("UTC", "2026-05-04");
    let purchase = world
        .commission(&p, 10_000, 500, at("2026-05-04T10:00:00Z"))
        .await;
    world.close(&day).await;
    // Refunded the next day: the ledger reverses 200 of the settled 500.
    let refund = world
        .refund(&p, &purchase, 4_000, 200, at("2026-05-05T09:00:00Z"))
        .await;
    let summary = world.close(&day.next()).await;
    assert_eq!(summary.settled_lines, 1);
    assert_eq!(summary.payout_instructions, 1);
    let statements = world.statements(&referrer).await;
    let adjustment = &statements[1];
    assert_eq!(adjustment.lines.len(), 1, "only the adjustment");
    let line = &adjustment.lines[0];
    assert_eq!(line.kind, LineKind::Clawback);
    assert_eq!(line.refund_id.as_deref(), Some(refund.as_str()));
    assert_eq!(line.purchase_id, purchase);
    assert_eq!(
        (line.purchase_amount_minor, line.amount_minor),
        (4_000, -200)
    );
    assert_eq!(net(adjustment), -200);
    // The referrer pays the claw-back back to the acceptor.
    let payouts = settlement::payouts::list(&world.pool, Some(&day.next().key()), None, 0, 10)
        .await
        .unwrap();
    assert_eq!(payouts.len(), 1);
    assert_eq!(
        (
            payouts[0].from_merchant_id.as_str(),
            payouts[0].to_merchant_id.as_str(),
            payouts[0].amount_minor
        ),
        (referrer.as_str(), acceptor.as_str(), 200)
    );
    // A reversal before the commission was payable reduces the line instead.
    let reduced = world.attributed(&p, 10_000, 500).await;
    world
        .refund(&p, &reduced, 2_000, 100, at("2026-05-06T08:00:00Z"))
        .await;
    world
        .payable(&p, &reduced, at("2026-05-06T09:00:00Z"))
        .await;
    world.close(&day.next().next()).await;
    let last = world.statements(&referrer).await.pop().unwrap();
    assert_eq!(last.lines.len(), 1);
    assert_eq!(
        (last.lines[0].kind, last.lines[0].amount_minor),
        (LineKind::Commission, 400)
    );
}

#[tokio::test]
async fn closing_is_idempotent_refuses_what_it_cannot_do_and_a_late_line_goes_into_the_next_cycle()
{
    let world = World::new().await;
    let referrer = world.merchant("Europe/Paris").await;
    let acceptor = world.merchant("Europe/Paris").await;
    let p = world
        .partnership(&referrer, &acceptor, pb::SettlementCycle::Daily, 0)
        .await;
    let day = daily("Europe/Paris", "2026-07-01");
    world
        .commission(&p, 10_000, 500, day.start + Duration::hours(3))
        .await;
    // A later cycle cannot close before this one.
    match close_cycle(&world.pool, &day.next(), Utc::now(), &world.wake)
        .await
        .unwrap()
    {
        Err(CloseRefused::EarlierOpen { earlier, .. }) => assert_eq!(earlier, day.key()),
        other => panic!("expected EarlierOpen, got {other:?}"),
    }
    // Nor a cycle that has not ended.
    let today = Cycle::containing(
        CycleKind::Daily,
        "Europe/Paris".parse().unwrap(),
        Utc::now(),
    );
    assert!(matches!(
        close_cycle(&world.pool, &today, Utc::now(), &world.wake)
            .await
            .unwrap(),
        Err(CloseRefused::NotEnded { .. })
    ));
    // Two closings at once give one statement set.
    let (a, b) = tokio::join!(
        close_cycle(&world.pool, &day, Utc::now(), &world.wake),
        close_cycle(&world.pool, &day, Utc::now(), &world.wake)
    );
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    assert_eq!(a.closed_now as u8 + b.closed_now as u8, 1, "{a:?} {b:?}");
    assert_eq!(
        (a.statements, a.settled_lines),
        (b.statements, b.settled_lines)
    );
    let again = world.close(&day).await;
    assert!(!again.closed_now);
    assert_eq!(world.statements(&referrer).await.len(), 1);

    // A commission payable in the closed cycle that arrives after it closed: the next cycle.
    let late = world
        .commission(&p, 6_000, 300, day.start + Duration::hours(5))
        .await;
    let statements = world.statements(&referrer).await;
    assert_eq!(
        statements[0].lines.len(),
        1,
        "a closed statement never changes"
    );
    world.close(&day.next()).await;
    let statements = world.statements(&referrer).await;
    assert_eq!(statements[1].lines[0].purchase_id, late);
    // Cycles close in order: one before the latest closed cycle of its kind and zone cannot.
    match close_cycle(
        &world.pool,
        &daily("Europe/Paris", "2026-06-30"),
        Utc::now(),
        &world.wake,
    )
    .await
    .unwrap()
    {
        Err(CloseRefused::NotAfterLatest { latest, .. }) => assert_eq!(latest, day.next().key()),
        other => panic!("expected NotAfterLatest, got {other:?}"),
    }

    // A line whose terms settlement has not received: no cycle can close past it.
    let stranger = Partnership {
        id: PartnershipId::generate().to_string(),
        referrer: referrer.clone(),
        acceptor: acceptor.clone(),
    };
    world
        .commission(
            &stranger,
            1_000,
            50,
            day.next().next().start + Duration::hours(1),
        )
        .await;
    assert!(matches!(
        close_cycle(&world.pool, &day.next().next(), Utc::now(), &world.wake)
            .await
            .unwrap(),
        Err(CloseRefused::AwaitingAdmin { .. })
    ));
}

#[tokio::test]
async fn the_minimum_payout_carries_small_amounts_forward_and_says_so() {
    let world = World::new().await;
    let referrer = world.merchant("UTC").await;
    let acceptor = world.merchant("UTC").await;
    let p = world
        .partnership(&referrer, &acceptor, pb::SettlementCycle::Daily, 1_000)
        .await;
    let day = daily("UTC", "2026-04-01");
    world
        .commission(&p, 6_000, 300, at("2026-04-01T10:00:00Z"))
        .await;
    let first = world.close(&day).await;
    assert_eq!((first.settled_lines, first.carried_forward_lines), (0, 1));
    assert_eq!(first.payout_instructions, 0);
    let statement = world.statements(&referrer).await.pop().unwrap();
    assert_eq!(statement.lines[0].status, LineStatus::CarriedForward);
    let total = statement.totals().into_values().next().unwrap();
    assert_eq!((total.net_minor, total.carried_forward_minor), (0, 300));

    world
        .commission(&p, 16_000, 800, at("2026-04-02T10:00:00Z"))
        .await;
    let second = world.close(&day.next()).await;
    assert_eq!((second.settled_lines, second.carried_forward_lines), (2, 0));
    let statement = world.statements(&referrer).await.pop().unwrap();
    assert_eq!(net(&statement), 1_100, "nothing lost on the way");
    let payouts = settlement::payouts::list(&world.pool, Some(&day.next().key()), None, 0, 10)
        .await
        .unwrap();
    assert_eq!(payouts[0].amount_minor, 1_100);
}

#[tokio::test]
async fn projections_rebuilt_from_the_closures_give_byte_identical_statements() {
    let world = World::new().await;
    let a = world.merchant("Europe/Paris").await;
    let b = world.merchant("Europe/Paris").await;
    let c = world.merchant("Europe/Paris").await;
    let ab = world
        .partnership(&a, &b, pb::SettlementCycle::Daily, 0)
        .await;
    let ba = world
        .partnership(&b, &a, pb::SettlementCycle::Daily, 0)
        .await;
    let cb = world
        .partnership(&c, &b, pb::SettlementCycle::Daily, 500)
        .await;
    let day = daily("Europe/Paris", "2026-08-03");
    for hour in 1..6 {
        world
            .commission(
                &ab,
                10_000 * hour,
                500 * hour,
                day.start + Duration::hours(hour),
            )
            .await;
        world
            .commission(
                &ba,
                3_000 * hour,
                150 * hour,
                day.start + Duration::hours(hour) + Duration::minutes(1),
            )
            .await;
        world
            .commission(
                &cb,
                1_000,
                50,
                day.start + Duration::hours(hour) + Duration::minutes(2),
            )
            .await;
    }
    let purchase = world
        .commission(&ab, 8_000, 400, day.start + Duration::hours(7))
        .await;
    world.close(&day).await;
    world
        .refund(&ab, &purchase, 8_000, 400, day.end + Duration::hours(2))
        .await;
    world
        .commission(&cb, 20_000, 1_000, day.end + Duration::hours(3))
        .await;
    world.close(&day.next()).await;

    let snapshot = |statements: Vec<Statement>| {
        statements
            .iter()
            .map(|s| (s.canonical_csv(), s.content_hash()))
            .collect::<Vec<_>>()
    };
    let mut before = Vec::new();
    for merchant in [&a, &b, &c] {
        before.push(snapshot(world.statements(merchant).await));
    }
    let hashes: Vec<(String, i32, String)> =
        sqlx::query_as("SELECT merchant_id, number, content_hash FROM statements ORDER BY 1, 2")
            .fetch_all(&world.pool)
            .await
            .unwrap();
    assert_eq!(rebuild_projections(&world.pool).await.unwrap(), 2);
    let mut after = Vec::new();
    for merchant in [&a, &b, &c] {
        after.push(snapshot(world.statements(merchant).await));
    }
    assert_eq!(before, after);
    let rebuilt: Vec<(String, i32, String)> =
        sqlx::query_as("SELECT merchant_id, number, content_hash FROM statements ORDER BY 1, 2")
            .fetch_all(&world.pool)
            .await
            .unwrap();
    assert_eq!(hashes, rebuilt);
    // C's 250 on the first day is under its 500 minimum: carried into the second.
    let c_statements = world.statements(&c).await;
    assert!(c_statements[0]
        .lines
        .iter()
        .all(|l| l.status == LineStatus::CarriedForward));
    assert_eq!(net(&c_statements[1]), 1_250);
}

/// The Python with lxml and sepaxml's schemas that `deploy/local/test.sh` prepares.
fn checker_python() -> String {
    std::env::var("TANDEM_TOOLS_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/tandem/checkers-sepaxml-2.7.0-lxml-6.1.3/bin/python")
    })
}

fn run(program: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} could not run ({e}); deploy/local/test.sh installs it")
        });
    assert!(
        output.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn payout_files_validate_against_the_iso_20022_schema_and_exports_carry_the_statement() {
    let world = World::new().await;
    let a = world.merchant("Europe/Paris").await;
    let b = world.merchant("Europe/Paris").await;
    let c = world.merchant("Europe/Paris").await;
    for (merchant, iban, bic, holder) in [
        (
            &a,
            "FR76 3000 6000 0112 3456 7890 189",
            "BNPAFRPPXXX",
            "Boulangerie A & Fils",
        ),
        (&b, "DE89370400440532013000", "COBADEFFXXX", "Café B <GmbH>"),
        (&c, "NL91ABNA0417164300", "ABNANL2A", "C \"Fietsen\" B.V."),
    ] {
        world
            .admin(
                merchant,
                pb::event_envelope::Payload::PayoutAccountRegistered(pb::PayoutAccountRegistered {
                    merchant_id: merchant.clone(),
                    iban: iban.replace(' ', ""),
                    bic: bic.into(),
                    account_holder: holder.into(),
                    registered_at: Some(timestamp(at("2026-01-01T00:00:00Z"))),
                }),
            )
            .await;
    }
    let ab = world
        .partnership(&a, &b, pb::SettlementCycle::Monthly, 0)
        .await;
    let ba = world
        .partnership(&b, &a, pb::SettlementCycle::Monthly, 0)
        .await;
    let cb = world
        .partnership(&c, &b, pb::SettlementCycle::Monthly, 0)
        .await;
    let month = parse_cycle("monthly:Europe/Paris:2026-02-01").unwrap();
    world
        .commission(&ab, 100_000, 5_000, at("2026-02-03T10:00:00Z"))
        .await;
    world
        .commission(&ba, 40_000, 2_000, at("2026-02-04T10:00:00Z"))
        .await;
    world
        .commission(&cb, 25_050, 1_253, at("2026-02-05T10:00:00Z"))
        .await;
    let summary = world.close(&month).await;
    // A is owed 5000 - 2000 by B, C 1253 by B: B pays both, two transfers.
    assert_eq!(summary.payout_instructions, 2);
    let eur = tandem_domain::money::Currency::parse("c", "EUR").unwrap();
    let file = settlement::payouts::payout_file(&world.pool, &month.key(), eur, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((file.transactions, file.control_sum_minor), (2, 4_253));
    let directory =
        std::env::temp_dir().join(format!("tandem-settlement-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&directory).unwrap();
    let xml_path = directory.join("pain001.xml");
    std::fs::write(&xml_path, &file.xml).unwrap();
    let checker = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/checkers/validate_pain001.py"
    );
    let verdict = run(&checker_python(), &[checker, xml_path.to_str().unwrap()]);
    assert!(verdict.contains("valid pain.001.001.09"), "{verdict}");
    assert!(
        file.xml.contains("<InstdAmt Ccy=\"EUR\">30.00</InstdAmt>"),
        "{}",
        file.xml
    );
    assert!(file.xml.contains("<InstdAmt Ccy=\"EUR\">12.53</InstdAmt>"));
    assert!(file.xml.contains("Boulangerie A &amp; Fils"));
    // The same request gives the same bytes.
    let again = settlement::payouts::payout_file(&world.pool, &month.key(), eur, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.xml, file.xml);

    // B's statement: its exports carry the same lines and totals, and the JSON gives back the
    // CSV's bytes, so either verifies the hash.
    let statement = world.statements(&b).await.pop().unwrap();
    let hash = statement.content_hash();
    let json = settlement::statements::to_json(&statement).unwrap();
    let canonical = settlement::statements::canonical_from_json(&json).unwrap();
    assert_eq!(canonical, statement.canonical_csv());
    // A partner's check of the JSON export, with Python's standard library alone.
    let json_path = directory.join("statement.json");
    std::fs::write(&json_path, &json).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/checkers/verify_statement_json.py"
    );
    let verdict = run("python3", &[script, json_path.to_str().unwrap(), &hash]);
    assert!(verdict.contains("matches"), "{verdict}");
    assert!(statement
        .canonical_csv()
        .contains(r#""receipt 42, ""window""""#));
    let pdf_path = directory.join("statement.pdf");
    std::fs::write(&pdf_path, settlement::pdf::render(&statement, &hash)).unwrap();
    let text = run("pdftotext", &["-layout", pdf_path.to_str().unwrap(), "-"]);
    let total = statement.totals().into_values().next().unwrap();
    assert_eq!(
        (total.receivable_minor, total.payable_minor, total.net_minor),
        (2_000, -6_253, -4_253)
    );
    for expected in [
        hash.as_str(),
        "-4253",
        "-6253",
        "2000",
        "monthly:Europe/Paris:2026-02-01",
        statement.merchant_id.as_str(),
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from the PDF text:\n{text}"
        );
    }
    for line in &statement.lines {
        assert!(
            text.contains(&line.purchase_id),
            "{} missing",
            line.purchase_id
        );
        assert!(text.contains(&line.amount_minor.to_string()));
        // Too long for its column, so printed in full on the row below.
        assert!(text.contains(&line.referrer_reference), "{text}");
        assert!(text.contains(&line.referral_id) && text.contains(line.partnership_id.as_str()));
    }
    std::fs::remove_dir_all(&directory).ok();
    // Without an account, no file: the operator is told who must register one.
    let d = world.merchant("Europe/Paris").await;
    let db = world
        .partnership(&d, &b, pb::SettlementCycle::Monthly, 0)
        .await;
    world
        .commission(&db, 1_000, 50, at("2026-03-02T10:00:00Z"))
        .await;
    let march = month.next();
    world.close(&march).await;
    match settlement::payouts::payout_file(&world.pool, &march.key(), eur, None)
        .await
        .unwrap()
    {
        Err(settlement::payouts::FileRefused::MissingAccounts(merchants)) => {
            assert_eq!(merchants, [d])
        }
        other => panic!("expected MissingAccounts, got {:?}", other.map(|f| f.xml)),
    }
}

#[tokio::test]
async fn a_message_delivered_twice_in_one_batch_is_applied_once() {
    let world = World::new().await;
    let referrer = world.merchant("UTC").await;
    let acceptor = world.merchant("UTC").await;
    let p = world
        .partnership(&referrer, &acceptor, pb::SettlementCycle::Daily, 0)
        .await;
    let purchase = world.attributed(&p, 10_000, 500).await;
    // A relay that resent a batch: the same reversal twice, side by side.
    let reversal = pb::LedgerEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        schema_version: 1,
        partnership_id: p.id.clone(),
        referrer_merchant_id: referrer.clone(),
        acceptor_merchant_id: acceptor.clone(),
        recorded_at: Some(timestamp(at("2026-05-04T08:00:00Z"))),
        event: Some(pb::ledger_event::Event::CommissionReversed(
            pb::CommissionReversed {
                refund_id: RefundId::generate().to_string(),
                purchase_id: purchase.clone(),
                refund: Some(eur(2_000)),
                reversal: Some(eur(100)),
                refunded_at: Some(timestamp(at("2026-05-04T08:00:00Z"))),
                within_holding_period: true,
            },
        )),
    }
    .encode_to_vec();
    world
        .deliver_batch(Topic::Ledger, &p.id, vec![reversal.clone(), reversal])
        .await;
    world
        .payable(&p, &purchase, at("2026-05-04T10:00:00Z"))
        .await;
    world.close(&daily("UTC", "2026-05-04")).await;
    let statement = world.statements(&referrer).await.pop().unwrap();
    assert_eq!(
        statement.lines[0].amount_minor, 400,
        "the reversal counted once"
    );
}

#[tokio::test]
async fn an_instruction_keeps_the_accounts_of_its_closure_so_its_file_never_changes() {
    let world = World::new().await;
    let referrer = world.merchant("UTC").await;
    let acceptor = world.merchant("UTC").await;
    let p = world
        .partnership(&referrer, &acceptor, pb::SettlementCycle::Daily, 0)
        .await;
    world
        .account(
            &acceptor,
            "DE89370400440532013000",
            "COBADEFFXXX",
            "Acceptor GmbH",
        )
        .await;
    world
        .commission(&p, 10_000, 500, at("2026-05-04T10:00:00Z"))
        .await;
    let day = daily("UTC", "2026-05-04");
    world.close(&day).await;
    let eur = tandem_domain::money::Currency::parse("c", "EUR").unwrap();
    // The referrer had no account when the cycle closed: no file yet, and it says who.
    match settlement::payouts::payout_file(&world.pool, &day.key(), eur, None)
        .await
        .unwrap()
    {
        Err(settlement::payouts::FileRefused::MissingAccounts(who)) => {
            assert_eq!(who, std::slice::from_ref(&referrer))
        }
        other => panic!("expected MissingAccounts, got {:?}", other.map(|f| f.xml)),
    }
    // It registers one: that one is used. Later registrations, by either merchant, change
    // nothing in this cycle's file.
    world
        .account(
            &referrer,
            "FR7630006000011234567890189",
            "BNPAFRPPXXX",
            "Referrer SARL",
        )
        .await;
    let file = settlement::payouts::payout_file(&world.pool, &day.key(), eur, None)
        .await
        .unwrap()
        .unwrap();
    assert!(file.xml.contains("FR7630006000011234567890189"));
    world
        .account(&referrer, "NL91ABNA0417164300", "ABNANL2A", "Someone Else")
        .await;
    world
        .account(&acceptor, "BE68539007547034", "GEBABEBB", "Acceptor Two")
        .await;
    let again = settlement::payouts::payout_file(&world.pool, &day.key(), eur, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.xml, file.xml);
    assert!(!again.xml.contains("NL91ABNA0417164300") && !again.xml.contains("BE68539007547034"));
}

#[tokio::test]
async fn a_correction_is_a_new_statement_naming_the_corrected_one_and_settles_next_cycle() {
    use settlement::corrections::{issue, CorrectionRefused, CorrectionRequest};
    let world = World::new().await;
    let referrer = world.merchant("UTC").await;
    let acceptor = world.merchant("UTC").await;
    let other = world.merchant("UTC").await;
    let p = world
        .partnership(&referrer, &acceptor, pb::SettlementCycle::Daily, 0)
        .await;
    let elsewhere = world
        .partnership(&other, &acceptor, pb::SettlementCycle::Daily, 0)
        .await;
    let day = daily("UTC", "2026-05-04");
    world
        .commission(&p, 10_000, 500, at("2026-05-04T10:00:00Z"))
        .await;
    world.close(&day).await;
    let eur = tandem_domain::money::Currency::parse("c", "EUR").unwrap();
    let request = CorrectionRequest {
        idempotency_key: "correction-1".into(),
        merchant_id: MerchantId::parse("m", &referrer).unwrap(),
        statement_number: 1,
        partnership_id: PartnershipId::parse("p", &p.id).unwrap(),
        amount: tandem_domain::money::Money::new(120, eur),
        reason: "goodwill: purchase T-9 missed by the till".into(),
    };
    // Issued on the next day, so the next day's cycle settles it.
    let when = at("2026-05-05T09:00:00Z");
    let corrected = issue(&world.pool, &request, when, &world.wake)
        .await
        .unwrap()
        .unwrap();
    assert!(corrected.created_now);
    let mut issued = corrected.statements.clone();
    issued.sort();
    let mut expected = vec![(acceptor.clone(), 2), (referrer.clone(), 2)];
    expected.sort();
    assert_eq!(
        issued, expected,
        "one for each side, naming its statement 1"
    );
    let mine = world.statements(&referrer).await;
    assert_eq!(mine.len(), 2);
    let correction = &mine[1];
    assert_eq!((correction.number, correction.corrects), (2, Some(1)));
    assert_eq!(correction.cycle, day.key(), "it corrects that cycle");
    assert_eq!(correction.lines.len(), 1);
    let line = &correction.lines[0];
    assert_eq!(
        (line.kind, line.status, line.amount_minor),
        (LineKind::Adjustment, LineStatus::CarriedForward, 120)
    );
    assert_eq!(line.rule, "goodwill: purchase T-9 missed by the till");
    assert!(correction
        .canonical_csv()
        .contains(",adjustment,carried_forward,"));
    let theirs = world.statements(&acceptor).await;
    assert_eq!(
        (theirs[1].corrects, theirs[1].lines[0].amount_minor),
        (Some(1), -120)
    );
    // The original statements did not change.
    assert_eq!(mine[0].lines.len(), 1);

    // A retry answers the same correction; the key with another request is refused.
    let again = issue(&world.pool, &request, when, &world.wake)
        .await
        .unwrap()
        .unwrap();
    assert!(!again.created_now);
    assert_eq!(again.statements, corrected.statements);
    let mut changed = request.clone();
    changed.amount = tandem_domain::money::Money::new(121, eur);
    assert!(matches!(
        issue(&world.pool, &changed, when, &world.wake)
            .await
            .unwrap(),
        Err(CorrectionRefused::KeyReused(_))
    ));
    let mut stranger = request.clone();
    stranger.idempotency_key = "correction-2".into();
    stranger.partnership_id = PartnershipId::parse("p", &elsewhere.id).unwrap();
    assert!(matches!(
        issue(&world.pool, &stranger, when, &world.wake)
            .await
            .unwrap(),
        Err(CorrectionRefused::NotAParty { .. })
    ));
    let mut missing = request.clone();
    missing.idempotency_key = "correction-3".into();
    missing.statement_number = 9;
    assert!(matches!(
        issue(&world.pool, &missing, when, &world.wake)
            .await
            .unwrap(),
        Err(CorrectionRefused::NoStatement { .. })
    ));

    // The next day's cycle settles the adjustment and pays it.
    let next = world.close(&day.next()).await;
    assert_eq!(next.settled_lines, 1);
    let settled = world.statements(&referrer).await.pop().unwrap();
    assert_eq!((settled.number, settled.corrects), (3, None));
    assert_eq!(
        (
            settled.lines[0].kind,
            settled.lines[0].status,
            settled.lines[0].amount_minor
        ),
        (LineKind::Adjustment, LineStatus::Settled, 120)
    );
    let payouts = settlement::payouts::list(&world.pool, Some(&day.next().key()), None, 0, 10)
        .await
        .unwrap();
    assert_eq!(
        (
            payouts[0].from_merchant_id.as_str(),
            payouts[0].amount_minor
        ),
        (acceptor.as_str(), 120)
    );

    // Rebuilt in the order things happened: every statement the same, numbers included.
    let before: Vec<(u32, String)> = world
        .statements(&referrer)
        .await
        .iter()
        .map(|s| (s.number, s.content_hash()))
        .collect();
    rebuild_projections(&world.pool).await.unwrap();
    let after: Vec<(u32, String)> = world
        .statements(&referrer)
        .await
        .iter()
        .map(|s| (s.number, s.content_hash()))
        .collect();
    assert_eq!(before, after);
}
