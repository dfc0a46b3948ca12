//! Settlement, pure: when cycles cut off, and how a cycle's lines become net positions and
//! transfers.
//!
//! **Cycles.** A partnership settles daily, weekly (weeks start on Monday) or monthly (on the
//! 1st), with cut-offs at local midnight in the acceptor's IANA time zone, daylight-saving changes
//! included. The time-zone rules are the IANA database's, through `chrono-tz`. Where local
//! midnight does not exist (a zone that moves its clocks forward at midnight), the cycle starts at
//! the first local instant of that day; where it exists twice, at the first of the two.
//!
//! **Netting.** Each line says who pays whom, in which currency, and how much (a negative amount
//! is a claw-back: the payee owes it back). Per currency, a merchant's net position is what it is
//! owed minus what it owes; positions sum to zero. A merchant whose net position is positive but
//! below its minimum payout is not paid this cycle: every line of the cycle it takes part in, in
//! that currency, carries forward to the next cycle, and the positions are computed again without
//! them (which may carry another merchant forward in turn). The positions left are cleared by at
//! most (merchants with a non-zero position − 1) transfers: the largest debtor pays the largest
//! creditor as much as both allow, and so on, each transfer clearing at least one of the two.
//! Currencies are never converted.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Days, Duration, LocalResult, Months, NaiveDate, TimeZone, Utc};
pub use chrono_tz::Tz;

use crate::ids::MerchantId;
use crate::money::Currency;
use crate::ValidationError;

/// How often a partnership settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CycleKind {
    Daily,
    Weekly,
    Monthly,
}

impl CycleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CycleKind::Daily => "daily",
            CycleKind::Weekly => "weekly",
            CycleKind::Monthly => "monthly",
        }
    }

    pub fn parse(field: &str, value: &str) -> Result<Self, ValidationError> {
        match value {
            "daily" => Ok(CycleKind::Daily),
            "weekly" => Ok(CycleKind::Weekly),
            "monthly" => Ok(CycleKind::Monthly),
            other => Err(ValidationError::new(
                field,
                format!("must be daily, weekly or monthly, got {other:?}"),
            )),
        }
    }
}

/// An IANA time zone such as `Europe/Paris` (or `UTC`), known to the time-zone database.
pub fn parse_time_zone(field: &str, value: &str) -> Result<Tz, ValidationError> {
    value.trim().parse::<Tz>().map_err(|_| {
        ValidationError::new(
            field,
            format!(
                "{value:?} is not a time zone of the IANA database; use a name such as Europe/Paris, America/New_York or UTC"
            ),
        )
    })
}

/// One cycle of one kind in one time zone: `[start, end)`, both local midnights, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cycle {
    pub kind: CycleKind,
    pub time_zone: Tz,
    /// The local date the cycle starts on.
    pub first_day: NaiveDate,
    pub start: DateTime<Utc>,
    /// The cut-off: what became payable before it belongs to this cycle or an earlier one.
    pub end: DateTime<Utc>,
}

impl Cycle {
    /// The cycle that contains `instant`.
    pub fn containing(kind: CycleKind, time_zone: Tz, instant: DateTime<Utc>) -> Self {
        let local_day = instant.with_timezone(&time_zone).date_naive();
        let first_day = period_start(kind, local_day);
        let cycle = Self::starting(kind, time_zone, first_day);
        // Local midnight of a day that starts in a gap is later than midnight; an instant of
        // that day is never before it, so `cycle` contains `instant`.
        debug_assert!(cycle.start <= instant && instant < cycle.end);
        cycle
    }

    /// The cycle that starts on `first_day` (which must be a period start for `kind`).
    pub fn starting(kind: CycleKind, time_zone: Tz, first_day: NaiveDate) -> Self {
        let next_day = next_period_start(kind, first_day);
        Self {
            kind,
            time_zone,
            first_day,
            start: local_midnight(time_zone, first_day),
            end: local_midnight(time_zone, next_day),
        }
    }

    /// The cycle after this one.
    pub fn next(&self) -> Self {
        Self::starting(
            self.kind,
            self.time_zone,
            next_period_start(self.kind, self.first_day),
        )
    }

    /// The last local day of the cycle.
    pub fn last_day(&self) -> NaiveDate {
        next_period_start(self.kind, self.first_day)
            .pred_opt()
            .unwrap_or(self.first_day)
    }

    /// A stable name: `<kind>:<time zone>:<first day>`, e.g. `monthly:Europe/Paris:2026-03-01`.
    pub fn key(&self) -> String {
        format!(
            "{}:{}:{}",
            self.kind.as_str(),
            self.time_zone.name(),
            self.first_day
        )
    }
}

