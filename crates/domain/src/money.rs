//! Money: integer minor units and an ISO 4217 currency, never a float.
//!
//! The one rounding rule: a commission is computed per purchase line as
//! `amount_minor × rate_bps / 10 000` and rounded **half to even** to the minor unit. Intermediate
//! arithmetic is done in `i128`, so no product of an `i64` amount and a rate can overflow.

use std::fmt;

use crate::ValidationError;

/// Basis points in one whole (100%).
pub const BPS_PER_WHOLE: i64 = 10_000;

/// ISO 4217 currencies Tandem accepts, with the number of digits of their minor unit.
const CURRENCIES: &[(&str, u32)] = &[
    ("AUD", 2),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("INR", 2),
    ("JPY", 0),
    ("KRW", 0),
    ("MXN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("PLN", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("USD", 2),
    ("ZAR", 2),
    ("BHD", 3),
    ("KWD", 3),
];

/// An ISO 4217 currency code known to Tandem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(field: &str, code: &str) -> Result<Self, ValidationError> {
        CURRENCIES
            .iter()
            .find(|(known, _)| *known == code)
            .map(|(known, _)| {
                let bytes = known.as_bytes();
                Self([bytes[0], bytes[1], bytes[2]])
            })
            .ok_or_else(|| {
                ValidationError::new(
                    field,
                    format!("must be a supported ISO 4217 code in upper case such as EUR or USD, got {code:?}"),
                )
            })
    }

    pub fn as_str(&self) -> &str {
        // Always ASCII: only codes from CURRENCIES are ever constructed.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// Digits after the decimal point in this currency (2 for EUR, 0 for JPY).
    pub fn minor_unit_digits(&self) -> u32 {
        CURRENCIES
            .iter()
            .find(|(known, _)| known.as_bytes() == self.0)
            .map_or(2, |(_, digits)| *digits)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The largest amount of one purchase or refund, in minor units: EUR 10 000 000 000.00, or
/// JPY 1 000 000 000 000.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;

/// An amount in minor units of a currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    pub amount_minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(amount_minor: i64, currency: Currency) -> Self {
        Self {
            amount_minor,
            currency,
        }
    }

    /// A strictly positive amount, as every purchase must have.
    pub fn parse_positive(
        field: &str,
        amount_minor: i64,
        currency: &str,
    ) -> Result<Self, ValidationError> {
        let currency = Currency::parse(&format!("{field}.currency"), currency)?;
        if amount_minor <= 0 {
            return Err(ValidationError::new(
                format!("{field}.amount_minor"),
                format!("must be a positive number of minor units, got {amount_minor}"),
            ));
        }
        Ok(Self {
            amount_minor,
            currency,
        })
    }

    /// An amount a till may send for a purchase or a refund: positive and at most
    /// [`MAX_AMOUNT_MINOR`] minor units. The bound keeps every sum the ledger makes far from the
    /// 64-bit limit (9.2 million purchases at the maximum still fit).
    pub fn parse_bounded(
        field: &str,
        amount_minor: i64,
        currency: &str,
    ) -> Result<Self, ValidationError> {
        let money = Self::parse_positive(field, amount_minor, currency)?;
        if amount_minor > MAX_AMOUNT_MINOR {
            return Err(ValidationError::new(
                format!("{field}.amount_minor"),
                format!(
                    "must be at most {MAX_AMOUNT_MINOR} minor units (one trillion), got {amount_minor}; split larger amounts"
                ),
            ));
        }
        Ok(money)
    }

    /// This amount times `rate_bps` basis points, rounded half to even to the minor unit.
    pub fn times_bps(&self, rate_bps: u32) -> Money {
        let product = i128::from(self.amount_minor) * i128::from(rate_bps);
        let amount = divide_half_even(product, i128::from(BPS_PER_WHOLE));
        // |amount| <= |amount_minor| for rates up to 100%; larger rates are rejected by the
        // terms validation, and the saturation below only guards the arithmetic.
        let amount_minor =
            i64::try_from(amount).unwrap_or(if amount < 0 { i64::MIN } else { i64::MAX });
        Money {
            amount_minor,
            currency: self.currency,
        }
    }
}

