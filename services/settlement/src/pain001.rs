//! ISO 20022 `pain.001.001.09` customer credit-transfer initiation files from a closed cycle's
//! payout instructions: one `PmtInf` per paying merchant (its account is debited), one
//! `CdtTrfTxInf` per instruction. EUR files carry the SEPA service level. Everything in the file
//! comes from the closure (its instant is `CreDtTm`, its cycle and currency name `MsgId`), so the
//! same cycle, currency and execution date always give the same bytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, Utc};
use sha2::{Digest, Sha256};
use tandem_domain::money::Currency;
use tandem_proto::v1 as pb;

pub const NAMESPACE: &str = "urn:iso:std:iso:20022:tech:xsd:pain.001.001.09";

/// The file, and what it sums to.
pub struct PayoutFile {
    pub message_id: String,
    pub xml: String,
    pub transactions: u32,
    /// Saturates at the largest i64 (the file's own `CtrlSum` is exact).
    pub control_sum_minor: i64,
}

/// Merchants in the instructions without a registered payout account.
#[derive(Debug)]
pub struct MissingAccounts(pub Vec<String>);

/// `amount_minor` as a decimal in the currency's unit (`1234` EUR is `12.34`).
pub fn decimal(amount_minor: impl Into<i128>, currency: Currency) -> String {
    let amount_minor: i128 = amount_minor.into();
    let digits = currency.minor_unit_digits();
    let sign = if amount_minor < 0 { "-" } else { "" };
    let magnitude = amount_minor.unsigned_abs();
    if digits == 0 {
        return format!("{sign}{magnitude}");
    }
    let scale = 10u128.pow(digits);
    format!(
        "{sign}{}.{:0width$}",
        magnitude / scale,
        magnitude % scale,
        width = digits as usize
    )
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// An id of at most 35 characters from `parts`: readable prefix, then a digest.
fn short_id(prefix: &str, parts: &str) -> String {
    let digest = hex::encode(&Sha256::digest(parts.as_bytes())[..12]);
    format!("{prefix}{digest}")
}

/// The pain.001 file of `instructions` (all of one cycle and currency, in sequence order).
pub fn write(
    cycle: &str,
    currency: Currency,
    closed_at: DateTime<Utc>,
    execution_date: NaiveDate,
    instructions: &[pb::PayoutInstruction],
) -> Result<PayoutFile, MissingAccounts> {
    let mut missing: Vec<String> = instructions
        .iter()
        .flat_map(|i| {
            [
                (i.from_account.is_none(), &i.from_merchant_id),
                (i.to_account.is_none(), &i.to_merchant_id),
            ]
        })
        .filter(|(absent, _)| *absent)
        .map(|(_, merchant)| merchant.clone())
        .collect();
    missing.sort();
    missing.dedup();
    if !missing.is_empty() {
        return Err(MissingAccounts(missing));
    }
    let message_id = short_id("TANDEM-", &format!("{cycle}/{currency}"));
    let mut by_payer: BTreeMap<&str, Vec<&pb::PayoutInstruction>> = BTreeMap::new();
    for instruction in instructions {
        by_payer
            .entry(instruction.from_merchant_id.as_str())
            .or_default()
            .push(instruction);
    }
    let total: i128 = instructions
        .iter()
        .map(|i| i128::from(i.amount_minor))
        .sum();
    let transactions = u32::try_from(instructions.len()).unwrap_or(u32::MAX);
    let mut xml = String::new();
    let _ = write!(
        xml,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Document xmlns=\"{NAMESPACE}\">\n<CstmrCdtTrfInitn>\n<GrpHdr>\n\
         <MsgId>{message_id}</MsgId>\n<CreDtTm>{}</CreDtTm>\n<NbOfTxs>{transactions}</NbOfTxs>\n<CtrlSum>{}</CtrlSum>\n\
         <InitgPty><Nm>Tandem settlement</Nm></InitgPty>\n</GrpHdr>\n",
        closed_at.format("%Y-%m-%dT%H:%M:%SZ"),
        decimal(total, currency)
    );
    for (payer, payments) in &by_payer {
        let Some(debtor) = payments[0].from_account.as_ref() else {
            continue;
        };
        let sum: i128 = payments.iter().map(|i| i128::from(i.amount_minor)).sum();
        let _ = write!(
            xml,
            "<PmtInf>\n<PmtInfId>{}</PmtInfId>\n<PmtMtd>TRF</PmtMtd>\n<NbOfTxs>{}</NbOfTxs>\n<CtrlSum>{}</CtrlSum>\n",
            short_id("PMT-", &format!("{cycle}/{currency}/{payer}")),
            payments.len(),
            decimal(sum, currency)
        );
        if currency.as_str() == "EUR" {
            xml.push_str("<PmtTpInf><SvcLvl><Cd>SEPA</Cd></SvcLvl></PmtTpInf>\n");
        }
        let _ = write!(
            xml,
            "<ReqdExctnDt><Dt>{execution_date}</Dt></ReqdExctnDt>\n<Dbtr><Nm>{}</Nm></Dbtr>\n\
             <DbtrAcct><Id><IBAN>{}</IBAN></Id></DbtrAcct>\n<DbtrAgt><FinInstnId><BICFI>{}</BICFI></FinInstnId></DbtrAgt>\n<ChrgBr>{}</ChrgBr>\n",
            escape(&debtor.account_holder),
            escape(&debtor.iban),
            escape(&debtor.bic),
            // SEPA requires charges shared by service level; other transfers share them.
            if currency.as_str() == "EUR" { "SLEV" } else { "SHAR" }
        );
        for payment in payments {
            let Some(creditor) = payment.to_account.as_ref() else {
                continue;
            };
            let _ = write!(
                xml,
                "<CdtTrfTxInf>\n<PmtId><EndToEndId>{}</EndToEndId></PmtId>\n<Amt><InstdAmt Ccy=\"{currency}\">{}</InstdAmt></Amt>\n\
                 <CdtrAgt><FinInstnId><BICFI>{}</BICFI></FinInstnId></CdtrAgt>\n<Cdtr><Nm>{}</Nm></Cdtr>\n\
                 <CdtrAcct><Id><IBAN>{}</IBAN></Id></CdtrAcct>\n<RmtInf><Ustrd>{}</Ustrd></RmtInf>\n</CdtTrfTxInf>\n",
                short_id("E2E-", &payment.instruction_id),
                decimal(payment.amount_minor, currency),
                escape(&creditor.bic),
                escape(&creditor.account_holder),
                escape(&creditor.iban),
                escape(&format!("Tandem {}", payment.instruction_id).chars().take(140).collect::<String>())
            );
        }
        xml.push_str("</PmtInf>\n");
    }
    xml.push_str("</CstmrCdtTrfInitn>\n</Document>\n");
    Ok(PayoutFile {
        message_id,
        xml,
        transactions,
        control_sum_minor: i64::try_from(total).unwrap_or(i64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_written_in_the_currency_unit() {
        let eur = Currency::parse("c", "EUR").unwrap_or_else(|e| panic!("{e}"));
        let jpy = Currency::parse("c", "JPY").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(decimal(1234, eur), "12.34");
        assert_eq!(decimal(5, eur), "0.05");
        assert_eq!(decimal(1234, jpy), "1234");
        assert_eq!(escape("A & B <C>"), "A &amp; B &lt;C&gt;");
        assert!(short_id("TANDEM-", "x").len() <= 35);
    }
}
