//! Settlement statements and their canonical encoding.
//!
//! A statement is immutable once issued. Its canonical encoding **is its CSV export**: UTF-8,
//! lines ending in `\n` (also the last), a header row, then one `statement` row, one `line` row
//! per line in the statement's order, and one `total` row per currency in code order, every row
//! with the same 24 columns (empty where a column does not apply). A field is written as is
//! unless it holds a comma, a double quote or a line break; then it is enclosed in double quotes
//! and each double quote in it doubled (RFC 4180). Amounts are integers in minor units with a
//! leading `-` when negative; instants are RFC 3339 in UTC with microseconds
//! (`2026-03-31T22:00:00.000000Z`); booleans do not occur. The content hash is the lower-case
//! hex SHA-256 of those bytes, so a partner verifies a statement from its CSV alone
//! (`sha256sum statement.csv`), and from the JSON export by writing its rows back in this form.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use sha2::{Digest, Sha256};

use crate::ids::{MerchantId, PartnershipId};
use crate::money::Currency;

/// The columns of every row, in order.
pub const COLUMNS: [&str; 24] = [
    "record",
    "merchant_id",
    "statement_number",
    "cycle",
    "cut_off",
    "issued_at",
    "corrects_statement_number",
    "line_number",
    "kind",
    "status",
    "counterparty_merchant_id",
    "partnership_id",
    "terms_version",
    "rule",
    "purchase_id",
    "refund_id",
    "transaction_id",
    "referral_id",
    "referrer_reference",
    "payable_at",
    "currency",
    "purchase_amount_minor",
    "amount_minor",
    "carried_forward_minor",
];

/// What a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// A commission that became payable: owed to the referrer by the acceptor.
    Commission,
    /// A refund after the commission was payable: the referrer owes it back.
    Clawback,
    /// An operator's correction of a closed cycle (its reason in the `rule` column).
    Adjustment,
}

impl LineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LineKind::Commission => "commission",
            LineKind::Clawback => "clawback",
            LineKind::Adjustment => "adjustment",
        }
    }
}

/// Whether a line is settled by this statement or carried forward to the next cycle (a
/// merchant's net amount below its minimum payout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineStatus {
    Settled,
    CarriedForward,
}

impl LineStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LineStatus::Settled => "settled",
            LineStatus::CarriedForward => "carried_forward",
        }
    }
}

/// One line, from the statement's merchant's side: `amount_minor` is positive when the
/// counterparty owes it to the merchant and negative when the merchant owes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementLine {
    pub kind: LineKind,
    pub status: LineStatus,
    pub counterparty: MerchantId,
    pub partnership_id: PartnershipId,
    pub terms_version: u32,
    /// The commission rule of that terms version, e.g. `percentage 500 bps`.
    pub rule: String,
    pub purchase_id: String,
    /// The refund of a claw-back line.
    pub refund_id: Option<String>,
    /// The acceptor's own transaction id of the purchase.
    pub transaction_id: String,
    pub referral_id: String,
    /// The referrer's own reference of the referral.
    pub referrer_reference: String,
    pub payable_at: DateTime<Utc>,
    pub currency: Currency,
    /// The purchase (or refund) amount the commission was computed on.
    pub purchase_amount_minor: i64,
    pub amount_minor: i64,
}

/// An issued statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub merchant_id: MerchantId,
    /// 1, 2, … per merchant, in the order issued.
    pub number: u32,
    /// The cycle's name (`Cycle::key`), e.g. `monthly:Europe/Paris:2026-03-01`.
    pub cycle: String,
    pub cut_off: DateTime<Utc>,
    pub issued_at: DateTime<Utc>,
    /// The statement this one corrects, if it is a correction.
    pub corrects: Option<u32>,
    pub lines: Vec<StatementLine>,
}

/// A statement's totals in one currency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Total {
    /// Settled lines owed to the merchant.
    pub receivable_minor: i128,
    /// Settled lines the merchant owes (negative or zero).
    pub payable_minor: i128,
    /// Receivable plus payable: the merchant's net position in this statement.
    pub net_minor: i128,
    /// Lines carried forward to the next cycle, net.
    pub carried_forward_minor: i128,
}