impl fmt::Display for Money {
    /// `EUR 12.50`, `JPY 1200`, `-EUR 0.05`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.currency.minor_unit_digits();
        let sign = if self.amount_minor < 0 { "-" } else { "" };
        let magnitude = self.amount_minor.unsigned_abs();
        if digits == 0 {
            return write!(f, "{sign}{} {magnitude}", self.currency);
        }
        let scale = 10u64.pow(digits);
        write!(
            f,
            "{sign}{} {}.{:0width$}",
            self.currency,
            magnitude / scale,
            magnitude % scale,
            width = digits as usize
        )
    }
}

/// `numerator / denominator` rounded half to even; `denominator` must be positive.
pub fn divide_half_even(numerator: i128, denominator: i128) -> i128 {
    debug_assert!(denominator > 0);
    let quotient = numerator.div_euclid(denominator);
    let remainder = numerator.rem_euclid(denominator);
    let twice = remainder * 2;
    if twice > denominator || (twice == denominator && quotient % 2 != 0) {
        quotient + 1
    } else {
        quotient
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    fn eur() -> Currency {
        Currency::parse("currency", "EUR").unwrap()
    }

    #[test]
    fn rounds_half_to_even() {
        // 4555 × 7.5% = 341.625 → 342 (not a tie, rounds up)
        assert_eq!(Money::new(4555, eur()).times_bps(750).amount_minor, 342);
        // 50 × 1% = 0.5 → 0 (tie, 0 is even)
        assert_eq!(Money::new(50, eur()).times_bps(100).amount_minor, 0);
        // 150 × 1% = 1.5 → 2 (tie, 2 is even)
        assert_eq!(Money::new(150, eur()).times_bps(100).amount_minor, 2);
        // 250 × 1% = 2.5 → 2 (tie, 2 is even)
        assert_eq!(Money::new(250, eur()).times_bps(100).amount_minor, 2);
        // 12000 × 10% = 1200 exactly
        assert_eq!(Money::new(12_000, eur()).times_bps(1000).amount_minor, 1200);
        // 1 × 0.01% = 0.0001 → 0
        assert_eq!(Money::new(1, eur()).times_bps(1).amount_minor, 0);
    }

    #[test]
    fn rounds_negative_ties_to_even() {
        assert_eq!(divide_half_even(-5, 10), 0);
        assert_eq!(divide_half_even(-15, 10), -2);
        assert_eq!(divide_half_even(-25, 10), -2);
        assert_eq!(divide_half_even(-26, 10), -3);
    }

    #[test]
    fn does_not_overflow_on_the_largest_amounts() {
        assert_eq!(
            Money::new(i64::MAX, eur()).times_bps(10_000).amount_minor,
            i64::MAX
        );
    }

    #[test]
    fn validates_currency_and_amount() {
        assert_eq!(
            Currency::parse("amount.currency", "eur").unwrap_err().field,
            "amount.currency"
        );
        assert!(Currency::parse("c", "XXX").is_err());
        let error = Money::parse_positive("amount", 0, "EUR").unwrap_err();
        assert_eq!(error.field, "amount.amount_minor");
        assert!(Money::parse_positive("amount", -1, "EUR").is_err());
        assert!(Money::parse_bounded("amount", MAX_AMOUNT_MINOR, "EUR").is_ok());
        let error = Money::parse_bounded("amount", MAX_AMOUNT_MINOR + 1, "EUR").unwrap_err();
        assert_eq!(error.field, "amount.amount_minor");
        assert!(error.reason.contains("at most"), "{}", error.reason);
    }

    #[test]
    fn displays_with_the_currency_exponent() {
        assert_eq!(Money::new(1250, eur()).to_string(), "EUR 12.50");
        assert_eq!(Money::new(-5, eur()).to_string(), "-EUR 0.05");
        let yen = Currency::parse("c", "JPY").unwrap();
        assert_eq!(Money::new(1200, yen).to_string(), "JPY 1200");
    }

    proptest! {
        #[test]
        fn commission_is_within_half_a_minor_unit_of_the_exact_value(
            amount in 0i64..1_000_000_000_000, rate in 0u32..=10_000
        ) {
            let commission = Money::new(amount, eur()).times_bps(rate).amount_minor;
            let exact_times_10k = i128::from(amount) * i128::from(rate);
            let error_times_10k = (i128::from(commission) * 10_000 - exact_times_10k).abs();
            prop_assert!(error_times_10k * 2 <= 10_000);
            prop_assert!(commission <= amount);
        }
    }
}
