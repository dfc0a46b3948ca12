//! The benchmark's merchant network: one acceptor, `partnerships` referrers each in partnership
//! with it on terms that refer every customer of the referrer automatically, and `customers`
//! customers, each referred by one referrer through a purchase there. The first referrer's
//! partnership is the hot one: half of the customers are its, so half of the traffic at the
//! acceptor is attributed to it; the other half is spread over the other partnerships.
//!
//! Referring through purchases (bulk calls at the referrers) rather than `CreateReferral` calls
//! makes 100 000 referred customers a minute's set-up instead of many.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use tandem_bus::{group_monitor, group_positions, BusConfig, Topic};
use tandem_proto::v1 as pb;
use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;
use tandem_proto::v1::partnership_service_client::PartnershipServiceClient;
use tonic::transport::Channel;

use crate::call;
use crate::client::{authorised, GatewayArgs};

/// A merchant of the network.
#[derive(Debug, Clone)]
pub struct Member {
    pub merchant_id: String,
    pub api_key: String,
}

pub struct Network {
    pub tag: String,
    pub acceptor: Member,
    pub referrers: Vec<Member>,
    /// The hot partnership (the first referrer's).
    pub hot_partnership_id: String,
    pub customers: usize,
    pub pos: MerchantGatewayClient<Channel>,
}

/// What the network is built of.
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    pub gateway: crate::client::GatewayUrl,
    pub operator_token: String,
    pub bus: BusConfig,
    /// The ledger's consumer group prefix (`TANDEM_LEDGER_CONSUMER_GROUP`): the set-up waits
    /// until its attribution stage has read every referring purchase.
    pub ledger_group: String,
    pub partnerships: usize,
    pub customers: usize,
    pub concurrency: usize,
    pub timeout: Duration,
}

