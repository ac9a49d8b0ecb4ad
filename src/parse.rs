//! Stage 3, parse: a zero-copy parser for the Prometheus text format 0.0.4 as Envoy's admin
//! endpoint (`/stats/prometheus`) emits it.
//!
//! Every [`Sample`] borrows its name and labels from the scraped body; label values are kept in
//! their escaped form and only unescaped (allocating) when a caller asks for a value that
//! actually contains a backslash. The parser is an iterator of lines: a bad line yields a
//! [`LineError`] with its line number and the iterator moves on, so one malformed line never
//! fails a scrape.
//!
//! Why hand-written: `prometheus-parse` (the usual crate) silently drops `name{} value` lines,
//! which Envoy emits for every histogram `_sum{}`/`_count{}`, and splits label values on `,`,
//! `=` and `}`; it also allocates several `String`s per sample. It stays as the benchmark
//! baseline in `benches/parse.rs`.

use std::borrow::Cow;
use std::fmt;

/// Most labels one sample may carry; more is a malformed line (Envoy emits at most a handful).
pub const MAX_LABELS: usize = 32;

/// The metric type declared by the most recent `# TYPE` line that covers a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl MetricType {
    fn from_keyword(s: &str) -> Option<Self> {
        Some(match s {
            "counter" => Self::Counter,
            "gauge" => Self::Gauge,
            "histogram" => Self::Histogram,
            "summary" => Self::Summary,
            "untyped" => Self::Untyped,
            _ => return None,
        })
    }
}

/// One sample line, borrowing from the body it was parsed from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Labels<'a>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
    /// Type of the metric family this sample belongs to (from `# TYPE`), `Untyped` if none.
    pub kind: MetricType,
}

/// The validated text between a sample's braces. Iterating re-scans it; that is cheaper than
/// storing offsets for the few labels Envoy samples carry, and keeps `Sample` `Copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Labels<'a> {
    raw: &'a str,
}

/// One label: its name and its value as written (still escaped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label<'a> {
    pub name: &'a str,
    pub raw_value: &'a str,
}

impl<'a> Label<'a> {
    /// The unescaped value; borrows unless the value contains an escape sequence.
    pub fn value(&self) -> Cow<'a, str> {
        unescape(self.raw_value)
    }
}

impl<'a> Labels<'a> {
    /// Labels of a sample written with no braces or with `{}`.
    pub const EMPTY: Labels<'static> = Labels { raw: "" };

    pub fn iter(&self) -> LabelIter<'a> {
        LabelIter {
            rest: self.raw.as_bytes(),
            src: self.raw,
            pos: 0,
        }
    }

    /// The first label called `name`, if any.
    pub fn get(&self, name: &str) -> Option<Label<'a>> {
        self.iter().find(|l| l.name == name)
    }

    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// The text between the braces, as scraped.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// The label text as written between the braces.
    pub fn as_raw(&self) -> &'a str {
        self.raw
    }
}

/// Iterator over already-validated label text.
pub struct LabelIter<'a> {
    src: &'a str,
    rest: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for LabelIter<'a> {
    type Item = Label<'a>;

    fn next(&mut self) -> Option<Label<'a>> {
        let b = self.rest;
        let mut i = self.pos;
        i = skip_label_separators(b, i);
        if i >= b.len() {
            return None;
        }
        let name_start = i;
        // Validated input: name, optional blanks, '=', optional blanks, '"'.
        let eq = name_start + memchr::memchr(b'=', &b[name_start..])?;
        let name = self.src[name_start..eq].trim_end_matches([' ', '\t']);
        let quote = if b.get(eq + 1) == Some(&b'"') {
            eq + 1 // the usual `name="value"`, no blanks
        } else {
            eq + memchr::memchr(b'"', &b[eq..])?
        };
        let value_start = quote + 1;
        let value_end = find_closing_quote(b, value_start).unwrap_or(b.len());
        self.pos = value_end + 1;
        Some(Label {
            name,
            raw_value: &self.src[value_start..value_end],
        })
    }
}

