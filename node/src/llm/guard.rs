//! The prompt guard (docs/llm.md, "Prompt guard"): an API version may look for secrets
//! (API keys and the usual token shapes) and chosen PII classes (email addresses, phone
//! numbers, card numbers that pass the Luhn check) in what callers send, and mask them
//! before any provider sees them or refuse the request (400 naming the class). Every find
//! is counted in `tollgate_llm_guard_total{class, action}`.
//!
//! Detection is by pattern, with checks that cut false positives: a card number must pass
//! Luhn, start like a card (an issuer's prefix), and be written in groups or near a word
//! that goes with cards; a phone number needs 10 to 15 digits in a phone's grouping, not
//! be part of a longer dotted or dashed number, and, unless it starts with `+` or an area
//! code in parentheses, follow a word that goes with phones. The rates on the labelled set
//! in `guard_corpus.tsv` are measured by the tests and stated in the docs.

use std::sync::LazyLock;

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Off,
    Mask,
    Refuse,
}

/// A version's `prompt_guard`: what to do on finding each class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSpec {
    #[serde(default)]
    pub secrets: Action,
    #[serde(default)]
    pub email: Action,
    #[serde(default)]
    pub phone: Action,
    #[serde(default)]
    pub card: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Secret,
    Card,
    Email,
    Phone,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::Secret, Class::Card, Class::Email, Class::Phone];

    pub fn name(self) -> &'static str {
        match self {
            Class::Secret => "secret",
            Class::Card => "card",
            Class::Email => "email",
            Class::Phone => "phone",
        }
    }

    fn placeholder(self) -> &'static str {
        match self {
            Class::Secret => "[SECRET]",
            Class::Card => "[CARD]",
            Class::Email => "[EMAIL]",
            Class::Phone => "[PHONE]",
        }
    }

    fn described(self) -> &'static str {
        match self {
            Class::Secret => "a secret (an API key, token or private key)",
            Class::Card => "a card number",
            Class::Email => "an email address",
            Class::Phone => "a phone number",
        }
    }
}

static SECRET: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"\bsk-(?:proj-|ant-[a-z0-9]+-)?[A-Za-z0-9_-]{20,}",
        r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
        r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{22,}",
        r"|\bxox[abposr]-[A-Za-z0-9-]{10,}",
        r"|\bAIza[0-9A-Za-z_-]{35}",
        r"|-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----",
        r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
        r"|\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}",
        r"|\btgk_[A-Za-z0-9]{6,}_[A-Za-z0-9_-]{16,}",
        r#"|(?i:\b(?:api[_-]?key|secret|passw(?:or)?d|access[_-]?token|auth[_-]?token)\b["']?\s*[:=]\s*["']?)[A-Za-z0-9_\-/+=.]{12,}"#,
    ))
    .expect("the secret patterns compile")
});

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}\b")
        .expect("the email pattern compiles")
});

static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").expect("the card pattern compiles"));

static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        // +CC and groups, or a national number in groups: (555) 123-4567, 020 7946 0958.
        r"(?:\+\d{1,3}[ -]?)?(?:\(\d{1,4}\)[ -]?|\b\d{2,4}[ -])\d{2,4}[ -]\d{3,4}(?:[ -]\d{2,4})?\b",
        // International, in groups of 1 to 5: +33 1 23 45 67 89, +91 98765 43210.
        r"|\+\d{1,3}(?:[ -]\d{1,5}){2,6}\b",
        r"|\+\d{9,15}\b",
        r"|\b\d{3}\.\d{3}\.\d{4}\b",
    ))
    .expect("the phone pattern compiles")
});

/// Whether one of `words` is a word within `window` bytes of `range` (before or after it,
/// case-insensitive).
fn near(text: &str, range: &std::ops::Range<usize>, words: &[&str], window: usize) -> bool {
    let mut from = range.start.saturating_sub(window);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let mut to = (range.end + window).min(text.len());
    while !text.is_char_boundary(to) {
        to += 1;
    }
    [&text[from..range.start], &text[range.end..to]]
        .iter()
        .flat_map(|side| side.split(|c: char| !c.is_ascii_alphanumeric()))
        .any(|token| words.iter().any(|w| token.eq_ignore_ascii_case(w)))
}

