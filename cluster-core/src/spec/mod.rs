//! Files people write: job specs and node fleets, read with every problem
//! reported at once (file, line, column, hint).

pub mod fleet;
pub mod job;
pub mod read;

use std::fmt;
use std::path::Path;

use crate::diag::{Diagnostic, Severity, SourceFile};

pub use fleet::parse_fleet;
pub use job::parse_job;

/// The result of reading a file: the value when there was no error, and
/// every diagnostic (warnings too) either way.
#[derive(Debug)]
pub struct Checked<T> {
    pub value: Option<T>,
    pub diagnostics: Vec<Diagnostic>,
}

/// A file that could not be read or did not check, with all its problems.
#[derive(Debug)]
pub struct SpecError {
    pub file: SourceFile,
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors = self.diagnostics.iter().filter(|d| d.severity == Severity::Error).count();
        write!(f, "{}", self.file.render(&self.diagnostics))?;
        write!(f, "{}: {errors} error{}", self.file.name, if errors == 1 { "" } else { "s" })
    }
}

impl std::error::Error for SpecError {}

/// Reads a file for one of the parsers here, refusing oversized files
/// before reading them whole.
pub fn read_source(path: &Path) -> Result<SourceFile, std::io::Error> {
    use std::io::Read;
    let name = path.display().to_string();
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    // One byte over the limit is enough to know the file is too large.
    file.take(read::FILE_BYTES_MAX as u64 + 1).read_to_string(&mut text)?;
    Ok(SourceFile::new(name, text))
}

/// Reads and checks a file with `parse`, as one error value for callers
/// that only need the result.
pub fn load<T>(path: &Path, parse: impl Fn(&SourceFile) -> Checked<T>) -> Result<T, LoadError> {
    let file = read_source(path).map_err(|e| LoadError::Io(path.display().to_string(), e))?;
    let checked = parse(&file);
    match checked.value {
        Some(v) => Ok(v),
        None => Err(LoadError::Invalid(SpecError { file, diagnostics: checked.diagnostics })),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}")]
    Invalid(SpecError),
}

/// Parses a duration: `"30s"`, `"250ms"`, `"5m"`, `"1h"`, into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "ms" => 1.0,
        "s" => 1_000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        "" => return Err(format!("a unit is needed: \"{t}s\", \"{t}ms\", \"{t}m\" or \"{t}h\"")),
        other => return Err(format!("unknown time unit `{other}`; use ms, s, m or h")),
    };
    let v: f64 = number.parse().map_err(|_| format!("`{number}` is not a number; write e.g. \"30s\""))?;
    Ok((v * scale).round() as u64)
}