fn skip_label_separators(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b',') {
        i += 1;
    }
    i
}

/// Index of the `"` that closes a label value starting at `from`, skipping escaped characters.
fn find_closing_quote(b: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let hit = from + memchr::memchr2(b'"', b'\\', &b[from..])?;
        if b[hit] == b'"' {
            return Some(hit);
        }
        from = hit + 2;
        if from > b.len() {
            return None;
        }
    }
}

/// Undo the text format's label-value escapes (`\\`, `\"`, `\n`).
pub fn unescape(raw: &str) -> Cow<'_, str> {
    if !raw.contains('\\') {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    Cow::Owned(out)
}

/// Escape a label value for the text format; the inverse of [`unescape`].
pub fn escape(value: &str) -> Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 4);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Why a line was rejected. Each variant has a fixed `reason()` for metric labels.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineErrorKind {
    #[error("line is not valid UTF-8")]
    InvalidUtf8,
    #[error("invalid metric name")]
    InvalidName,
    #[error("invalid label name")]
    InvalidLabelName,
    #[error("expected '=' after label name")]
    ExpectedEquals,
    #[error("expected '\"' to open a label value")]
    ExpectedQuote,
    #[error("unterminated label value")]
    UnterminatedValue,
    #[error("invalid escape sequence in label value (only \\\\, \\\" and \\n are allowed)")]
    InvalidEscape,
    #[error("expected ',' or '}}' after a label")]
    ExpectedCommaOrBrace,
    #[error("label name appears twice")]
    DuplicateLabel,
    #[error("more than {MAX_LABELS} labels")]
    TooManyLabels,
    #[error("missing value")]
    MissingValue,
    #[error("invalid value")]
    InvalidValue,
    #[error("invalid timestamp")]
    InvalidTimestamp,
    #[error("unexpected text after the timestamp")]
    TrailingText,
    #[error("malformed # TYPE line")]
    InvalidTypeLine,
}

impl LineErrorKind {
    /// A fixed, bounded name for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidUtf8 => "invalid_utf8",
            Self::InvalidName => "invalid_name",
            Self::InvalidLabelName => "invalid_label_name",
            Self::ExpectedEquals | Self::ExpectedQuote | Self::ExpectedCommaOrBrace => {
                "malformed_labels"
            }
            Self::UnterminatedValue => "unterminated_value",
            Self::InvalidEscape => "invalid_escape",
            Self::DuplicateLabel => "duplicate_label",
            Self::TooManyLabels => "too_many_labels",
            Self::MissingValue | Self::InvalidValue => "invalid_value",
            Self::InvalidTimestamp | Self::TrailingText => "invalid_timestamp",
            Self::InvalidTypeLine => "invalid_type_line",
        }
    }
}

/// A rejected line: 1-based line number and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub kind: LineErrorKind,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.kind)
    }
}

impl std::error::Error for LineError {}

/// Iterator over the samples of one exposition body.
///
/// ```
/// use meshcanary::parse::Parser;
/// let body = b"# TYPE rq counter\nrq{code=\"503\",cluster=\"a,b\"} 7\nrq_sum{} 1.5\nbroken{ 1\n";
/// let mut samples = Parser::new(body);
/// let first = samples.next().unwrap().unwrap();
/// assert_eq!(first.name, "rq");
/// assert_eq!(first.labels.get("cluster").unwrap().value(), "a,b");
/// assert_eq!(first.value, 7.0);
/// assert!(samples.next().unwrap().unwrap().labels.is_empty()); // `name{} value` is a sample
/// assert_eq!(samples.next().unwrap().unwrap_err().line, 4); // reported, then skipped
/// assert!(samples.next().is_none());
/// ```
pub struct Parser<'a> {
    body: &'a [u8],
    /// The body as text when it is valid UTF-8 as a whole (the common case, checked once);
    /// otherwise each line is checked on its own so one bad line does not lose the others.
    text: Option<&'a str>,
    pos: usize,
    line_no: usize,
    family: Option<(&'a str, MetricType)>,
}

