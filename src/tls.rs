//! `hanse tls ...`: the federation's certificate authority and the
//! certificates servers and agents present to each other.

use std::path::{Path, PathBuf};

use anyhow::Context;
use cluster_core::transport::tls::{self, Identity, PemPair, Role};

use crate::Outcome;
use crate::output::{write_private, write_public};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";

pub fn ca_create(federation: &str, dir: &Path, days: u32) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    refuse_existing(&[&cert, &key])?;
    let ca = tls::create_ca(federation, days)?;
    write_private(&key, &ca.key_pem)?;
    write_public(&cert, &ca.cert_pem)?;
    println!("wrote {} and {} (federation {federation}, valid {days} days)", cert.display(), key.display());
    println!("keep {} secret: whoever holds it can join the federation", key.display());
    Ok(Outcome::Ok)
}

pub struct CertArgs {
    pub cluster: String,
    pub role: Role,
    pub name: String,
    pub ca_dir: PathBuf,
    pub out_dir: PathBuf,
    pub days: u32,
    /// More names a server's API is reached by (DNS names or IPs).
    pub sans: Vec<String>,
    /// Jurisdictions a server's cluster may claim in gossip.
    pub jurisdictions: Vec<String>,
}

pub fn cert_create(a: CertArgs) -> anyhow::Result<Outcome> {
    let ca = tls::read_pair(&a.ca_dir.join(CA_CERT), &a.ca_dir.join(CA_KEY))
        .with_context(|| format!("reading the CA from {} (make one with `hanse tls ca create`)", a.ca_dir.display()))?;
    let identity = Identity::new(&a.cluster, a.role, &a.name);
    std::fs::create_dir_all(&a.out_dir).with_context(|| format!("cannot create {}", a.out_dir.display()))?;
    let stem = format!("{}-{}-{}", a.cluster, a.role, a.name);
    let (cert, key) = (a.out_dir.join(format!("{stem}.pem")), a.out_dir.join(format!("{stem}-key.pem")));
    refuse_existing(&[&cert, &key])?;
    anyhow::ensure!(
        a.sans.is_empty() || a.role == Role::Server,
        "--san names an API server; an agent's certificate carries none"
    );
    anyhow::ensure!(
        a.jurisdictions.is_empty() || a.role == Role::Server,
        "--jurisdiction names what a server's cluster may claim; an agent's certificate carries none"
    );
    let PemPair { cert_pem, key_pem } = tls::issue_server(&ca, &identity, a.days, &a.sans, &a.jurisdictions)?;
    write_private(&key, &key_pem)?;
    write_public(&cert, &cert_pem)?;
    println!(
        "wrote {} and {} for {} ({}), valid {} days",
        cert.display(),
        key.display(),
        identity,
        identity.uri(),
        a.days
    );
    if !a.jurisdictions.is_empty() {
        println!("its cluster may claim the jurisdictions {}", a.jurisdictions.join(", "));
    }
    Ok(Outcome::Ok)
}

fn refuse_existing(paths: &[&Path]) -> anyhow::Result<()> {
    for p in paths {
        if p.exists() {
            anyhow::bail!("{} exists already; remove it first if you mean to replace it", p.display());
        }
    }
    Ok(())
}
