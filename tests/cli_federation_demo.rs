//! The README's federation on one machine, as written: three clusters
//! started by `examples/three-regions/start.sh` (real processes, gossip, mutual
//! TLS, policies), a job that overflows eu-west runs partly in us-east, and
//! EU-only work is refused by us-east with the reason. Every process the
//! script started is killed by its pid when the test ends.

use std::process::Command;
use std::time::{Duration, Instant};

struct Demo(std::path::PathBuf);

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(pids) = std::fs::read_to_string(self.0.join("pids")) {
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").arg(pid).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hanse_with(token: &str, ca: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hanse"))
        .env("HANSE_ADDR", "127.0.0.1:4661")
        .env("HANSE_TOKEN", token)
        .env("HANSE_CACERT", ca)
        .args(args)
        .output()
        .unwrap()
}

fn example(path: &str) -> String {
    format!("{}/examples/{path}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_federation_demo_delegates_overflow_and_keeps_eu_work_in_the_eu() {
    let work = std::env::temp_dir().join(format!("hanse-federation-demo-{}", std::process::id()));
    let demo = Demo(work.clone());
    let start = Command::new(example("three-regions/start.sh"))
        .env("HANSE_BIN", env!("CARGO_BIN_EXE_hanse"))
        .env("WORK", &work)
        .output()
        .unwrap();
    assert!(start.status.success(), "{}", String::from_utf8_lossy(&start.stderr));
    // The script bootstraps every cluster with one management secret.
    let token = std::fs::read_to_string(work.join("token")).expect("start.sh wrote the token").trim().to_string();
    let ca = work.join("pki/ca.pem");
    let hanse = |args: &[&str]| hanse_with(&token, &ca, args);
    let anonymous = Command::new(env!("CARGO_BIN_EXE_hanse"))
        .env("HANSE_ADDR", "127.0.0.1:4662")
        .env("HANSE_CACERT", work.join("pki/ca.pem"))
        .env_remove("HANSE_TOKEN")
        .args(["job", "list"])
        .output()
        .unwrap();
    assert_eq!(anonymous.status.code(), Some(1), "us-east answers no one without a token");
    // Wait until eu-west sees both peers' summaries through gossip.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let plan = hanse(&["job", "plan", &example("jobs/web.toml"), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap_or_default();
        if v["delegated"].as_array().is_some_and(|d| !d.is_empty()) {
            assert_eq!(v["delegated"][0][0], "us-east", "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "no federated plan: {}", String::from_utf8_lossy(&plan.stdout));
        std::thread::sleep(Duration::from_millis(300));
    }
    let run = hanse(&["job", "run", &example("jobs/web.toml")]);
    assert_eq!(run.status.code(), Some(0), "{}", String::from_utf8_lossy(&run.stdout));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = hanse(&["federation", "delegations", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&d.stdout).unwrap();
        let out = &v["outbound"][0];
        let instances = out["indices"].as_array().map_or(0, Vec::len) as u64;
        if out["state"] == "registered" && out["running"].as_u64() == Some(instances) && instances > 0 {
            assert_eq!(out["target"], "us-east");
            break;
        }
        assert!(Instant::now() < deadline, "not running in us-east: {v}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // job status shows the job in both clusters, each named.
    let status = hanse(&["job", "status", "web"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("delegated to") && text.matches("us-east").count() >= 7, "{text}");
    // EU-only analytics: what does not fit stays, and us-east is named with
    // the reason.
    let plan = hanse(&["job", "plan", &example("jobs/analytics-eu.toml")]);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert_eq!(plan.status.code(), Some(2), "{text}");
    assert!(text.contains("us-east") && text.contains("may run in [eu]"), "{text}");
    // Run it: what no peer takes waits, and job status says why.
    let run = hanse(&["job", "run", "--detach", &example("jobs/analytics-eu.toml")]);
    assert_eq!(run.status.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = hanse(&["job", "status", "clickstream-rollup"]);
        let text = String::from_utf8_lossy(&status.stdout).to_string();
        if text.contains("waiting for a peer") {
            assert!(text.contains("us-east: the work may run in [eu]"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no retry queue shown: {text}");
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(demo);
}
