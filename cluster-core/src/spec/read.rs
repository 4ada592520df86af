//! A checked reader over a spanned TOML tree.
//!
//! Job specs, node fleets and (later) policy and config files are read
//! through this so that each reports every problem at once, with the span of
//! the offending key or value, and names the closest valid key for a typo.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diag::{Diagnostics, SourceFile, Span};
use crate::resources::closest;
use crate::spec::Checked;

/// The largest file any reader here accepts, checked before parsing so that
/// a huge file costs nothing.
pub const FILE_BYTES_MAX: usize = 1 << 20;

/// Parses TOML into a spanned tree, reporting syntax errors.
pub fn parse<'i>(file: &'i SourceFile, d: &mut Diagnostics) -> Option<Spanned<DeTable<'i>>> {
    if file.text.len() > FILE_BYTES_MAX {
        d.error_hint(
            0..0,
            format!("file is {} bytes; the limit is {FILE_BYTES_MAX}", file.text.len()),
            "split it into smaller files",
        );
        return None;
    }
    let (table, errors) = DeTable::parse_recoverable(&file.text);
    for e in &errors {
        d.error(e.span().unwrap_or(0..0), format!("invalid TOML: {}", e.message().trim_end()));
    }
    errors.is_empty().then_some(table)
}

/// Parses `file` and reads its root table with `read`, reporting every
/// problem; the value is kept only if there was no error.
pub fn checked<T>(file: &SourceFile, read: impl FnOnce(&mut Table, &mut Diagnostics) -> Option<T>) -> Checked<T> {
    let mut d = Diagnostics::default();
    let value = parse(file, &mut d).and_then(|root| {
        let mut top = Table::new(root.get_ref(), root.span(), "");
        let value = read(&mut top, &mut d);
        top.finish(&mut d);
        value
    });
    let ok = !d.has_errors();
    Checked { value: value.filter(|_| ok), diagnostics: d.into_sorted() }
}

/// One TOML table being read. Every key the reader asks for is remembered,
/// so that [`Table::finish`] can report the others as unknown.
pub struct Table<'a, 'i> {
    table: &'a DeTable<'i>,
    pub span: Span,
    /// Where this table is, for messages: `[job]`, `[[group.task]]`.
    pub path: String,
    asked: Vec<&'static str>,
}

impl<'a, 'i> Table<'a, 'i> {
    pub fn new(table: &'a DeTable<'i>, span: Span, path: impl Into<String>) -> Self {
        Table { table, span, path: path.into(), asked: Vec::new() }
    }

    pub fn get(&mut self, key: &'static str) -> Option<&'a Spanned<DeValue<'i>>> {
        self.asked.push(key);
        self.table.get(key)
    }

    pub fn has(&self, key: &str) -> bool {
        self.table.get(key).is_some()
    }

    fn wrong_type(&self, d: &mut Diagnostics, key: &str, v: &Spanned<DeValue<'_>>, want: &str) {
        d.error(v.span(), format!("`{key}` in {} must be {want}, not {}", self.path, v.get_ref().type_str()));
    }

    /// Reports a missing required key at the table's position.
    pub fn missing(&self, d: &mut Diagnostics, key: &str, example: &str) {
        d.error_hint(
            self.span.clone(),
            format!("missing `{key}` in {}", self.path),
            format!("add `{key} = {example}`"),
        );
    }

    pub fn str(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<(&'a str, Span)> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some((s.as_ref(), v.span())),
            _ => {
                self.wrong_type(d, key, v, "a string");
                None
            }
        }
    }

    pub fn required_str(&mut self, d: &mut Diagnostics, key: &'static str, example: &str) -> Option<(&'a str, Span)> {
        if !self.has(key) {
            self.asked.push(key);
            self.missing(d, key, example);
            return None;
        }
        self.str(d, key)
    }

