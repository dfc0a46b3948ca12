//! The PDF export, written with `pdf-writer`: A4 landscape, the base-14 Courier font (nothing
//! embedded, text extractable), the statement's header, its totals per currency and every line
//! with the same values as the CSV (amounts in minor units, instants in UTC), then the content
//! hash on every page. Characters outside Latin-1 print as `?` (WinAnsi encoding); the CSV and
//! JSON exports carry the exact text.

use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str};
use tandem_domain::statement::{LineStatus, Statement};

const WIDTH: f32 = 842.0;
const HEIGHT: f32 = 595.0;
const MARGIN: f32 = 30.0;
const SIZE: f32 = 6.5;
const LEADING: f32 = 9.0;
const FONT: Name<'static> = Name(b"F1");
const BOLD: Name<'static> = Name(b"F2");

/// One page's text lines: (bold, text).
type Page = Vec<(bool, String)>;

fn fit(text: &str, width: usize) -> String {
    let count = text.chars().count();
    if count <= width {
        format!("{text:<width$}")
    } else {
        let kept: String = text.chars().take(width.saturating_sub(1)).collect();
        format!("{kept}~")
    }
}

fn right(text: &str, width: usize) -> String {
    format!("{text:>width$}")
}

/// Latin-1 bytes for WinAnsiEncoding; anything else becomes `?`.
fn win_ansi(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| match u32::from(c) {
            0x20..=0x7e | 0xa0..=0xff => u8::try_from(u32::from(c)).unwrap_or(b'?'),
            _ => b'?',
        })
        .collect()
}

