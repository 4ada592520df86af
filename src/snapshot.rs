//! `hanse operator snapshot save|inspect|restore`: backups of a cluster's
//! whole state as an archive ([`cluster_core::state::archive`]).

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::Context;
use cluster_core::server::client::{Client, ClientError};
use cluster_core::server::http::{RESTORE_BYTES_MAX, RestoreReport};
use cluster_core::state::archive::{self, ArchiveSummary, TableCounts};

use crate::Outcome;
use crate::output::print_json;

fn counts_line(c: &TableCounts) -> String {
    format!(
        "{} jobs, {} allocations, {} evaluations, {} nodes, {} tokens, {} policies, {} records",
        c.jobs, c.allocations, c.evaluations, c.nodes, c.acl_tokens, c.acl_policies, c.records
    )
}

/// `hanse operator snapshot save FILE`: asks a server for the state
/// (consistent unless `stale`), checks the archive whole, and writes it to
/// `FILE` (mode 0600: it holds job specs and token hashes) through a
/// temporary file, so a failed save never leaves a half file under the
/// name. Refuses to overwrite unless `force`.
pub fn save(c: &Client, file: &Path, stale: bool, force: bool, json: bool) -> anyhow::Result<Outcome> {
    if file.exists() && !force {
        anyhow::bail!("{} exists; pass --force to replace it", file.display());
    }
    let path = if stale { "/v1/operator/snapshot?stale=true" } else { "/v1/operator/snapshot" };
    let bytes = c.get_bytes(path, RESTORE_BYTES_MAX as u64).map_err(|e| anyhow::anyhow!("{e}"))?;
    let summary = archive::inspect(bytes.as_slice()).context("the server sent a snapshot that does not check")?;
    let name = file.file_name().with_context(|| format!("{} names no file", file.display()))?;
    let tmp = file.with_file_name(format!(".{}.part", name.to_string_lossy()));
    let written = (|| -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        // A leftover from an interrupted save (or a link planted in its
        // place) goes first: the file is made new, 0600, never followed.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)?;
        // The rename is durable once the directory is.
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", file.display()));
    }
    if json {
        print_json(&summary)?;
    } else {
        println!(
            "saved {} from cluster {} ({} bytes, index {}): {}",
            file.display(),
            summary.header.cluster,
            summary.bytes,
            summary.header.index,
            counts_line(&summary.header.counts)
        );
    }
    Ok(Outcome::Ok)
}

fn open_archive(file: &Path) -> anyhow::Result<ArchiveSummary> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    archive::inspect(std::io::BufReader::new(f)).with_context(|| format!("{} is not a usable snapshot", file.display()))
}

/// `hanse operator snapshot inspect FILE`: reads the file whole (format,
/// counts, checksum) without a server.
pub fn inspect(file: &Path, json: bool) -> anyhow::Result<Outcome> {
    let s = open_archive(file)?;
    if json {
        print_json(&s)?;
        return Ok(Outcome::Ok);
    }
    let created = match s.header.created_ms {
        0 => "unknown (a Raft snapshot)".to_string(),
        ms => crate::output::unix_ms_text(ms),
    };
    let c = &s.header.counts;
    println!("file         {}", file.display());
    println!(
        "cluster      {}",
        if s.header.cluster.is_empty() { "unknown (a Raft snapshot)" } else { &s.header.cluster }
    );
    println!("size         {} bytes", s.bytes);
    println!("sha256       {}", s.sha256);
    println!("index        {}", s.header.index);
    println!("term         {}", s.header.term);
    println!("created      {created}");
    println!(
        "servers      {}",
        s.header.peers.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(", ")
    );
    println!("jobs         {}", c.jobs);
    println!("allocations  {}", c.allocations);
    println!("evaluations  {}", c.evaluations);
    println!("nodes        {}", c.nodes);
    println!("acl tokens   {}", c.acl_tokens);
    println!("acl policies {}", c.acl_policies);
    println!("holds        {}", c.holds);
    println!("records      {}", c.records);
    println!("gc marks     {}", c.gc_marks);
    Ok(Outcome::Ok)
}

/// `hanse operator snapshot restore FILE`: checks the file here, asks for
/// confirmation (unless `yes`), and sends it; the cluster replaces its
/// whole state through its log. A file saved from another cluster is
/// refused by the server unless `other_cluster`.
pub fn restore(c: &Client, file: &Path, yes: bool, other_cluster: bool, json: bool) -> anyhow::Result<Outcome> {
    let s = open_archive(file)?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("restoring replaces the cluster's whole state; pass --yes to do it without a prompt");
        }
        eprintln!(
            "This replaces the whole state of the cluster at {} with {} (cluster {}, index {}: {}).\n\
             Jobs, allocations, nodes, tokens and policies not in the file are gone; \
             afterwards only the file's tokens work.",
            c.address(),
            file.display(),
            s.header.cluster,
            s.header.index,
            counts_line(&s.header.counts)
        );
        eprint!("Type `restore` to go on: ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != "restore" {
            anyhow::bail!("nothing was restored");
        }
    }
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let path = if other_cluster { "/v1/operator/snapshot?other_cluster=true" } else { "/v1/operator/snapshot" };
    let report: RestoreReport = c.put_bytes(path, &bytes).map_err(|e| match e {
        // The server refused it: nothing changed.
        ClientError::Api(e) => anyhow::anyhow!("{}", e.message),
        // Sent, and no answer: the servers may have restored it.
        e => anyhow::anyhow!(
            "{e}\nthe restore may or may not have taken effect; check with `hanse operator snapshot save` and `inspect`, or `hanse job list`"
        ),
    })?;
    if json {
        print_json(&report)?;
    } else {
        println!("restored {} (index {}): {}", file.display(), report.archive.index, counts_line(&report.restored));
    }
    Ok(Outcome::Ok)
}
