//! The run's network: one namespace per server and agent, each with one
//! veth end on a bridge that lives in the run's own control namespace,
//! where `hanse-chaos` itself runs. Nothing of a run touches the host's
//! network: its namespaces are named after the run's id, and removing
//! them removes every link the run made.
//!
//! Faults are nftables rules inside a node's namespace: packets from a
//! blocked address are dropped on input, so a one-way drop is one rule and
//! a partition is the rules both ways. (This kernel has no `tc netem`.)

use std::collections::BTreeSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The run's subnet: the control namespace is `.1`, node `i` is `.10 + i`.
const SUBNET: [u8; 3] = [10, 77, 0];

/// One node's namespace.
pub struct Ns {
    /// `hc-RUN-NAME`: the namespace's name under `/run/netns`.
    pub name: String,
    pub addr: Ipv4Addr,
    /// The namespace's inode: a process is in it when its
    /// `/proc/PID/ns/net` names this inode.
    pub inode: u64,
    /// Held open for `setns` in the children started in it.
    file: File,
}

/// The namespaces of one run.
pub struct Net {
    pub nodes: Vec<Ns>,
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn open(name: &str) -> anyhow::Result<(File, u64)> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).with_context(|| format!("open {path}"))?;
    let inode = file.metadata()?.ino();
    Ok((file, inode))
}

/// The namespace names a run with id `run` gives its nodes and its control
/// namespace (which comes last).
pub fn names(run: &str, nodes: &[String]) -> Vec<String> {
    let mut out: Vec<String> = nodes.iter().map(|n| format!("hc-{run}-{n}")).collect();
    out.push(format!("hc-{run}-ctl"));
    out
}

impl Net {
    /// Creates the control namespace and one namespace per name in
    /// `nodes`, and moves the calling thread into the control namespace.
    /// Call it before any other thread starts: threads started later
    /// inherit the namespace, so every socket of the run is inside it.
    /// On error, what was made is removed again.
    pub fn create(run: &str, nodes: &[String]) -> anyhow::Result<Net> {
        let all = names(run, nodes);
        if let Some(taken) = all.iter().find(|n| Path::new("/run/netns").join(n).exists()) {
            bail!("namespace {taken} exists already: another run has id {run}; start again");
        }
        let made = Net::create_all(&all);
        if made.is_err() {
            remove(&all);
        }
        made
    }

    fn create_all(all: &[String]) -> anyhow::Result<Net> {
        let (ctl, nodes) = all.split_last().expect("the control namespace");
        let [a, b, c] = SUBNET;
        ip(&["netns", "add", ctl])?;
        ip(&["-n", ctl, "link", "set", "lo", "up"])?;
        ip(&["-n", ctl, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", ctl, "addr", "add", &format!("{a}.{b}.{c}.1/24"), "dev", "br0"])?;
        ip(&["-n", ctl, "link", "set", "br0", "up"])?;
        let mut out = Vec::new();
        for (i, name) in nodes.iter().enumerate() {
            let addr = Ipv4Addr::new(a, b, c, 10 + i as u8);
            let veth = format!("v{i}");
            ip(&["netns", "add", name])?;
            ip(&["-n", ctl, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", name])?;
            ip(&["-n", ctl, "link", "set", &veth, "master", "br0"])?;
            ip(&["-n", ctl, "link", "set", &veth, "up"])?;
            ip(&["-n", name, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(&["-n", name, "link", "set", "eth0", "up"])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
            let (file, inode) = open(name)?;
            out.push(Ns { name: name.clone(), addr, inode, file });
        }
        let (ctl_file, _) = open(ctl)?;
        // SAFETY: setns(2) on a namespace file we hold open; it moves only
        // this thread, before any other exists.
        if unsafe { libc::setns(ctl_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {ctl}: {}", std::io::Error::last_os_error());
        }
        Ok(Net { nodes: out })
    }

    /// A command that runs in node `node`'s namespace.
    pub fn command(&self, node: usize, program: &str) -> Command {
        let mut c = Command::new(program);
        let fd = self.nodes[node].file.as_raw_fd();
        // SAFETY: setns(2) is async-signal-safe; `fd` stays open in the
        // parent (the `Net` lives as long as the run) and is inherited.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// Makes node `node` drop every packet from the nodes in `from` (its
    /// whole rule set: an empty `from` lets everything in again).
    pub fn block(&self, node: usize, from: &BTreeSet<usize>) -> anyhow::Result<()> {
        let mut rules = String::from("table inet hanse_chaos\ndelete table inet hanse_chaos\n");
        if !from.is_empty() {
            let addrs: Vec<String> = from.iter().map(|i| self.nodes[*i].addr.to_string()).collect();
            rules.push_str(&format!(
                "table inet hanse_chaos {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    ip saddr {{ {} }} drop\n  }}\n}}\n",
                addrs.join(", ")
            ));
        }
        let mut nft = self.command(node, "nft");
        nft.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = nft.spawn().context("run `nft` (nftables)")?;
        use std::io::Write;
        child.stdin.take().expect("piped").write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft in {}: {}", self.nodes[node].name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// The node whose namespace has inode `inode`.
    pub fn node_of_inode(&self, inode: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.inode == inode)
    }
}

/// Removes the namespaces `names` (each by its name; missing ones are fine).
/// Their links go with them. Processes still in one keep it alive, so kill
/// them first.
pub fn remove(names: &[String]) {
    for name in names {
        if Path::new("/run/netns").join(name).exists() {
            if let Err(e) = ip(&["netns", "delete", name]) {
                eprintln!("warning: {e}");
            }
        }
    }
}

/// The inodes of the namespaces `names` that exist.
pub fn inodes(names: &[String]) -> Vec<u64> {
    names.iter().filter_map(|n| open(n).ok()).map(|(_, i)| i).collect()
}
