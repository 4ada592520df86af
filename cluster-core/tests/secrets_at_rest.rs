//! Secrets at rest are the owner's alone whatever the umask (security
//! review, row 14: `raft.redb` and `agent.state` were 0644, allocation
//! directories 0755). One test in this binary: it clears the umask.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use cluster_core::agent::driver::Drivers;
use cluster_core::agent::logs::Rotation;
use cluster_core::agent::{Agent, AgentOptions};
use cluster_core::diag::SourceFile;
use cluster_core::raft::storage::RedbStorage;
use cluster_core::spec::parse_fleet;
use cluster_core::transport::mem::MemNetwork;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "current_thread")]
async fn the_log_the_agent_state_and_task_dirs_are_private_under_umask_0() {
    // SAFETY: umask is process-wide; this binary's only test sets it.
    unsafe { libc::umask(0) };
    let base = std::env::temp_dir().join(format!("hanse-at-rest-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();

    let log = base.join("raft.redb");
    drop(RedbStorage::open(&log).unwrap());
    assert_eq!(mode(&log), 0o600, "raft.redb");

    let state = base.join("old.state");
    std::fs::write(&state, b"x").unwrap();
    assert_eq!(mode(&state), 0o666, "the test could not fail: umask 0 gives 0666");
    cluster_core::private::write_private(&state, b"secret").unwrap();
    assert_eq!(mode(&state), 0o600, "a file written privately over a public one");

    let text = "[fleet]\nname = \"lab\"\n[[class]]\nname = \"n\"\ncount = 1\ncpu = 2\nmemory = \"2GiB\"\n";
    let node = parse_fleet(&SourceFile::new("f.toml", text.to_string())).value.unwrap().nodes.remove(0);
    let data = base.join("agent");
    let options = AgentOptions {
        cluster: "lab".into(),
        node,
        servers: vec!["127.0.0.1:9".parse().unwrap()],
        data_dir: data.clone(),
        rotation: Rotation::default(),
        drivers: Drivers::new(None),
        supervisor: None,
        gc: Default::default(),
    };
    let transport = Arc::new(MemNetwork::new().client(cluster_core::transport::tls::Identity::new(
        "lab",
        cluster_core::transport::tls::Role::Agent,
        "n",
    )));
    let agent = Agent::new(options, transport);
    let _ = agent.run(tokio::time::sleep(Duration::from_millis(300))).await;
    assert_eq!(mode(&data), 0o700, "the agent's data_dir");
    assert_eq!(mode(&data.join("allocs")), 0o700, "the allocation directories' parent");
    let _ = std::fs::remove_dir_all(&base);
}