impl<'a> Parser<'a> {
    /// Parse a body of bytes (as read from the network).
    pub fn new(body: &'a [u8]) -> Self {
        Parser {
            body,
            text: std::str::from_utf8(body).ok(),
            pos: 0,
            line_no: 0,
            family: None,
        }
    }

    /// Parse text already known to be UTF-8.
    pub fn from_text(text: &'a str) -> Self {
        Parser {
            body: text.as_bytes(),
            text: Some(text),
            pos: 0,
            line_no: 0,
            family: None,
        }
    }

    /// The next line without its terminator, or `Err(())` if it is not UTF-8.
    fn next_line(&mut self) -> Option<Result<&'a str, ()>> {
        if self.pos >= self.body.len() {
            return None;
        }
        let start = self.pos;
        let len = memchr::memchr(b'\n', &self.body[start..]).unwrap_or(self.body.len() - start);
        self.pos = start + len + 1;
        self.line_no += 1;
        let mut end = start + len;
        if end > start && self.body[end - 1] == b'\r' {
            end -= 1;
        }
        Some(match self.text {
            // '\n' and '\r' are ASCII, so these are char boundaries of valid text.
            Some(text) => Ok(&text[start..end]),
            None => std::str::from_utf8(&self.body[start..end]).map_err(|_| ()),
        })
    }

    fn kind_of(&self, name: &str) -> MetricType {
        let Some((family, kind)) = self.family else {
            return MetricType::Untyped;
        };
        let Some(suffix) = name.strip_prefix(family) else {
            return MetricType::Untyped;
        };
        let covered = match kind {
            MetricType::Histogram => matches!(suffix, "" | "_bucket" | "_sum" | "_count"),
            MetricType::Summary => matches!(suffix, "" | "_sum" | "_count"),
            _ => suffix.is_empty(),
        };
        if covered {
            kind
        } else {
            MetricType::Untyped
        }
    }

    fn comment(&mut self, line: &'a str) -> Result<(), LineErrorKind> {
        let mut words = line[1..].split([' ', '\t']).filter(|w| !w.is_empty());
        if words.next() != Some("TYPE") {
            return Ok(()); // HELP and free comments carry nothing we use.
        }
        let name = words.next().ok_or(LineErrorKind::InvalidTypeLine)?;
        let kind = words
            .next()
            .and_then(MetricType::from_keyword)
            .ok_or(LineErrorKind::InvalidTypeLine)?;
        if !valid_metric_name(name.as_bytes()) || words.next().is_some() {
            return Err(LineErrorKind::InvalidTypeLine);
        }
        self.family = Some((name, kind));
        Ok(())
    }
}

impl<'a> Iterator for Parser<'a> {
    type Item = Result<Sample<'a>, LineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let next = self.next_line()?;
            let line_no = self.line_no;
            let fail = |kind| {
                Some(Err(LineError {
                    line: line_no,
                    kind,
                }))
            };
            let Ok(line) = next else {
                return fail(LineErrorKind::InvalidUtf8);
            };
            let first = line.bytes().position(|b| b != b' ' && b != b'\t');
            let Some(first) = first else { continue };
            let line = &line[first..];
            if line.as_bytes()[0] == b'#' {
                if let Err(kind) = self.comment(line) {
                    return fail(kind);
                }
                continue;
            }
            let family = self.family.map(|(name, _)| name);
            return match parse_sample(line, family) {
                Ok((name, labels, value, timestamp_ms)) => Some(Ok(Sample {
                    name,
                    labels,
                    value,
                    timestamp_ms,
                    kind: self.kind_of(name),
                })),
                Err(kind) => fail(kind),
            };
        }
    }
}