fn instant(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

fn layout(statement: &Statement, content_hash: &str) -> Vec<Page> {
    let mut head: Vec<(bool, String)> = vec![
        (
            true,
            format!(
                "Tandem settlement statement {} of merchant {}",
                statement.number, statement.merchant_id
            ),
        ),
        (
            false,
            format!(
                "Cycle {}   cut-off {}   issued {}",
                statement.cycle,
                instant(statement.cut_off),
                instant(statement.issued_at)
            ),
        ),
    ];
    if let Some(corrects) = statement.corrects {
        head.push((false, format!("Corrects statement {corrects}")));
    }
    head.push((
        false,
        format!("Content hash (SHA-256 of the CSV export): {content_hash}"),
    ));
    head.push((false, "Amounts in minor units of their currency: positive is owed to you, negative is owed by you.".into()));
    head.push((false, String::new()));
    head.push((
        true,
        format!(
            "{} {} {} {} {}",
            fit("Totals", 8),
            right("receivable", 16),
            right("payable", 16),
            right("net", 16),
            right("carried forward", 16)
        ),
    ));
    for (currency, total) in statement.totals() {
        head.push((
            false,
            format!(
                "{} {} {} {} {}",
                fit(currency.as_str(), 8),
                right(&total.receivable_minor.to_string(), 16),
                right(&total.payable_minor.to_string(), 16),
                right(&total.net_minor.to_string(), 16),
                right(&total.carried_forward_minor.to_string(), 16)
            ),
        ));
    }
    head.push((false, String::new()));
    let columns = format!(
        "{} {} {} {} {} {} {} {} {} {} {} {}",
        right("#", 5),
        fit("kind", 10),
        fit("status", 8),
        fit("counterparty", 36),
        fit("purchase / refund", 36),
        fit("transaction", 14),
        fit("reference", 14),
        fit("payable at (UTC)", 20),
        fit("terms", 22),
        fit("cur", 3),
        right("base", 11),
        right("amount", 11)
    );
    // Each line takes two rows: the columns, then the partnership and referral and, in full,
    // any field too long for its column (cut with `~` above), so the PDF carries every value
    // the CSV does.
    let mut rows: Vec<(bool, String)> = Vec::with_capacity(statement.lines.len());
    for (index, line) in statement.lines.iter().enumerate() {
        let source = line.refund_id.as_deref().unwrap_or(&line.purchase_id);
        let terms = format!("v{} {}", line.terms_version, line.rule);
        rows.push((
            false,
            format!(
                "{} {} {} {} {} {} {} {} {} {} {} {}",
                right(&(index + 1).to_string(), 5),
                fit(line.kind.as_str(), 10),
                fit(
                    match line.status {
                        LineStatus::Settled => "settled",
                        LineStatus::CarriedForward => "carried",
                    },
                    8
                ),
                fit(line.counterparty.as_str(), 36),
                fit(source, 36),
                fit(&line.transaction_id, 14),
                fit(&line.referrer_reference, 14),
                fit(&instant(line.payable_at), 20),
                fit(&terms, 22),
                fit(line.currency.as_str(), 3),
                right(&line.purchase_amount_minor.to_string(), 11),
                right(&line.amount_minor.to_string(), 11)
            ),
        ));
        let mut overflow = Vec::new();
        if line.refund_id.is_some() {
            overflow.push(format!("purchase {}", line.purchase_id));
        }
        for (label, value, width) in [
            ("transaction", line.transaction_id.as_str(), 14),
            ("reference", line.referrer_reference.as_str(), 14),
            ("terms", terms.as_str(), 22),
        ] {
            if value.chars().count() > width {
                overflow.push(format!("{label} {value}"));
            }
        }
        overflow.push(format!(
            "partnership {}   referral {}",
            line.partnership_id, line.referral_id
        ));
        rows.push((false, format!("{:6}{}", "", overflow.join("   "))));
    }
    let per_page = ((HEIGHT - 2.0 * MARGIN - 2.0 * LEADING) / LEADING) as usize;
    let mut pages = Vec::new();
    let mut page: Page = head;
    page.push((true, columns.clone()));
    for row in rows {
        if page.len() >= per_page {
            pages.push(std::mem::take(&mut page));
            page.push((true, columns.clone()));
        }
        page.push(row);
    }
    if statement.lines.is_empty() {
        page.push((false, "No lines.".into()));
    }
    pages.push(page);
    pages
}

/// The statement as a PDF document.
pub fn render(statement: &Statement, content_hash: &str) -> Vec<u8> {
    let pages = layout(statement, content_hash);
    let mut pdf = Pdf::new();
    let catalog = Ref::new(1);
    let tree = Ref::new(2);
    let font = Ref::new(3);
    let bold = Ref::new(4);
    let info = Ref::new(5);
    let first = 6;
    let page_ids: Vec<Ref> = (0..pages.len())
        .map(|i| Ref::new(first + 2 * i32::try_from(i).unwrap_or(0)))
        .collect();
    pdf.catalog(catalog).pages(tree);
    pdf.pages(tree)
        .kids(page_ids.iter().copied())
        .count(i32::try_from(pages.len()).unwrap_or(i32::MAX));
    pdf.type1_font(font)
        .base_font(Name(b"Courier"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    pdf.type1_font(bold)
        .base_font(Name(b"Courier-Bold"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    let title = format!(
        "Statement {} of {}",
        statement.number, statement.merchant_id
    );
    pdf.document_info(info)
        .title(pdf_writer::TextStr(&title))
        .producer(pdf_writer::TextStr("Tandem settlement"));
    let total = pages.len();
    for (index, (lines, id)) in pages.into_iter().zip(&page_ids).enumerate() {
        let content_id = Ref::new(id.get() + 1);
        let mut page = pdf.page(*id);
        page.media_box(Rect::new(0.0, 0.0, WIDTH, HEIGHT));
        page.parent(tree);
        page.contents(content_id);
        let mut resources = page.resources();
        resources.fonts().pair(FONT, font).pair(BOLD, bold);
        resources.finish();
        page.finish();
        let mut content = Content::new();
        content.begin_text();
        let mut y = HEIGHT - MARGIN;
        for (is_bold, text) in &lines {
            content.set_font(if *is_bold { BOLD } else { FONT }, SIZE);
            content.set_text_matrix([1.0, 0.0, 0.0, 1.0, MARGIN, y]);
            content.show(Str(&win_ansi(text)));
            y -= LEADING;
        }
        let footer = format!(
            "Statement {} of {} - page {} of {} - content hash {}",
            statement.number,
            statement.merchant_id,
            index + 1,
            total,
            content_hash
        );
        content.set_font(FONT, SIZE);
        content.set_text_matrix([1.0, 0.0, 0.0, 1.0, MARGIN, MARGIN / 2.0]);
        content.show(Str(&win_ansi(&footer)));
        content.end_text();
        pdf.stream(content_id, &content.finish());
    }
    pdf.finish()
}