impl Network {
    /// Builds the network; returns once the ledger has recorded every customer's referral.
    pub async fn build(settings: &NetworkSettings) -> Result<Self, String> {
        if settings.partnerships < 2 || settings.customers < 2 * settings.partnerships {
            return Err(
                "the network needs at least 2 partnerships and 2 customers a partnership".into(),
            );
        }
        let args = GatewayArgs {
            url: settings.gateway.clone(),
            operator_token: settings.operator_token.clone(),
        };
        let (operator, pos) = args.clients().await?;
        let agreements = PartnershipServiceClient::new(args.channel()?);
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let token = settings.operator_token.clone();
        let started = Instant::now();

        let create = |name: String| {
            let mut operator = operator.clone();
            let token = token.clone();
            async move {
                let created = call!(
                    "create merchant",
                    operator.create_merchant(authorised(
                        pb::CreateMerchantRequest {
                            display_name: name.clone(),
                            settlement_currency: "EUR".into(),
                            time_zone: "Europe/Paris".into(),
                            idempotency_key: uuid::Uuid::new_v4().to_string(),
                            ..Default::default()
                        },
                        &token,
                    )?)
                )?;
                Ok::<_, String>(Member {
                    merchant_id: created.merchant_id,
                    api_key: created.api_key,
                })
            }
        };
        let acceptor = create(format!("bench acceptor {tag}")).await?;
        let names: Vec<String> = (0..settings.partnerships)
            .map(|i| format!("bench referrer {i} {tag}"))
            .collect();
        let referrers = in_parallel(settings.concurrency, names, create).await?;

        // Each partnership: the acceptor proposes automatic referrals at 5 %, the referrer accepts.
        let partnership = |(index, referrer): (usize, Member)| {
            let mut agreements = agreements.clone();
            let (acceptor, tag) = (acceptor.clone(), tag.clone());
            async move {
                let proposed = call!(
                    "propose terms",
                    agreements.propose_terms(authorised(
                        pb::ProposeTermsRequest {
                            idempotency_key: format!("bench-{tag}-terms-{index}"),
                            counterparty_merchant_id: referrer.merchant_id.clone(),
                            caller_role: pb::PartnershipRole::Acceptor as i32,
                            terms: Some(pb::Terms {
                                currency: "EUR".into(),
                                auto_refer: true,
                                attribution_window_days: 30,
                                rule: Some(pb::terms::Rule::PercentageBps(500)),
                                holding_period_days: 14,
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                        &acceptor.api_key,
                    )?)
                )?;
                call!(
                    "accept terms",
                    agreements.accept_terms(authorised(
                        pb::AcceptTermsRequest {
                            idempotency_key: format!("bench-{tag}-accept-{index}"),
                            partnership_id: proposed.partnership_id.clone(),
                            version: proposed.version,
                        },
                        &referrer.api_key,
                    )?)
                )?;
                Ok::<_, String>(proposed.partnership_id)
            }
        };
        let partnership_ids = in_parallel(
            settings.concurrency,
            referrers.iter().cloned().enumerate().collect(),
            partnership,
        )
        .await?;
        let partnerships_done = started.elapsed();

        // Every customer buys once at its referrer: the partnership refers it to the acceptor.
        let network = Network {
            tag: tag.clone(),
            acceptor,
            referrers,
            hot_partnership_id: partnership_ids[0].clone(),
            customers: settings.customers,
            pos,
        };
        let mut calls = Vec::new();
        for (index, referrer) in network.referrers.iter().enumerate() {
            let customers: Vec<usize> = (0..settings.customers)
                .filter(|&c| network.referrer_of(c) == index)
                .collect();
            for chunk in customers.chunks(500) {
                calls.push((referrer.api_key.clone(), chunk.to_vec()));
            }
        }
        let referring = |(api_key, customers): (String, Vec<usize>)| {
            let mut pos = network.pos.clone();
            let tag = tag.clone();
            async move {
                let request = pb::RecordPurchasesRequest {
                    purchases: customers
                        .iter()
                        .map(|&c| pb::RecordPurchaseRequest {
                            idempotency_key: format!("bench-{tag}-ref-{c}"),
                            transaction_id: format!("bench-{tag}-ref-{c}"),
                            customer: Some(customer(c)),
                            amount: Some(pb::Money {
                                amount_minor: 500,
                                currency: "EUR".into(),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                };
                let response = call!(
                    "record referring purchases",
                    pos.record_purchases(authorised(request.clone(), &api_key)?)
                )?;
                refused(&response).map_or(Ok(()), Err)
            }
        };
        in_parallel(settings.concurrency, calls, referring).await?;
        wait_for_ledger(settings).await?;
        eprintln!(
            "network: {} partnerships in {:.1} s, {} referred customers in {:.1} s more",
            settings.partnerships,
            partnerships_done.as_secs_f64(),
            settings.customers,
            (started.elapsed() - partnerships_done).as_secs_f64()
        );
        Ok(network)
    }

    /// The referrer (index) of customer `c`: the first for the first half of the customers, the
    /// others in turn for the second half.
    pub fn referrer_of(&self, c: usize) -> usize {
        let half = self.customers / 2;
        if c < half {
            0
        } else {
            1 + (c - half) % (self.referrers.len() - 1)
        }
    }

    /// The customer of purchase `index` at the acceptor: even purchases by the hot
    /// partnership's customers, odd ones by the others'.
    pub fn customer_of(&self, index: usize) -> usize {
        let half = self.customers / 2;
        if index.is_multiple_of(2) {
            (index / 2) % half
        } else {
            half + (index / 2) % (self.customers - half)
        }
    }

    /// Purchase `index` of run `run` at the acceptor.
    pub fn purchase(&self, run: &str, index: usize) -> pb::RecordPurchaseRequest {
        self.purchase_by(run, index, self.customer_of(index))
    }

    /// Purchase `index` of run `run` at the acceptor by one of the hot partnership's customers.
    pub fn hot_purchase(&self, run: &str, index: usize) -> pb::RecordPurchaseRequest {
        self.purchase_by(run, index, index % (self.customers / 2))
    }

    fn purchase_by(&self, run: &str, index: usize, c: usize) -> pb::RecordPurchaseRequest {
        purchase_request(&format!("{}-{run}", self.tag), index, c)
    }

    /// Purchases attributed at the acceptor so far: over every partnership, or one.
    pub async fn attributed(&self, partnership_id: Option<&str>) -> Result<u64, String> {
        let mut pos = self.pos.clone();
        let mut total = 0u64;
        let mut page_token = String::new();
        loop {
            let page = call!(
                "commission totals",
                pos.get_commission_totals(authorised(
                    pb::GetCommissionTotalsRequest {
                        role: pb::PartnershipRole::Acceptor as i32,
                        partnership_id: partnership_id.unwrap_or_default().to_owned(),
                        page_size: 500,
                        page_token: page_token.clone(),
                    },
                    &self.acceptor.api_key,
                )?)
            )?;
            total += page
                .totals
                .iter()
                .map(|t| u64::from(t.purchases))
                .sum::<u64>();
            if page.next_page_token.is_empty() {
                return Ok(total);
            }
            page_token = page.next_page_token;
        }
    }

    /// Waits until `target` purchases are attributed (see [`Network::attributed`]).
    pub async fn wait_attributed(
        &self,
        partnership_id: Option<&str>,
        target: u64,
        timeout: Duration,
    ) -> Result<u64, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let asked = Instant::now();
            let attributed = self.attributed(partnership_id).await?;
            if attributed >= target {
                return Ok(attributed);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "only {attributed} of {target} purchases attributed after {timeout:?}"
                ));
            }
            // The totals are summed over every line of the partnership: over a million lines a
            // query takes about a second, and asking every 50 ms kept a core of Postgres busy
            // during the history run's last tenth. Waiting four times as long as the answer took
            // keeps the harness's own load under a fifth.
            tokio::time::sleep(Duration::from_millis(50).max(asked.elapsed() * 4)).await;
        }
    }
}

/// Purchase `index` of the run tagged `tag`, by customer `c`: the shape every workload sends
/// (and the tonic ceiling's payload).
pub fn purchase_request(tag: &str, index: usize, c: usize) -> pb::RecordPurchaseRequest {
    pb::RecordPurchaseRequest {
        idempotency_key: format!("bench-{tag}-p{index}"),
        transaction_id: format!("bench-{tag}-{index}"),
        customer: Some(customer(c)),
        amount: Some(pb::Money {
            amount_minor: 1_000 + (index as i64 % 9_000),
            currency: "EUR".into(),
        }),
        ..Default::default()
    }
}

/// The bench's customer `c`: a phone number.
pub fn customer(c: usize) -> pb::CustomerIdentifiers {
    pb::CustomerIdentifiers {
        phone: format!("+3361{c:07}"),
        ..Default::default()
    }
}

/// The first refused item of a bulk answer, as an error.
pub fn refused(response: &pb::RecordPurchasesResponse) -> Option<String> {
    response.results.iter().find_map(|r| match &r.outcome {
        Some(pb::record_purchase_result::Outcome::Error(error)) => {
            Some(format!("a bulk item was refused: {}", error.message))
        }
        _ => None,
    })
}

/// Runs `work` over `items`, `concurrency` at a time; the results in the items' order.
pub async fn in_parallel<I, T, F, Fut>(
    concurrency: usize,
    items: Vec<I>,
    work: F,
) -> Result<Vec<T>, String>
where
    F: Fn(I) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    futures::stream::iter(items.into_iter().map(work))
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

/// Waits until the ledger's attribution stage has read the customer-activity topic to its end:
/// its lag is zero on every partition, and the partitions' ends have not moved for a second (the
/// gateway's relay publishes after the calls were answered, so the end is only known once it
/// stops moving).
async fn wait_for_ledger(settings: &NetworkSettings) -> Result<(), String> {
    let topics = [Topic::CustomerActivity.name(&settings.bus)];
    let group = format!("{}.activity", settings.ledger_group);
    let monitor = group_monitor(&settings.bus, &group).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + settings.timeout;
    let mut previous_ends: Option<Vec<i64>> = None;
    let mut stable_since = Instant::now();
    loop {
        let positions = group_positions(&monitor, &topics, Duration::from_secs(10))
            .map_err(|e| format!("position of {group}: {e}"))?;
        let behind: i64 = positions.iter().map(|p| p.lag).sum();
        let ends: Vec<i64> = positions.iter().map(|p| p.committed + p.lag).collect();
        if previous_ends.as_ref() != Some(&ends) {
            stable_since = Instant::now();
            previous_ends = Some(ends);
        }
        if behind == 0 && stable_since.elapsed() >= Duration::from_secs(1) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the ledger ({group}) is still {behind} messages behind after {:?}",
                settings.timeout
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
