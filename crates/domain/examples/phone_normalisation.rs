//! How fast the gateway's phone normalisation (`RawIdentifier::phone`) runs, by how many countries
//! the numbers come from. libphonenumber's metadata compiles its patterns into one shared cache
//! of 100 regexes behind a mutex (the `phonenumber` crate): numbers from one country stay in it,
//! numbers from many evict each other's patterns, which are compiled again.
//!
//! ```sh
//! cargo run --release -p tandem-domain --example phone_normalisation [CALLS_PER_CASE]
//! ```
//!
//! Prints, for one, ten and every country, the calls per second on one thread and on two.
//! Figures: docs/BENCHMARKS.md, "Phone normalisation".

use std::time::Instant;

use phonenumber::metadata::DATABASE;
use tandem_domain::customer::RawIdentifier;

/// One mobile number for each country libphonenumber has an example for, in the format a till
/// sends (`+`, country code, national number), keeping those the gateway accepts.
fn one_per_country() -> Vec<(String, String)> {
    let mut numbers: Vec<(String, String)> = DATABASE
        .iter()
        .filter_map(|metadata| {
            let example = metadata.descriptors().mobile()?.example()?;
            let number = format!("+{} {example}", metadata.country_code());
            RawIdentifier::phone("phone", &number).ok()?;
            Some((metadata.id().to_owned(), number))
        })
        .collect();
    numbers.sort();
    numbers.dedup_by(|a, b| a.1 == b.1);
    numbers
}

/// `calls` normalisations over `numbers` (round robin, the last digit varied) on `threads`
/// threads; returns whole calls per second.
fn rate(numbers: &[String], calls: usize, threads: usize) -> u128 {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..threads {
            scope.spawn(move || {
                for call in (thread..calls).step_by(threads) {
                    let base = &numbers[call % numbers.len()];
                    let number = format!("{}{}", &base[..base.len() - 1], call % 10);
                    // A varied last digit can make a number invalid; both answers cost a parse.
                    std::hint::black_box(RawIdentifier::phone("phone", &number).is_ok());
                }
            });
        }
    });
    calls as u128 * 1_000_000 / started.elapsed().as_micros().max(1)
}

fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(20_000);
    let all = one_per_country();
    let pick = |regions: &[&str]| -> Vec<String> {
        all.iter()
            .filter(|(region, _)| regions.contains(&region.as_str()))
            .map(|(_, number)| number.clone())
            .collect()
    };
    let cases = [
        ("1 country (FR)", pick(&["FR"])),
        (
            "10 countries (EU, GB, US)",
            pick(&["FR", "DE", "GB", "ES", "IT", "NL", "BE", "PT", "IE", "US"]),
        ),
        (
            "every country",
            all.iter().map(|(_, number)| number.clone()).collect(),
        ),
    ];
    println!("| numbers from | distinct numbers | 1 thread | 2 threads |");
    println!("|---|---|---|---|");
    for (name, numbers) in &cases {
        assert!(!numbers.is_empty(), "no example number for {name}");
        // Warm the cache with the case's own numbers first.
        rate(numbers, numbers.len() * 10, 1);
        let one = rate(numbers, calls, 1);
        let two = rate(numbers, calls, 2);
        println!("| {name} | {} | {one}/s | {two}/s |", numbers.len());
    }
}