fn period_start(kind: CycleKind, day: NaiveDate) -> NaiveDate {
    match kind {
        CycleKind::Daily => day,
        CycleKind::Weekly => day - Days::new(u64::from(day.weekday().num_days_from_monday())),
        CycleKind::Monthly => day.with_day(1).unwrap_or(day),
    }
}

fn next_period_start(kind: CycleKind, first_day: NaiveDate) -> NaiveDate {
    let next = match kind {
        CycleKind::Daily => first_day.checked_add_days(Days::new(1)),
        CycleKind::Weekly => first_day.checked_add_days(Days::new(7)),
        CycleKind::Monthly => first_day.checked_add_months(Months::new(1)),
    };
    next.unwrap_or(NaiveDate::MAX)
}

/// The first instant of local day `day` in `time_zone`: midnight, or where midnight falls in a
/// daylight-saving gap, the first local time that exists that day; where midnight happens twice,
/// the first.
pub fn local_midnight(time_zone: Tz, day: NaiveDate) -> DateTime<Utc> {
    let midnight = day.and_time(chrono::NaiveTime::MIN);
    // Gaps are at most a few hours (the largest in the database is 24 h, a skipped day: then
    // the next day's midnight is the answer, which the loop reaches too).
    for minutes in 0..=(26 * 60) {
        let local = midnight + Duration::minutes(minutes);
        match time_zone.from_local_datetime(&local) {
            LocalResult::Single(instant) => return instant.with_timezone(&Utc),
            LocalResult::Ambiguous(first, _) => return first.with_timezone(&Utc),
            LocalResult::None => continue,
        }
    }
    // Unreachable with the IANA database; fall back to UTC midnight rather than panic.
    Utc.from_utc_datetime(&midnight)
}

/// One line of a cycle, as netting sees it: `payer` owes `payee` `amount_minor` (negative: the
/// payee owes it back) in `currency`.
pub trait Line {
    fn payer(&self) -> &MerchantId;
    fn payee(&self) -> &MerchantId;
    fn currency(&self) -> Currency;
    fn amount_minor(&self) -> i64;
}

/// A transfer that clears positions: `from` pays `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub from: MerchantId,
    pub to: MerchantId,
    pub currency: Currency,
    pub amount_minor: i128,
}

/// A cycle's lines netted.
#[derive(Debug, Clone)]
pub struct Netting<L> {
    /// Lines settled in this cycle, in the order given.
    pub settled: Vec<L>,
    /// Lines carried forward to the next cycle, each with the merchant whose minimum payout
    /// held it back.
    pub carried: Vec<(L, MerchantId)>,
    /// Net position per currency and merchant over the settled lines (non-zero ones only):
    /// positive is owed to the merchant.
    pub positions: BTreeMap<(Currency, MerchantId), i128>,
    /// Transfers clearing the positions, per currency in order.
    pub transfers: Vec<Transfer>,
}

/// Nets `lines`. `minimum_payout(merchant, currency)` is the smallest amount a merchant is paid.
pub fn net<L: Line>(
    lines: Vec<L>,
    minimum_payout: impl Fn(&MerchantId, Currency) -> i64,
) -> Netting<L> {
    let mut settled: Vec<Option<L>> = lines.into_iter().map(Some).collect();
    let mut carried = Vec::new();
    loop {
        let positions = positions_of(settled.iter().flatten());
        let held_back: BTreeSet<(Currency, MerchantId)> = positions
            .iter()
            .filter(|((currency, merchant), position)| {
                **position > 0 && **position < i128::from(minimum_payout(merchant, *currency))
            })
            .map(|(key, _)| key.clone())
            .collect();
        if held_back.is_empty() {
            let transfers = clear(&positions);
            return Netting {
                settled: settled.into_iter().flatten().collect(),
                carried,
                positions,
                transfers,
            };
        }
        for slot in &mut settled {
            let holder = slot.as_ref().and_then(|line| {
                let currency = line.currency();
                [line.payee(), line.payer()]
                    .into_iter()
                    .find(|m| held_back.contains(&(currency, (*m).clone())))
                    .cloned()
            });
            if let Some(holder) = holder {
                if let Some(line) = slot.take() {
                    carried.push((line, holder));
                }
            }
        }
    }
}

/// Net positions per currency and merchant, zeros left out.
pub fn positions_of<'a, L: Line + 'a>(
    lines: impl IntoIterator<Item = &'a L>,
) -> BTreeMap<(Currency, MerchantId), i128> {
    // Keyed by reference while summing (no id is copied per line), then owned.
    let mut sums: std::collections::HashMap<(Currency, &MerchantId), i128> =
        std::collections::HashMap::new();
    for line in lines {
        let amount = i128::from(line.amount_minor());
        *sums.entry((line.currency(), line.payee())).or_default() += amount;
        *sums.entry((line.currency(), line.payer())).or_default() -= amount;
    }
    sums.into_iter()
        .filter(|(_, position)| *position != 0)
        .map(|((currency, merchant), position)| ((currency, merchant.clone()), position))
        .collect()
}