impl Statement {
    /// Totals per currency, in code order.
    pub fn totals(&self) -> BTreeMap<Currency, Total> {
        let mut totals: BTreeMap<Currency, Total> = BTreeMap::new();
        for line in &self.lines {
            let total = totals.entry(line.currency).or_default();
            let amount = i128::from(line.amount_minor);
            match line.status {
                LineStatus::CarriedForward => total.carried_forward_minor += amount,
                LineStatus::Settled if amount >= 0 => total.receivable_minor += amount,
                LineStatus::Settled => total.payable_minor += amount,
            }
            total.net_minor = total.receivable_minor + total.payable_minor;
        }
        totals
    }

    /// Calls `row` with each canonical row in order: the header, the `statement` row, the
    /// `line` rows and the `total` rows, each with the 24 fields of [`COLUMNS`] as text.
    pub fn for_each_row(&self, mut row: impl FnMut(&[Cow<'_, str>; 24])) {
        row(&COLUMNS.map(Cow::Borrowed));
        let number = self.number.to_string();
        let merchant = self.merchant_id.as_str();
        let base = |record: &'static str| -> [Cow<'_, str>; 24] {
            let mut fields: [Cow<'_, str>; 24] = Default::default();
            fields[0] = Cow::Borrowed(record);
            fields[1] = Cow::Borrowed(merchant);
            fields[2] = Cow::Owned(number.clone());
            fields
        };
        let mut head = base("statement");
        head[3] = Cow::Borrowed(&self.cycle);
        head[4] = Cow::Owned(instant(self.cut_off));
        head[5] = Cow::Owned(instant(self.issued_at));
        head[6] = Cow::Owned(self.corrects.map(|n| n.to_string()).unwrap_or_default());
        row(&head);
        for (index, line) in self.lines.iter().enumerate() {
            let mut fields = base("line");
            fields[7] = Cow::Owned((index + 1).to_string());
            fields[8] = Cow::Borrowed(line.kind.as_str());
            fields[9] = Cow::Borrowed(line.status.as_str());
            fields[10] = Cow::Borrowed(line.counterparty.as_str());
            fields[11] = Cow::Borrowed(line.partnership_id.as_str());
            fields[12] = Cow::Owned(line.terms_version.to_string());
            fields[13] = Cow::Borrowed(&line.rule);
            fields[14] = Cow::Borrowed(&line.purchase_id);
            fields[15] = Cow::Borrowed(line.refund_id.as_deref().unwrap_or(""));
            fields[16] = Cow::Borrowed(&line.transaction_id);
            fields[17] = Cow::Borrowed(&line.referral_id);
            fields[18] = Cow::Borrowed(&line.referrer_reference);
            fields[19] = Cow::Owned(instant(line.payable_at));
            fields[20] = Cow::Borrowed(line.currency.as_str());
            fields[21] = Cow::Owned(line.purchase_amount_minor.to_string());
            fields[22] = Cow::Owned(line.amount_minor.to_string());
            row(&fields);
        }
        for (currency, total) in self.totals() {
            let mut fields = base("total");
            fields[20] = Cow::Owned(currency.as_str().to_owned());
            fields[22] = Cow::Owned(total.net_minor.to_string());
            fields[23] = Cow::Owned(total.carried_forward_minor.to_string());
            row(&fields);
        }
    }

    /// The canonical rows as owned text (for the JSON export).
    pub fn canonical_rows(&self) -> Vec<Vec<String>> {
        let mut rows = Vec::with_capacity(self.lines.len() + 4);
        self.for_each_row(|fields| rows.push(fields.iter().map(|f| f.to_string()).collect()));
        rows
    }

    /// The canonical encoding: the CSV export (see the module's documentation).
    pub fn canonical_csv(&self) -> String {
        let mut out = String::new();
        self.for_each_row(|fields| write_row(&mut out, fields));
        out
    }

    /// Lower-case hex SHA-256 of the canonical encoding, computed as it is written.
    pub fn content_hash(&self) -> String {
        let mut hasher = Hashing(Sha256::new());
        self.for_each_row(|fields| write_row(&mut hasher, fields));
        hex::encode(hasher.0.finalize())
    }
}

/// Lower-case hex SHA-256 of a statement's canonical bytes (its CSV export).
pub fn content_hash(canonical: &[u8]) -> String {
    hex::encode(Sha256::digest(canonical))
}

/// Text written straight into a SHA-256.
struct Hashing(Sha256);

impl std::fmt::Write for Hashing {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.update(text.as_bytes());
        Ok(())
    }
}

fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Rows written as the canonical CSV: fields separated by commas, a field quoted (RFC 4180) only
/// when it holds a comma, a double quote or a line break, every row ending in `\n`.
pub fn encode_rows(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    for row in rows {
        write_row(&mut out, row);
    }
    out
}

fn write_row<S: AsRef<str>>(out: &mut impl std::fmt::Write, fields: &[S]) {
    for (index, field) in fields.iter().enumerate() {
        let field = field.as_ref();
        if index > 0 {
            let _ = out.write_char(',');
        }
        if field.contains([',', '"', '\n', '\r']) {
            let _ = write!(out, "\"{}\"", field.replace('"', "\"\""));
        } else {
            let _ = out.write_str(field);
        }
    }
    let _ = out.write_char('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn sample() -> Statement {
        let eur = Currency::parse("currency", "EUR").unwrap();
        let merchant = MerchantId::from_uuid(uuid::Uuid::from_u128(1));
        let acceptor = MerchantId::from_uuid(uuid::Uuid::from_u128(2));
        let partnership = PartnershipId::from_uuid(uuid::Uuid::from_u128(3));
        let line = StatementLine {
            kind: LineKind::Commission,
            status: LineStatus::Settled,
            counterparty: acceptor,
            partnership_id: partnership,
            terms_version: 2,
            rule: "percentage 500 bps".into(),
            purchase_id: "pur_0000000000000000000000000000000a".into(),
            refund_id: None,
            transaction_id: "T-1001".into(),
            referral_id: "ref_0000000000000000000000000000000b".into(),
            referrer_reference: "table 4, \"window\"".into(),
            payable_at: at("2026-03-14T09:30:00Z"),
            currency: eur,
            purchase_amount_minor: 12_000,
            amount_minor: 600,
        };
        let clawback = StatementLine {
            kind: LineKind::Clawback,
            refund_id: Some("rfd_0000000000000000000000000000000c".into()),
            purchase_amount_minor: 2_000,
            amount_minor: -100,
            ..line.clone()
        };
        Statement {
            merchant_id: merchant,
            number: 7,
            cycle: "monthly:Europe/Paris:2026-03-01".into(),
            cut_off: at("2026-03-31T22:00:00Z"),
            issued_at: at("2026-03-31T22:00:05.123456Z"),
            corrects: None,
            lines: vec![line, clawback],
        }
    }

    #[test]
    fn the_canonical_encoding_is_the_csv_and_its_hash_is_stable() {
        let statement = sample();
        let csv = statement.canonical_csv();
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), 5, "{csv}");
        assert_eq!(rows[0], COLUMNS.join(","));
        assert!(rows[1].starts_with("statement,mer_00000000000000000000000000000001,7,monthly:Europe/Paris:2026-03-01,2026-03-31T22:00:00.000000Z,2026-03-31T22:00:05.123456Z,,"));
        assert!(
            rows[2].contains(",\"table 4, \"\"window\"\"\","),
            "{}",
            rows[2]
        );
        assert!(rows[3].contains(",clawback,settled,"));
        assert!(rows[4].starts_with("total,"));
        assert!(rows[4].ends_with(",EUR,,500,0"), "{}", rows[4]);
        assert!(csv.ends_with('\n'));
        // The hash is SHA-256 of exactly those bytes: anyone can recompute it from the CSV.
        assert_eq!(statement.content_hash(), content_hash(csv.as_bytes()));
        // A regression vector: a change of the encoding would change every published hash.
        assert_eq!(
            statement.content_hash(),
            "34cc10976deef3b1e6078c2596ac6001ee4c3be4b649a516de911dad3956ef85"
        );
        let mut changed = statement.clone();
        changed.lines[0].amount_minor += 1;
        assert_ne!(changed.content_hash(), statement.content_hash());
    }

    #[test]
    fn totals_separate_receivable_payable_and_carried_forward() {
        let mut statement = sample();
        let mut carried = statement.lines[0].clone();
        carried.status = LineStatus::CarriedForward;
        carried.amount_minor = 250;
        statement.lines.push(carried);
        let totals = statement.totals();
        let eur = totals[&Currency::parse("c", "EUR").unwrap()];
        assert_eq!(eur.receivable_minor, 600);
        assert_eq!(eur.payable_minor, -100);
        assert_eq!(eur.net_minor, 500);
        assert_eq!(eur.carried_forward_minor, 250);
    }
}
