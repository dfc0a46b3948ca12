//! Attribution: which referral, if any, earns the commission on a purchase.
//!
//! A purchase at acceptor A at instant `t` by a customer key `k` is attributed to a referral of
//! `k` to A whose window contains `t`: `referred_at <= t < attribution_ends_at`. When several
//! referrals qualify, the first referral wins (earliest `referred_at`, ties broken by referral
//! id so that every replay chooses the same one).

use chrono::{DateTime, Utc};

use crate::ids::ReferralId;
use crate::partnership::AttributionWindow;

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
}

/// The referral that earns a purchase at `purchased_at`, by the first-referrer-wins rule.
pub fn choose_referral(
    candidates: &[Candidate],
    purchased_at: DateTime<Utc>,
) -> Option<&Candidate> {
    candidates
        .iter()
        .filter(|c| is_within_window(c.referred_at, c.attribution_ends_at, purchased_at))
        .min_by(|a, b| {
            (a.referred_at, a.referral_id.as_str()).cmp(&(b.referred_at, b.referral_id.as_str()))
        })
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
        assert_eq!(choose_referral(&candidates, at(5)), Some(&early));
        // After the early window closed, the next earliest open one wins.
        assert_eq!(choose_referral(&candidates, at(7)), Some(&middle));
        assert_eq!(choose_referral(&candidates, at(2)), Some(&early));
        // Before any referral: nothing.
        assert_eq!(
            choose_referral(&candidates, at(1) - Duration::hours(1)),
            None
        );
    }
}
