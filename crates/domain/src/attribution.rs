//! Attribution: which referral, if any, earns the commission on a purchase.
//!
//! A purchase at acceptor A at instant `t` by a customer key `k` is attributed to a referral of
//! `k` to A whose window contains `t` (`referred_at <= t < attribution_ends_at`) and that was not
//! cancelled before `t`. When several referrals qualify, the partnership's touch policy decides:
//! the first (earliest `referred_at`) or the last (latest) wins, ties broken by referral id so
//! that every replay chooses the same one.

use chrono::{DateTime, Utc};

use crate::ids::ReferralId;
use crate::partnership::{AttributionWindow, TouchPolicy};

/// The end of a referral's attribution window (exclusive).
pub fn attribution_ends_at(referred_at: DateTime<Utc>, window: AttributionWindow) -> DateTime<Utc> {
    referred_at + window.length()
}

/// True if a purchase at `purchased_at` falls inside `[referred_at, ends_at)`.
pub fn is_within_window(
    referred_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
    purchased_at: DateTime<Utc>,
) -> bool {
    referred_at <= purchased_at && purchased_at < ends_at
}

/// An open referral that could earn a purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub referral_id: ReferralId,
    pub referred_at: DateTime<Utc>,
    pub attribution_ends_at: DateTime<Utc>,
    pub cancelled_at: Option<DateTime<Utc>>,
}

impl Candidate {
    fn qualifies(&self, purchased_at: DateTime<Utc>) -> bool {
        is_within_window(self.referred_at, self.attribution_ends_at, purchased_at)
            && self
                .cancelled_at
                .is_none_or(|cancelled| purchased_at < cancelled)
    }
}

/// The referral that earns a purchase at `purchased_at` under `policy`.
pub fn choose_referral(
    candidates: &[Candidate],
    purchased_at: DateTime<Utc>,
    policy: TouchPolicy,
) -> Option<&Candidate> {
    let qualifying = candidates.iter().filter(|c| c.qualifies(purchased_at));
    let order = |c: &&Candidate| (c.referred_at, c.referral_id.as_str().to_owned());
    match policy {
        TouchPolicy::FirstReferrer => qualifying.min_by_key(order),
        TouchPolicy::LastReferrer => qualifying.max_by_key(order),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use chrono::{Duration, TimeZone};

    fn at(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, day, 12, 0, 0)
            .single()
            .unwrap()
    }

    fn candidate(referred_at: DateTime<Utc>, days: u32) -> Candidate {
        let window = AttributionWindow::from_days("w", days).unwrap();
        Candidate {
            referral_id: ReferralId::generate(),
            referred_at,
            attribution_ends_at: attribution_ends_at(referred_at, window),
            cancelled_at: None,
        }
    }

    #[test]
    fn window_edges() {
        let referral = candidate(at(1), 10);
        let ends = referral.attribution_ends_at;
        assert_eq!(ends, at(11));
        // Inside: at the referral instant and one second before the end.
        assert!(is_within_window(referral.referred_at, ends, at(1)));
        assert!(is_within_window(
            referral.referred_at,
            ends,
            ends - Duration::seconds(1)
        ));
        // Exactly at the end: outside (the window is half-open).
        assert!(!is_within_window(referral.referred_at, ends, ends));
        // After, and before the referral: outside.
        assert!(!is_within_window(referral.referred_at, ends, at(12)));
        assert!(!is_within_window(
            referral.referred_at,
            ends,
            at(1) - Duration::seconds(1)
        ));
    }

    #[test]
    fn first_referrer_wins_among_those_whose_window_is_open() {
        let early = candidate(at(1), 5); // ends on the 6th
        let middle = candidate(at(3), 30);
        let late = candidate(at(4), 30);
        let candidates = vec![late.clone(), early.clone(), middle.clone()];
        let first = TouchPolicy::FirstReferrer;
        assert_eq!(choose_referral(&candidates, at(5), first), Some(&early));
        // After the early window closed, the next earliest open one wins.
        assert_eq!(choose_referral(&candidates, at(7), first), Some(&middle));
        assert_eq!(choose_referral(&candidates, at(2), first), Some(&early));
        // Before any referral: nothing.
        assert_eq!(
            choose_referral(&candidates, at(1) - Duration::hours(1), first),
            None
        );
    }

    #[test]
    fn last_referrer_wins_when_the_terms_say_so() {
        let early = candidate(at(1), 30);
        let late = candidate(at(4), 30);
        let candidates = vec![early.clone(), late.clone()];
        assert_eq!(
            choose_referral(&candidates, at(5), TouchPolicy::LastReferrer),
            Some(&late)
        );
        // Before the late referral existed, only the early one qualifies.
        assert_eq!(
            choose_referral(&candidates, at(3), TouchPolicy::LastReferrer),
            Some(&early)
        );
    }

    #[test]
    fn a_cancelled_referral_earns_nothing_after_its_cancellation() {
        let mut referral = candidate(at(1), 30);
        referral.cancelled_at = Some(at(5));
        let candidates = vec![referral.clone()];
        assert_eq!(
            choose_referral(&candidates, at(4), TouchPolicy::FirstReferrer),
            Some(&referral)
        );
        assert_eq!(
            choose_referral(&candidates, at(5), TouchPolicy::FirstReferrer),
            None
        );
    }
}
