//! Output for people (tables sized to the terminal) and for scripts (JSON).

use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};

/// A borderless table that wraps to the terminal's width.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_content_arrangement(ContentArrangement::Dynamic).set_header(header.to_vec());
    t
}

/// Reads and checks a file with `parse` (job spec, fleet, policy, server
/// config): an invalid one becomes an error that shows every diagnostic.
pub fn load<T>(
    path: &std::path::Path,
    parse: impl Fn(&cluster_core::diag::SourceFile) -> cluster_core::spec::Checked<T>,
) -> anyhow::Result<T> {
    use cluster_core::spec::LoadError;
    cluster_core::spec::load(path, parse).map_err(|e| match e {
        LoadError::Invalid(inv) => anyhow::anyhow!("{inv}"),
        io => anyhow::anyhow!("{io}"),
    })
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `1 instance`, `3 instances`.
pub fn plural(n: u64, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

/// Creates `path` readable by its owner only, refusing to overwrite: keys
/// are never replaced by accident.
pub fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    create_new(path, text, 0o600)
}

/// Creates `path` readable by all, refusing to overwrite (certificates).
pub fn write_public(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    create_new(path, text, 0o644)
}

fn create_new(path: &std::path::Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    let mut f = options
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e} (it must not exist yet)", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Unix milliseconds as UTC time, to the second (`2026-12-01 10:15:39Z`).
pub fn unix_ms_text(ms: u64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}
