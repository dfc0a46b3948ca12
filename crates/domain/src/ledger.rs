//! Double-entry bookkeeping. Every movement of money is an [`Entry`] of postings in one currency
//! whose signed amounts (debits positive, credits negative) sum to zero. The constructor refuses
//! an unbalanced entry, so an unbalanced entry cannot exist; per currency the whole ledger
//! therefore always sums to zero.

use crate::ids::MerchantId;
use crate::money::{Currency, Money};

/// The accounts a merchant has in the commission ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Account {
    /// What partners owe this merchant as a referrer (an asset: debit-normal).
    CommissionReceivable,
    /// What this merchant owes partners as an acceptor (a liability: credit-normal).
    CommissionPayable,
}

impl Account {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CommissionReceivable => "commission_receivable",
            Self::CommissionPayable => "commission_payable",
        }
    }
}

/// One leg of an entry: a signed amount on one merchant's account (debit > 0, credit < 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posting {
    pub account: Account,
    pub merchant: MerchantId,
    pub amount_minor: i64,
}

/// A balanced set of postings in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    currency: Currency,
    postings: Vec<Posting>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unbalanced ledger entry in {currency}: postings sum to {sum_minor}, not 0")]
pub struct UnbalancedEntry {
    pub currency: Currency,
    pub sum_minor: i128,
}

impl Entry {
    pub fn new(currency: Currency, postings: Vec<Posting>) -> Result<Self, UnbalancedEntry> {
        let sum_minor: i128 = postings.iter().map(|p| i128::from(p.amount_minor)).sum();
        if sum_minor != 0 {
            return Err(UnbalancedEntry {
                currency,
                sum_minor,
            });
        }
        Ok(Self { currency, postings })
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    pub fn postings(&self) -> &[Posting] {
        &self.postings
    }
}

/// A commission accrued on an attributed purchase: the referrer is owed it, the acceptor owes it.
pub fn commission_accrual(
    referrer: &MerchantId,
    acceptor: &MerchantId,
    commission: Money,
) -> Result<Entry, UnbalancedEntry> {
    Entry::new(
        commission.currency,
        vec![
            Posting {
                account: Account::CommissionReceivable,
                merchant: referrer.clone(),
                amount_minor: commission.amount_minor,
            },
            Posting {
                account: Account::CommissionPayable,
                merchant: acceptor.clone(),
                amount_minor: -commission.amount_minor,
            },
        ],
    )
}

/// A commission clawed back (in full or in part) after a refund: the reverse of an accrual.
pub fn commission_reversal(
    referrer: &MerchantId,
    acceptor: &MerchantId,
    reversal: Money,
) -> Result<Entry, UnbalancedEntry> {
    Entry::new(
        reversal.currency,
        vec![
            Posting {
                account: Account::CommissionPayable,
                merchant: acceptor.clone(),
                amount_minor: reversal.amount_minor,
            },
            Posting {
                account: Account::CommissionReceivable,
                merchant: referrer.clone(),
                amount_minor: -reversal.amount_minor,
            },
        ],
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn accrual_balances_and_unbalanced_entries_are_refused() {
        let eur = Currency::parse("c", "EUR").unwrap();
        let referrer = MerchantId::generate();
        let acceptor = MerchantId::generate();
        let entry = commission_accrual(&referrer, &acceptor, Money::new(342, eur)).unwrap();
        assert_eq!(
            entry.postings().iter().map(|p| p.amount_minor).sum::<i64>(),
            0
        );
        assert_eq!(entry.postings()[0].merchant, referrer);
        let unbalanced = Entry::new(
            eur,
            vec![Posting {
                account: Account::CommissionPayable,
                merchant: acceptor,
                amount_minor: -1,
            }],
        );
        assert_eq!(unbalanced.unwrap_err().sum_minor, -1);
    }
}
