//! Diagnostics for files people write: every problem with file, line,
//! column and a hint, rendered like a compiler's.

use std::fmt;
use std::ops::Range;

use serde::Serialize;

/// Byte offsets into a source file.
pub type Span = Range<usize>;

/// A file's name and text, with the line index diagnostics need.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> SourceFile {
        let text = text.into();
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        SourceFile { name: name.into(), text, line_starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let col = self.text.get(start..offset).map_or(offset - start, |s| s.chars().count());
        (line + 1, col + 1)
    }

    fn line_text(&self, line: usize) -> &str {
        let start = self.line_starts[line - 1];
        let end = self.line_starts.get(line).copied().unwrap_or(self.text.len());
        self.text[start..end].trim_end_matches(['\n', '\r'])
    }

    /// Renders `diagnostics` against this file, one block each.
    pub fn render(&self, diagnostics: &[Diagnostic]) -> String {
        diagnostics.iter().map(|d| format!("{}\n", Rendered { file: self, diag: d })).collect()
    }

    /// The diagnostics as records for `--json`.
    pub fn records(&self, diagnostics: &[Diagnostic]) -> Vec<DiagnosticRecord> {
        diagnostics
            .iter()
            .map(|d| {
                let (line, column) = self.position(d.span.start);
                DiagnosticRecord {
                    file: self.name.clone(),
                    line,
                    column,
                    severity: d.severity,
                    message: d.message.clone(),
                    hint: d.hint.clone(),
                }
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub span: Span,
    pub message: String,
    pub hint: Option<String>,
}

/// A diagnostic placed in its file, for `--json` output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DiagnosticRecord {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub severity: Severity,
    pub message: String,
    pub hint: Option<String>,
}

/// Collects diagnostics while a file is read, so that one pass reports
/// every problem rather than the first.
#[derive(Debug, Default)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn error(&mut self, span: Span, message: impl Into<String>) {
        self.push(Severity::Error, span, message.into(), None);
    }

    pub fn error_hint(&mut self, span: Span, message: impl Into<String>, hint: impl Into<String>) {
        self.push(Severity::Error, span, message.into(), Some(hint.into()));
    }

    pub fn warning(&mut self, span: Span, message: impl Into<String>, hint: Option<String>) {
        self.push(Severity::Warning, span, message.into(), hint);
    }

    fn push(&mut self, severity: Severity, span: Span, message: String, hint: Option<String>) {
        self.items.push(Diagnostic { severity, span, message, hint });
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }

    /// In file order, so the output reads top to bottom.
    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.items.sort_by_key(|d| (d.span.start, d.span.end));
        self.items
    }
}

struct Rendered<'a> {
    file: &'a SourceFile,
    diag: &'a Diagnostic,
}

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (line, col) = self.file.position(self.diag.span.start);
        let level = match self.diag.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        writeln!(f, "{}:{line}:{col}: {level}: {}", self.file.name, self.diag.message)?;
        let text = self.file.line_text(line);
        let gutter = line.to_string().len();
        let (end_line, end_col) = self.file.position(self.diag.span.end.max(self.diag.span.start + 1) - 1);
        let width = if end_line == line { (end_col + 1).saturating_sub(col).max(1) } else { 1 };
        writeln!(f, "{:gutter$} |", "")?;
        writeln!(f, "{line} | {text}")?;
        write!(f, "{:gutter$} | {}{}", "", " ".repeat(col - 1), "^".repeat(width))?;
        if let Some(hint) = &self.diag.hint {
            write!(f, "\n{:gutter$} = hint: {hint}", "")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let f = SourceFile::new("x.toml", "a = 1\nnäme = 2\n");
        assert_eq!(f.position(0), (1, 1));
        assert_eq!(f.position(6), (2, 1));
        let e = f.text.find("= 2").unwrap();
        assert_eq!(f.position(e), (2, 6));
    }

    #[test]
    fn rendering_points_at_the_span() {
        let f = SourceFile::new("job.toml", "[job]\nnmae = \"web\"\n");
        let mut d = Diagnostics::default();
        d.error_hint(6..10, "unknown field `nmae` in [job]", "did you mean `name`?");
        let out = f.render(&d.into_sorted());
        assert!(out.starts_with("job.toml:2:1: error: unknown field `nmae` in [job]\n"), "{out}");
        assert!(out.contains("2 | nmae = \"web\"\n  | ^^^^\n  = hint: did you mean `name`?"), "{out}");
    }
}