    pub fn int(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<(i64, Span)> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) => Some((n, v.span())),
                Err(_) => {
                    d.error(v.span(), format!("`{key}` in {} is out of range", self.path));
                    None
                }
            },
            _ => {
                self.wrong_type(d, key, v, "an integer");
                None
            }
        }
    }

    /// A float; an integer is accepted too (`0` for `0.0`).
    pub fn float(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<(f64, Span)> {
        let v = self.get(key)?;
        let n = match v.get_ref() {
            DeValue::Float(x) => x.as_str().replace('_', "").parse::<f64>().ok(),
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok().map(|n| n as f64),
            _ => {
                self.wrong_type(d, key, v, "a number");
                return None;
            }
        };
        match n {
            Some(n) if n.is_finite() => Some((n, v.span())),
            _ => {
                d.error(v.span(), format!("`{key}` in {} must be a finite number", self.path));
                None
            }
        }
    }

    pub fn bool(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<(bool, Span)> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some((*b, v.span())),
            _ => {
                self.wrong_type(d, key, v, "true or false");
                None
            }
        }
    }

    /// A string or an integer, as text: sizes may be written `cpu = 2` or
    /// `cpu = "500m"`.
    pub fn scalar_text(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<(String, bool, Span)> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some((s.to_string(), true, v.span())),
            DeValue::Integer(i) => Some((i.as_str().to_string(), false, v.span())),
            DeValue::Float(x) => Some((x.as_str().to_string(), false, v.span())),
            _ => {
                self.wrong_type(d, key, v, "a quantity such as \"2GiB\"");
                None
            }
        }
    }

    pub fn str_list(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<Vec<(&'a str, Span)>> {
        let v = self.get(key)?;
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(d, key, v, "a list of strings");
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item.get_ref() {
                DeValue::String(s) => out.push((s.as_ref(), item.span())),
                other => d.error(
                    item.span(),
                    format!("`{key}` in {} must list strings, not {}", self.path, other.type_str()),
                ),
            }
        }
        Some(out)
    }

    /// An inline or standard sub-table.
    pub fn table(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<Table<'a, 'i>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Table(t) => Some(Table::new(t, v.span(), format!("{}.{key}", self.path_inner()))),
            _ => {
                self.wrong_type(d, key, v, "a table");
                None
            }
        }
    }

    /// `[[key]]` entries, or an inline array of tables.
    pub fn tables(&mut self, d: &mut Diagnostics, key: &'static str) -> Vec<Table<'a, 'i>> {
        let Some(v) = self.get(key) else { return Vec::new() };
        let DeValue::Array(items) = v.get_ref() else {
            d.error_hint(
                v.span(),
                format!("`{key}` in {} must be a list of tables", self.path),
                format!("write each entry as [[{}]]", self.child_path(key)),
            );
            return Vec::new();
        };
        let path = format!("[[{}]]", self.child_path(key));
        items
            .iter()
            .filter_map(|item| match item.get_ref() {
                DeValue::Table(t) => Some(Table::new(t, item.span(), path.clone())),
                other => {
                    d.error(item.span(), format!("entries of {path} must be tables, not {}", other.type_str()));
                    None
                }
            })
            .collect()
    }

    /// A table of string values (`labels`, `env`), in file order.
    pub fn str_map(&mut self, d: &mut Diagnostics, key: &'static str) -> Vec<(&'a str, &'a str, Span)> {
        let Some(v) = self.get(key) else { return Vec::new() };
        let DeValue::Table(t) = v.get_ref() else {
            self.wrong_type(d, key, v, "a table of strings");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, val) in t {
            match val.get_ref() {
                DeValue::String(s) => out.push((k.get_ref().as_ref(), s.as_ref(), val.span())),
                other => {
                    d.error(val.span(), format!("`{key}.{}` must be a string, not {}", k.get_ref(), other.type_str()))
                }
            }
        }
        out
    }

    fn path_inner(&self) -> &str {
        self.path.trim_start_matches('[').trim_end_matches(']')
    }

    fn child_path(&self, key: &str) -> String {
        let inner = self.path_inner();
        if inner.is_empty() { key.to_string() } else { format!("{inner}.{key}") }
    }

    /// Reports every key nobody asked for, with the nearest known key.
    pub fn finish(self, d: &mut Diagnostics) {
        for (k, _) in self.table {
            let key: &str = k.get_ref();
            if self.asked.contains(&key) {
                continue;
            }
            let message = if self.path.is_empty() {
                format!("unknown section `{key}`")
            } else {
                format!("unknown field `{key}` in {}", self.path)
            };
            match closest(key, self.asked.iter().copied()) {
                Some(c) => d.error_hint(k.span(), message, format!("did you mean `{c}`?")),
                None => {
                    let mut known = self.asked.clone();
                    known.dedup();
                    d.error_hint(k.span(), message, format!("known fields: {}", known.join(", ")))
                }
            }
        }
    }
}

/// Reads a keyword (`type = "batch"`), suggesting the nearest valid word.
pub fn keyword<T>(
    d: &mut Diagnostics,
    what: &str,
    (word, span): (&str, Span),
    words: &[&str],
    parse: impl Fn(&str) -> Option<T>,
) -> Option<T> {
    if let Some(v) = parse(word) {
        return Some(v);
    }
    match closest(word, words.iter().copied()) {
        Some(c) => d.error_hint(span, format!("unknown {what} `{word}`"), format!("did you mean `{c}`?")),
        None => d.error_hint(span, format!("unknown {what} `{word}`"), format!("use one of: {}", words.join(", "))),
    }
    None
}
