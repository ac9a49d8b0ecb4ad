//! Fuzz the Prometheus text parser: arbitrary bytes must never panic, every line yields at
//! most one result, and every accepted sample re-renders to text that parses back to the
//! same sample.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshcanary::parse::{render_sample, Parser};

fuzz_target!(|body: &[u8]| {
    let lines = body.split(|&b| b == b'\n').count();
    let mut results = 0;
    for result in Parser::new(body) {
        results += 1;
        let Ok(sample) = result else { continue };
        let labels: Vec<(String, String)> = sample
            .labels
            .iter()
            .map(|l| (l.name.to_owned(), l.value().into_owned()))
            .collect();
        let refs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut text = String::new();
        render_sample(&mut text, sample.name, &refs, sample.value, sample.timestamp_ms);
        let again = Parser::from_text(&text)
            .next()
            .expect("one line")
            .unwrap_or_else(|e| panic!("re-rendered {text:?} does not parse: {e}"));
        assert_eq!(again.name, sample.name);
        assert_eq!(again.timestamp_ms, sample.timestamp_ms);
        assert!(again.value.to_bits() == sample.value.to_bits() || (again.value.is_nan() && sample.value.is_nan()));
        let back: Vec<(String, String)> = again
            .labels
            .iter()
            .map(|l| (l.name.to_owned(), l.value().into_owned()))
            .collect();
        assert_eq!(back, labels);
    }
    assert!(results <= lines);
});