const PHONE_WORDS: [&str; 12] = [
    "call", "phone", "tel", "mobile", "cell", "number", "text", "fax", "whatsapp", "contact",
    "reach", "dial",
];
const CARD_WORDS: [&str; 13] = [
    "card",
    "visa",
    "mastercard",
    "amex",
    "credit",
    "debit",
    "cc",
    "payment",
    "pay",
    "charge",
    "billing",
    "exp",
    "cvv",
];

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(*d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// Whether the digits start like a card of a major scheme (Visa, Mastercard, Amex,
/// Discover, JCB, Diners, UnionPay, Maestro).
fn card_prefix(d: &[u8]) -> bool {
    let n = |k: usize| d.iter().take(k).fold(0u32, |a, x| a * 10 + u32::from(*x));
    matches!(d.first(), Some(4))
        || (51..=55).contains(&n(2))
        || (2221..=2720).contains(&n(4))
        || matches!(n(2), 34 | 37 | 36 | 38 | 62 | 65)
        || (300..=305).contains(&n(3))
        || n(4) == 6011
        || (644..=649).contains(&n(3))
        || (3528..=3589).contains(&n(4))
        || matches!(n(2), 50 | 56..=58 | 63 | 67)
}

/// The byte ranges of `class` in `text`.
pub fn find(class: Class, text: &str) -> Vec<std::ops::Range<usize>> {
    let bytes = text.as_bytes();
    // Part of a longer number (a version, an address, an id): not a match on its own.
    let embedded = |r: &std::ops::Range<usize>| {
        let before = r.start.checked_sub(1).map(|i| bytes[i]);
        let before2 = r.start.checked_sub(2).map(|i| bytes[i]);
        let after = bytes.get(r.end).copied();
        let after2 = bytes.get(r.end + 1).copied();
        let joins = |b: Option<u8>| matches!(b, Some(b'.' | b'-' | b'/' | b':'));
        let digit = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_digit());
        before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
            || (joins(before) && digit(before2))
            || (joins(after) && digit(after2))
            || after.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    match class {
        Class::Secret => SECRET.find_iter(text).map(|m| m.range()).collect(),
        Class::Email => EMAIL.find_iter(text).map(|m| m.range()).collect(),
        Class::Card => CARD
            .find_iter(text)
            .map(|m| m.range())
            .filter(|r| {
                let digits: Vec<u8> = text[r.clone()]
                    .bytes()
                    .filter(u8::is_ascii_digit)
                    .map(|b| b - b'0')
                    .collect();
                let grouped = text[r.clone()].contains([' ', '-']);
                (13..=19).contains(&digits.len())
                    && luhn(&digits)
                    && card_prefix(&digits)
                    && !embedded(r)
                    && (grouped || near(text, r, &CARD_WORDS, 48))
            })
            .collect(),
        Class::Phone => PHONE
            .find_iter(text)
            .map(|m| m.range())
            .filter(|r| {
                let m = &text[r.clone()];
                let digits = m.bytes().filter(u8::is_ascii_digit).count();
                // International or with an area code in parentheses: a phone as written;
                // plain groups of digits only near a word that says so.
                let shaped = m.starts_with('+') || m.starts_with('(');
                (10..=15).contains(&digits)
                    && !embedded(r)
                    && (shaped || near(text, r, &PHONE_WORDS, 40))
            })
            .collect(),
    }
}

/// What the guard did to a request.
#[derive(Debug, Default)]
pub struct Found {
    /// Finds masked, by class.
    pub masked: Vec<(Class, usize)>,
}

/// A request refused: the class found and where.
#[derive(Debug)]
pub struct Refused {
    pub class: Class,
    pub at: String,
}

impl Refused {
    pub fn message(&self) -> String {
        format!(
            "the request contains {} (in `{}`); this API does not accept {} in prompts: remove it",
            self.class.described(),
            self.at,
            self.class.name()
        )
    }
}

impl GuardSpec {
    fn action(&self, c: Class) -> Action {
        match c {
            Class::Secret => self.secrets,
            Class::Card => self.card,
            Class::Email => self.email,
            Class::Phone => self.phone,
        }
    }

    pub fn is_on(&self) -> bool {
        Class::ALL.iter().any(|c| self.action(*c) != Action::Off)
    }

    /// Looks through the text a request sends (messages, system, input, instructions,
    /// prompt): refuses at the first class set to refuse, masks those set to mask.
    pub fn apply(&self, doc: &mut Value) -> Result<Found, Refused> {
        let mut found = Found::default();
        let Some(o) = doc.as_object_mut() else {
            return Ok(found);
        };
        for key in ["messages", "system", "input", "instructions", "prompt"] {
            if let Some(v) = o.get_mut(key) {
                self.walk(v, key.to_string(), &mut found)?;
            }
        }
        for (class, n) in &found.masked {
            metrics::counter!("tollgate_llm_guard_total", "class" => class.name(), "action" => "mask")
                .increment(*n as u64);
        }
        Ok(found)
    }

    fn walk(&self, v: &mut Value, at: String, found: &mut Found) -> Result<(), Refused> {
        match v {
            Value::String(s) => {
                // Images and files are data, not text.
                if s.starts_with("data:") {
                    return Ok(());
                }
                for class in Class::ALL {
                    let action = self.action(class);
                    if action == Action::Off {
                        continue;
                    }
                    let ranges = find(class, s);
                    if ranges.is_empty() {
                        continue;
                    }
                    if action == Action::Refuse {
                        metrics::counter!("tollgate_llm_guard_total", "class" => class.name(), "action" => "refuse")
                            .increment(1);
                        return Err(Refused { class, at });
                    }
                    let mut out = String::with_capacity(s.len());
                    let mut last = 0;
                    for r in &ranges {
                        out.push_str(&s[last..r.start]);
                        out.push_str(class.placeholder());
                        last = r.end;
                    }
                    out.push_str(&s[last..]);
                    found.masked.push((class, ranges.len()));
                    *s = out;
                }
                Ok(())
            }
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.walk(item, format!("{at}[{i}]"), found)?;
                }
                Ok(())
            }
            Value::Object(o) => {
                for (k, item) in o.iter_mut() {
                    if matches!(k.as_str(), "image_url" | "source" | "file" | "input_audio") {
                        continue;
                    }
                    self.walk(item, format!("{at}.{k}"), found)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_refused_and_pii_masked_where_they_are() {
        let g = GuardSpec {
            secrets: Action::Refuse,
            email: Action::Mask,
            phone: Action::Mask,
            card: Action::Refuse,
        };
        let mut doc = json!({"model": "gpt", "messages": [
            {"role": "user", "content": "Mail ada@example.com or call +44 20 7946 0958."}]});
        let found = g.apply(&mut doc).unwrap();
        assert_eq!(
            doc["messages"][0]["content"],
            "Mail [EMAIL] or call [PHONE]."
        );
        assert_eq!(found.masked.len(), 2);
        let mut doc = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "my key is sk-proj-abcdefghijklmnopqrstuvwx1234"}]}]});
        let e = g.apply(&mut doc).unwrap_err();
        assert_eq!(
            (e.class, e.at.as_str()),
            (Class::Secret, "messages[0].content[0].text")
        );
        let mut doc = json!({"system": "card 4111 1111 1111 1111 on file"});
        assert_eq!(g.apply(&mut doc).unwrap_err().class, Class::Card);
        // Images are not read; the model name is not text.
        let mut doc = json!({"model": "ada@example.com", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,4111111111111111"}}]}]});
        assert!(g.apply(&mut doc).is_ok());
    }

    /// Per class: (found, positives, false positives, negatives) on a labelled set (every
    /// line `label<TAB>text`, the label the class the text holds, `none` for none), and
    /// what went wrong.
    /// (found, positives, false positives, negatives)
    type Rate = (usize, usize, usize, usize);

    fn rates(corpus: &str) -> ([Rate; 4], Vec<String>) {
        let mut out = [(0, 0, 0, 0); 4];
        let mut wrong = Vec::new();
        for line in corpus
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        {
            let (label, text) = line.split_once('\t').expect("label<TAB>text");
            for (i, class) in Class::ALL.iter().enumerate() {
                let hit = !find(*class, text).is_empty();
                if label == class.name() {
                    out[i].1 += 1;
                    if hit {
                        out[i].0 += 1;
                    } else {
                        wrong.push(format!("missed {}: {text}", class.name()));
                    }
                } else if label == "none" {
                    out[i].3 += 1;
                    if hit {
                        out[i].2 += 1;
                        wrong.push(format!("false {}: {text}", class.name()));
                    }
                }
            }
        }
        (out, wrong)
    }

    /// The set the patterns were tuned on, and a held-out set in other words that was not
    /// (both made by benches/guard_corpus.py). The figures are in docs/llm.md.
    #[test]
    fn rates_on_the_labelled_sets() {
        for (name, corpus, min_found, max_false) in [
            ("tuning", include_str!("guard_corpus.tsv"), 95, 1),
            ("held-out", include_str!("guard_heldout.tsv"), 90, 2),
        ] {
            let (rates, wrong) = rates(corpus);
            for (i, class) in Class::ALL.iter().enumerate() {
                let (tp, pos, fp, neg) = rates[i];
                println!(
                    "{name} {}: {tp}/{pos} found, {fp}/{neg} false positives",
                    class.name()
                );
                assert!(pos >= 40 && neg >= 200, "the set is large enough");
                assert!(tp * 100 >= pos * min_found, "{name}: {}", wrong.join("\n"));
                assert!(fp * 100 <= neg * max_false, "{name}: {}", wrong.join("\n"));
            }
            for w in &wrong {
                println!("{name} {w}");
            }
        }
    }
}