/// Transfers clearing `positions`: per currency, the largest debtor pays the largest creditor as
/// much as both allow (ties by merchant id), until every position is zero. Each transfer clears at
/// least one position and the last clears two, so a currency with `n` non-zero positions takes at
/// most `n − 1` transfers.
pub fn clear(positions: &BTreeMap<(Currency, MerchantId), i128>) -> Vec<Transfer> {
    let currencies: BTreeSet<Currency> = positions.keys().map(|(c, _)| *c).collect();
    let mut transfers = Vec::new();
    for currency in currencies {
        let mut debtors: Vec<(MerchantId, i128)> = Vec::new();
        let mut creditors: Vec<(MerchantId, i128)> = Vec::new();
        for ((c, merchant), position) in positions {
            if *c != currency {
                continue;
            }
            if *position < 0 {
                debtors.push((merchant.clone(), -position));
            } else if *position > 0 {
                creditors.push((merchant.clone(), *position));
            }
        }
        let order =
            |a: &(MerchantId, i128), b: &(MerchantId, i128)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
        debtors.sort_by(order);
        creditors.sort_by(order);
        let (mut d, mut c) = (0, 0);
        while d < debtors.len() && c < creditors.len() {
            let amount = debtors[d].1.min(creditors[c].1);
            transfers.push(Transfer {
                from: debtors[d].0.clone(),
                to: creditors[c].0.clone(),
                currency,
                amount_minor: amount,
            });
            debtors[d].1 -= amount;
            creditors[c].1 -= amount;
            if debtors[d].1 == 0 {
                d += 1;
            }
            if creditors[c].1 == 0 {
                c += 1;
            }
        }
    }
    transfers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn monthly_cycles_follow_local_midnight_across_daylight_saving() {
        let paris: Tz = parse_time_zone("tz", "Europe/Paris").unwrap();
        // March 2026: Paris moves to summer time on the 29th; the cycle starts at 00:00 CET
        // (23:00 UTC on Feb 28) and ends at 00:00 CEST (22:00 UTC on Mar 31).
        let march = Cycle::containing(CycleKind::Monthly, paris, utc("2026-03-15T12:00:00Z"));
        assert_eq!(march.start, utc("2026-02-28T23:00:00Z"));
        assert_eq!(march.end, utc("2026-03-31T22:00:00Z"));
        assert_eq!(march.key(), "monthly:Europe/Paris:2026-03-01");
        assert_eq!(march.next().start, march.end);
        let new_york: Tz = parse_time_zone("tz", "America/New_York").unwrap();
        // November 2026: New York returns to standard time on the 1st at 02:00.
        let november = Cycle::containing(CycleKind::Monthly, new_york, utc("2026-11-20T00:00:00Z"));
        assert_eq!(november.start, utc("2026-11-01T04:00:00Z"));
        assert_eq!(november.end, utc("2026-12-01T05:00:00Z"));
    }

    #[test]
    fn the_cut_off_separates_one_second_before_from_one_second_after() {
        let paris: Tz = "Europe/Paris".parse().unwrap();
        let day = Cycle::containing(CycleKind::Daily, paris, utc("2026-06-10T12:00:00Z"));
        let before = day.end - Duration::seconds(1);
        let after = day.end + Duration::seconds(1);
        assert_eq!(Cycle::containing(CycleKind::Daily, paris, before), day);
        assert_eq!(
            Cycle::containing(CycleKind::Daily, paris, after),
            day.next()
        );
    }

    #[test]
    fn weeks_start_on_monday_and_a_midnight_in_a_gap_starts_at_the_first_local_instant() {
        let paris: Tz = "Europe/Paris".parse().unwrap();
        let week = Cycle::containing(CycleKind::Weekly, paris, utc("2026-12-03T10:00:00Z"));
        assert_eq!(week.first_day.to_string(), "2026-11-30");
        assert_eq!(week.last_day().to_string(), "2026-12-06");
        // Santiago moved its clocks forward at midnight on 2022-09-11: that day began at 01:00.
        let santiago: Tz = "America/Santiago".parse().unwrap();
        let day = NaiveDate::from_ymd_opt(2022, 9, 11).unwrap();
        assert_eq!(local_midnight(santiago, day), utc("2022-09-11T04:00:00Z"));
    }

    #[test]
    fn unknown_time_zones_and_cycles_are_refused_precisely() {
        let error = parse_time_zone("time_zone", "Europe/Pariss").unwrap_err();
        assert_eq!(error.field, "time_zone");
        assert!(error.reason.contains("IANA"), "{error}");
        assert!(CycleKind::parse("cycle", "fortnightly").is_err());
    }
}