type Parsed<'a> = (&'a str, Labels<'a>, f64, Option<i64>);

/// Parse one non-blank, non-comment line with leading blanks already removed. `family` is
/// the name from the last `# TYPE` line (already validated), a prefix of most sample names.
fn parse_sample<'a>(line: &'a str, family: Option<&str>) -> Result<Parsed<'a>, LineErrorKind> {
    let b = line.as_bytes();
    if !is_name_start(b[0]) {
        return Err(LineErrorKind::InvalidName);
    }
    let mut i = match family {
        Some(f) if b.starts_with(f.as_bytes()) => f.len(),
        _ => name_end_fast(b, 0, b"{ \t", all_name_chars),
    };
    while i < b.len() && is_name_continue(b[i]) {
        i += 1;
    }
    let name = &line[..i];
    let mut labels = Labels::EMPTY;
    // Blanks may separate the name from its labels (as Go's expfmt parser accepts).
    let brace = skip_blanks(b, i);
    if brace < b.len() && b[brace] == b'{' {
        let end = scan_labels(b, brace + 1)?;
        labels = Labels {
            raw: &line[brace + 1..end],
        };
        i = end + 1;
    }
    // At least one blank, then the value.
    let blanks = skip_blanks(b, i);
    if blanks == i {
        return Err(if blanks >= b.len() {
            LineErrorKind::MissingValue
        } else {
            LineErrorKind::InvalidName
        });
    }
    i = blanks;
    if i >= b.len() {
        return Err(LineErrorKind::MissingValue);
    }
    let value_end = token_end(b, i);
    let value = parse_value(&line[i..value_end]).ok_or(LineErrorKind::InvalidValue)?;
    i = skip_blanks(b, value_end);
    let mut timestamp_ms = None;
    if i < b.len() {
        let ts_end = token_end(b, i);
        let ts = line[i..ts_end]
            .parse::<i64>()
            .map_err(|_| LineErrorKind::InvalidTimestamp)?;
        timestamp_ms = Some(ts);
        if skip_blanks(b, ts_end) != b.len() {
            return Err(LineErrorKind::TrailingText);
        }
    }
    Ok((name, labels, value, timestamp_ms))
}

/// Validate label text starting just after `{`; returns the index of the closing `}`.
fn scan_labels(b: &[u8], mut i: usize) -> Result<usize, LineErrorKind> {
    let open = i;
    let mut count = 0;
    loop {
        i = skip_blanks(b, i);
        match b.get(i) {
            None => return Err(LineErrorKind::ExpectedCommaOrBrace),
            Some(b'}') => return Ok(i),
            Some(&c) if is_label_start(c) => {}
            Some(_) => return Err(LineErrorKind::InvalidLabelName),
        }
        let start = i;
        i = name_end_fast(b, i, b"= \t", all_label_chars);
        while i < b.len() && is_name_continue(b[i]) && b[i] != b':' {
            i += 1;
        }
        let name = &b[start..i];
        if count == MAX_LABELS {
            return Err(LineErrorKind::TooManyLabels);
        }
        // Duplicates: re-scan the labels already validated on this line. Envoy lines carry
        // one or two, so this beats keeping a table of names for every sample.
        if count > 0 && previous_names(b, open, start).any(|n| n == name) {
            return Err(LineErrorKind::DuplicateLabel);
        }
        count += 1;
        i = skip_blanks(b, i);
        match b.get(i) {
            Some(b'=') => i += 1,
            Some(b':') => return Err(LineErrorKind::InvalidLabelName),
            _ => return Err(LineErrorKind::ExpectedEquals),
        }
        i = skip_blanks(b, i);
        if b.get(i) != Some(&b'"') {
            return Err(LineErrorKind::ExpectedQuote);
        }
        i += 1;
        loop {
            let hit = memchr::memchr2(b'"', b'\\', &b[i..])
                .map(|off| i + off)
                .ok_or(LineErrorKind::UnterminatedValue)?;
            if b[hit] == b'"' {
                i = hit + 1;
                break;
            }
            match b.get(hit + 1) {
                Some(b'\\' | b'"' | b'n') => i = hit + 2,
                Some(_) => return Err(LineErrorKind::InvalidEscape),
                None => return Err(LineErrorKind::UnterminatedValue),
            }
        }
        i = skip_blanks(b, i);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => return Ok(i),
            _ => return Err(LineErrorKind::ExpectedCommaOrBrace),
        }
    }
}

