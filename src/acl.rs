//! `hanse acl`: the first management token, tokens and policies (see
//! `cluster_core::acl` for the model).

use std::path::Path;

use anyhow::Context;
use cluster_core::server::access::{BootstrapRequest, PolicyApply, PolicyView, TokenCreate, TokenSecret, TokenView};
use cluster_core::server::client::{Client, ClientError};
use cluster_core::server::rpc::WriteReply;

use crate::Outcome;
use crate::output::{print_json, table};

fn api(e: ClientError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn print_secret(t: &TokenSecret, what: &str) {
    println!("{what}; its secret is shown only now, keep it safe:");
    println!("  accessor  {}", t.token.accessor);
    println!("  name      {}", t.token.name);
    if t.token.management {
        println!("  grants    everything (management)");
    } else {
        println!("  policies  {}", t.token.policies.join(", "));
    }
    println!("  secret    {}", t.secret);
    println!("export HANSE_TOKEN={}", t.secret);
}

/// `hanse acl bootstrap [--secret-file FILE]`: the cluster's first
/// management token, once. With a file, its first line is the secret (so
/// one secret can bootstrap several clusters).
pub fn bootstrap(c: &Client, secret_file: Option<&Path>, json: bool) -> anyhow::Result<Outcome> {
    let secret = match secret_file {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            let line = text.lines().next().unwrap_or("").trim().to_string();
            anyhow::ensure!(
                cluster_core::acl::is_valid_secret(&line),
                "{}: the first line must be the secret: 16 to 128 printable characters without spaces",
                p.display()
            );
            Some(line)
        }
        None => None,
    };
    let t: TokenSecret = c.post("/v1/acl/bootstrap", &BootstrapRequest { secret }).map_err(api)?;
    if json {
        print_json(&t)?;
    } else {
        print_secret(&t, "ACLs bootstrapped: this is the cluster's first management token");
    }
    Ok(Outcome::Ok)
}

pub fn token_create(
    c: &Client,
    name: &str,
    policies: Vec<String>,
    management: bool,
    json: bool,
) -> anyhow::Result<Outcome> {
    let t: TokenSecret =
        c.post("/v1/acl/tokens", &TokenCreate { name: name.into(), policies, management }).map_err(api)?;
    if json {
        print_json(&t)?;
    } else {
        print_secret(&t, &format!("token `{name}` created"));
    }
    Ok(Outcome::Ok)
}

pub fn token_list(c: &Client, json: bool) -> anyhow::Result<Outcome> {
    let tokens: Vec<TokenView> = c.get("/v1/acl/tokens").map_err(api)?;
    if json {
        print_json(&tokens)?;
        return Ok(Outcome::Ok);
    }
    let mut t = table(&["accessor", "name", "grants", "created"]);
    for k in &tokens {
        let grants = if k.management { "management".to_string() } else { k.policies.join(", ") };
        t.add_row(vec![k.accessor.clone(), k.name.clone(), grants, crate::output::unix_ms_text(k.created_ms)]);
    }
    println!("{t}");
    Ok(Outcome::Ok)
}

pub fn token_revoke(c: &Client, accessor: &str, json: bool) -> anyhow::Result<Outcome> {
    let r: WriteReply = c.delete(&format!("/v1/acl/tokens/{accessor}")).map_err(api)?;
    if json {
        print_json(&r)?;
    } else {
        println!("token {accessor} revoked: its secret opens nothing from now on");
    }
    Ok(Outcome::Ok)
}

/// `hanse acl policy apply NAME FILE`: checked here first, so problems
/// point into the file, then by the server.
pub fn policy_apply(c: &Client, name: &str, path: &Path, json: bool) -> anyhow::Result<Outcome> {
    let file = cluster_core::spec::read_source(path).with_context(|| format!("cannot read {}", path.display()))?;
    let checked = cluster_core::acl::parse_policy(&file, name);
    if checked.value.is_none() {
        eprint!("{}", file.render(&checked.diagnostics));
        anyhow::bail!("{} does not check; nothing was applied", file.name);
    }
    let body = PolicyApply { policy: file.text.to_string(), source: Some(file.name.clone()) };
    let p: PolicyView = c.put(&format!("/v1/acl/policies/{name}"), &body).map_err(api)?;
    if json {
        print_json(&p)?;
    } else {
        println!("policy {name} applied ({} rules)", p.rules.len());
    }
    Ok(Outcome::Ok)
}

pub fn policy_list(c: &Client, json: bool) -> anyhow::Result<Outcome> {
    let policies: Vec<PolicyView> = c.get("/v1/acl/policies").map_err(api)?;
    if json {
        print_json(&policies)?;
        return Ok(Outcome::Ok);
    }
    let mut t = table(&["name", "namespace", "capabilities", "description"]);
    for p in &policies {
        for (i, r) in p.rules.iter().enumerate() {
            let caps: Vec<&str> = r.capabilities.iter().map(|c| c.word()).collect();
            let (name, description) = if i == 0 { (p.name.clone(), p.description.clone()) } else { Default::default() };
            t.add_row(vec![name, r.namespace.clone(), caps.join(", "), description]);
        }
    }
    println!("{t}");
    Ok(Outcome::Ok)
}

pub fn policy_delete(c: &Client, name: &str) -> anyhow::Result<Outcome> {
    let _: WriteReply = c.delete(&format!("/v1/acl/policies/{name}")).map_err(api)?;
    println!("policy {name} deleted; tokens that named it lose what it granted");
    Ok(Outcome::Ok)
}