/// Where a name starting at `from` ends, found the fast way: the first of `stops` (one SIMD
/// search), provided every byte before it passes `valid` (a branch-free fold the compiler
/// vectorises). If not, `from` is returned and the caller's exact byte loop finds the end and
/// reports the error precisely.
fn name_end_fast(b: &[u8], from: usize, stops: &[u8; 3], valid: fn(&[u8]) -> bool) -> usize {
    let rest = &b[from..];
    let end = memchr::memchr3(stops[0], stops[1], stops[2], rest).unwrap_or(rest.len());
    if valid(&rest[..end]) {
        from + end
    } else {
        from
    }
}

fn name_char(c: u8, colon: bool) -> bool {
    let lower = c | 0x20;
    (lower.wrapping_sub(b'a') < 26)
        | (c.wrapping_sub(b'0') < 10)
        | (c == b'_')
        | (colon & (c == b':'))
}

fn all_name_chars(s: &[u8]) -> bool {
    s.iter().fold(true, |ok, &c| ok & name_char(c, true))
}

fn all_label_chars(s: &[u8]) -> bool {
    s.iter().fold(true, |ok, &c| ok & name_char(c, false))
}

/// Names of the labels in `b[from..to]`, text that `scan_labels` already validated.
fn previous_names(b: &[u8], from: usize, to: usize) -> impl Iterator<Item = &[u8]> {
    let mut i = from;
    std::iter::from_fn(move || {
        i = skip_label_separators(b, i);
        if i >= to {
            return None;
        }
        let start = i;
        while is_name_continue(b[i]) {
            i += 1;
        }
        let name = &b[start..i];
        let quote = i + memchr::memchr(b'"', &b[i..to])?;
        i = find_closing_quote(b, quote + 1)? + 1;
        Some(name)
    })
}

/// Parse a sample value: plain integers on a fast path (Envoy counters are integers), else
/// the float grammar including `NaN`, `+Inf` and `-Inf`.
/// A sample value as the text format spells it (`NaN`, `+Inf`, `-Inf`, decimal or exponent).
pub fn parse_value(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if !b.is_empty() && b.len() <= 15 && b.iter().all(u8::is_ascii_digit) {
        let mut n: u64 = 0;
        for &d in b {
            n = n * 10 + u64::from(d - b'0');
        }
        // Exact: every integer below 10^15 is representable in an f64.
        return Some(n as f64);
    }
    match s {
        "NaN" | "nan" => Some(f64::NAN),
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        // Rust's grammar also takes "infinity" and "nan" spelled other ways; the text
        // format only uses the spellings above, so anything alphabetic is refused.
        _ if b
            .iter()
            .any(|c| c.is_ascii_alphabetic() && !matches!(c, b'e' | b'E')) =>
        {
            None
        }
        _ => s.parse().ok(),
    }
}

fn skip_blanks(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
        i += 1;
    }
    i
}

fn token_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i] != b' ' && b[i] != b'\t' {
        i += 1;
    }
    i
}

/// Character classes as one table lookup each (the name scans are the hottest loops).
const NAME_START: u8 = 1;
const LABEL_START: u8 = 2;
const NAME_CONTINUE: u8 = 4;
const CLASSES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        let alpha = b.is_ascii_alphabetic() || b == b'_';
        if alpha || b == b':' {
            t[c] |= NAME_START | NAME_CONTINUE;
        }
        if alpha {
            t[c] |= LABEL_START;
        }
        if b.is_ascii_digit() {
            t[c] |= NAME_CONTINUE;
        }
        c += 1;
    }
    t
};

fn is_name_start(c: u8) -> bool {
    CLASSES[c as usize] & NAME_START != 0
}

fn is_label_start(c: u8) -> bool {
    CLASSES[c as usize] & LABEL_START != 0
}

fn is_name_continue(c: u8) -> bool {
    CLASSES[c as usize] & NAME_CONTINUE != 0
}

/// Whether `name` is a valid metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn valid_metric_name(name: &[u8]) -> bool {
    matches!(name.first(), Some(&c) if is_name_start(c))
        && name.iter().all(|&c| is_name_continue(c))
}

/// Whether `name` is a valid label name (`[a-zA-Z_][a-zA-Z0-9_]*`).
pub fn valid_label_name(name: &[u8]) -> bool {
    matches!(name.first(), Some(&c) if is_label_start(c))
        && name.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Render one sample in the text format (used by tests, the fuzz target's round trip and
/// fixtures). Values use the spellings the parser reads back exactly.
pub fn render_sample(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    value: f64,
    ts: Option<i64>,
) {
    use std::fmt::Write as _;
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&format_value(value));
    if let Some(ts) = ts {
        let _ = write!(out, " {ts}");
    }
    out.push('\n');
}

/// The text-format spelling of a value: `NaN`, `+Inf`, `-Inf`, or Rust's shortest round-trip
/// form of the number.
pub fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value == f64::INFINITY {
        "+Inf".to_owned()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{value:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Sample<'_> {
        let mut p = Parser::from_text(text);
        let s = p.next().expect("a sample").expect("no error");
        assert!(p.next().is_none(), "exactly one sample in {text:?}");
        s
    }

    fn err(text: &str) -> LineErrorKind {
        Parser::from_text(text)
            .find_map(|r| r.err())
            .unwrap_or_else(|| panic!("expected an error for {text:?}"))
            .kind
    }

    fn labels(s: &Sample<'_>) -> Vec<(String, String)> {
        s.labels
            .iter()
            .map(|l| (l.name.to_owned(), l.value().into_owned()))
            .collect()
    }

    #[test]
    fn plain_sample() {
        let s = one("envoy_server_uptime 42\n");
        assert_eq!(s.name, "envoy_server_uptime");
        assert!(s.labels.is_empty());
        assert_eq!(s.value, 42.0);
        assert_eq!(s.timestamp_ms, None);
    }

    #[test]
    fn empty_braces_are_a_sample() {
        // Envoy writes histogram sums and counts like this; prometheus-parse drops them.
        let s = one("envoy_cluster_upstream_rq_time_sum{} 1234.5");
        assert_eq!(s.name, "envoy_cluster_upstream_rq_time_sum");
        assert!(s.labels.is_empty());
        assert_eq!(s.value, 1234.5);
    }

    #[test]
    fn labels_and_special_characters_in_values() {
        let s = one(r#"m{a="x,y=z}",b="q\"uo\\te\nnl"} 1"#);
        assert_eq!(
            labels(&s),
            vec![
                ("a".into(), "x,y=z}".into()),
                ("b".into(), "q\"uo\\te\nnl".into())
            ]
        );
        assert_eq!(s.labels.get("a").unwrap().raw_value, "x,y=z}");
        assert!(matches!(
            s.labels.get("a").unwrap().value(),
            Cow::Borrowed(_)
        ));
        assert!(s.labels.get("c").is_none());
    }

    #[test]
    fn values_and_timestamps() {
        assert!(one("m NaN").value.is_nan());
        assert_eq!(one("m +Inf").value, f64::INFINITY);
        assert_eq!(one("m -Inf").value, f64::NEG_INFINITY);
        assert_eq!(one("m -1.5e-3").value, -0.0015);
        assert_eq!(one("m 18446744073709551615").value, 18446744073709551615.0);
        let s = one("m{a=\"1\"} 7 1700000000000");
        assert_eq!(s.timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(one("m 1 -5").timestamp_ms, Some(-5));
    }

    #[test]
    fn blanks_tabs_crlf_and_comments() {
        let text = "# HELP m some help\n\n  \t\n# TYPE m counter\n\tm\t{ a = \"1\" , }\t3 \r\n# free comment\n";
        let samples: Vec<_> = Parser::from_text(text).collect::<Result<_, _>>().unwrap();
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(samples[0].kind, MetricType::Counter);
        assert_eq!(labels(&samples[0]), vec![("a".into(), "1".into())]);
    }

    #[test]
    fn type_lines_cover_histogram_suffixes_only() {
        let text = "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum{} 2\nh_count{} 1\nh_other 5\n";
        let kinds: Vec<_> = Parser::from_text(text).map(|s| s.unwrap().kind).collect();
        use MetricType::*;
        assert_eq!(kinds, vec![Histogram, Histogram, Histogram, Untyped]);
    }

    #[test]
    fn bad_lines_are_reported_with_their_number_and_skipped() {
        let text = "good 1\nbad{a=\"1\" 2\ngood2{} 3\n";
        let results: Vec<_> = Parser::from_text(text).collect();
        assert_eq!(results.len(), 3);
        assert_eq!(results[0].as_ref().unwrap().name, "good");
        let e = results[1].as_ref().unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(results[2].as_ref().unwrap().name, "good2");
    }

    #[test]
    fn each_malformation_has_its_own_error() {
        use LineErrorKind::*;
        let cases = [
            ("9m 1", InvalidName),
            ("m", MissingValue),
            ("m ", MissingValue),
            ("m{} ", MissingValue),
            ("m-x 1", InvalidName),
            ("m{1a=\"x\"} 1", InvalidLabelName),
            ("m{a:b=\"x\"} 1", InvalidLabelName),
            ("m{a \"x\"} 1", ExpectedEquals),
            ("m{a=x} 1", ExpectedQuote),
            ("m{a=\"x} 1", UnterminatedValue),
            ("m{a=\"\\t\"} 1", InvalidEscape),
            ("m{a=\"x\" b=\"y\"} 1", ExpectedCommaOrBrace),
            ("m{a=\"x\",a=\"y\"} 1", DuplicateLabel),
            ("m abc", InvalidValue),
            ("m infinity", InvalidValue),
            ("m 1 1.5", InvalidTimestamp),
            ("m 1 2 3", TrailingText),
            ("# TYPE m flavour", InvalidTypeLine),
            ("# TYPE", InvalidTypeLine),
        ];
        for (text, want) in cases {
            assert_eq!(err(text), want, "for {text:?}");
        }
        let many: String = (0..=MAX_LABELS).map(|i| format!("l{i}=\"v\",")).collect();
        assert_eq!(err(&format!("m{{{many}}} 1")), TooManyLabels);
    }

    #[test]
    fn invalid_utf8_loses_only_its_line() {
        let body = b"a 1\nb{x=\"\xff\"} 2\nc 3\n";
        let results: Vec<_> = Parser::new(body).collect();
        assert_eq!(results.len(), 3);
        assert_eq!(
            results[1].as_ref().unwrap_err().kind,
            LineErrorKind::InvalidUtf8
        );
        assert_eq!(results[2].as_ref().unwrap().name, "c");
    }

    #[test]
    fn escape_round_trips() {
        for v in ["", "plain", "a\\b", "q\"", "n\nl", "\\n"] {
            assert_eq!(unescape(&escape(v)), v);
        }
    }
}
