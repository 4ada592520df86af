//! Node fleet files: an inventory of node classes, for offline planning,
//! benchmarks and simulated clusters.
//!
//! ```toml
//! [fleet]
//! name = "eu-west"
//! region = "eu-west-1"
//! jurisdictions = ["eu", "gdpr"]
//!
//! [[class]]
//! name = "cloud-m"
//! count = 200
//! cpu = 8
//! memory = "32GiB"
//! zones = ["a", "b", "c"]
//! cost_per_hour = 0.34
//! ```

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::diag::{Diagnostics, SourceFile};
use crate::ids::NodeId;
use crate::model::node::{Environment, ExecutionModel, Node, NodeStatus};
use crate::resources::{self, GpuDevices, Resources};
use crate::spec::Checked;
use crate::spec::read::{self, Table, keyword};

/// The most nodes one fleet file may describe.
pub const FLEET_NODES_MAX: i64 = 100_000;

#[derive(Clone, Debug)]
pub struct Fleet {
    pub name: String,
    pub region: String,
    pub nodes: Vec<Node>,
}

pub fn parse_fleet(file: &SourceFile) -> Checked<Fleet> {
    read::checked(file, read_fleet)
}

fn read_fleet(top: &mut Table, d: &mut Diagnostics) -> Option<Fleet> {
    let (name, region, jurisdictions) = match top.table(d, "fleet") {
        Some(mut f) => {
            f.path = "[fleet]".into();
            let name = f.required_str(d, "name", "\"eu-west\"").map(|(n, _)| n.to_string());
            let region = f.str(d, "region").map_or("default", |(r, _)| r).to_string();
            let juris: Vec<Arc<str>> =
                f.str_list(d, "jurisdictions").unwrap_or_default().into_iter().map(|(j, _)| Arc::from(j)).collect();
            f.finish(d);
            (name, region, juris)
        }
        None => {
            d.error_hint(0..0, "missing [fleet] table", "start the file with [fleet] and name = \"...\"");
            (None, String::new(), Vec::new())
        }
    };
    let region: Arc<str> = Arc::from(region.as_str());
    let mut nodes = Vec::new();
    let mut class_names = HashSet::new();
    let mut total = 0i64;
    let classes = top.tables(d, "class");
    if classes.is_empty() {
        d.error_hint(0..0, "the fleet has no [[class]]", "add a [[class]] with a name, a count, cpu and memory");
    }
    for mut c in classes {
        let class = c.required_str(d, "name", "\"cloud-m\"").and_then(|(n, s)| {
            if class_names.insert(n.to_string()) {
                Some(n)
            } else {
                d.error(s, format!("duplicate class `{n}`"));
                None
            }
        });
        let count = match c.int(d, "count") {
            Some((n, s)) if !(1..=FLEET_NODES_MAX).contains(&n) => {
                d.error_hint(s, format!("count {n} is out of range"), format!("use 1 to {FLEET_NODES_MAX}"));
                0
            }
            Some((n, _)) => n,
            None => 1,
        };
        total += count;
        let mut capacity = Resources::default();
        match c.scalar_text(d, "cpu") {
            Some((t, _, s)) => match resources::parse_cpu(&t) {
                Ok(m) => capacity.cpu_millis = m,
                Err(h) => d.error_hint(s, format!("invalid cpu `{t}`"), h),
            },
            None => c.missing(d, "cpu", "8"),
        }
        match c.str(d, "memory") {
            Some((t, s)) => match resources::parse_bytes(t) {
                Ok(b) => capacity.memory_bytes = b,
                Err(h) => d.error_hint(s, format!("invalid memory `{t}`"), h),
            },
            None => c.missing(d, "memory", "\"32GiB\""),
        }
        if let Some((t, s)) = c.str(d, "disk") {
            match resources::parse_bytes(t) {
                Ok(b) => capacity.disk_bytes = b,
                Err(h) => d.error_hint(s, format!("invalid disk `{t}`"), h),
            }
        } else {
            capacity.disk_bytes = 100 << 30;
        }
        if let Some((t, s)) = c.str(d, "power_budget") {
            match resources::parse_watts(t) {
                Ok(w) => capacity.power_watts = w,
                Err(h) => d.error_hint(s, format!("invalid power_budget `{t}`"), h),
            }
        }
        let mut attributes: BTreeMap<String, String> = BTreeMap::new();
        attributes.insert("arch".into(), c.str(d, "arch").map_or("x86_64", |(a, _)| a).into());
        attributes.insert("os".into(), c.str(d, "os").map_or("linux", |(a, _)| a).into());
        for (k, v, _) in c.str_map(d, "attributes") {
            attributes.insert(k.into(), v.into());
        }
        let meta: BTreeMap<String, String> =
            c.str_map(d, "meta").into_iter().map(|(k, v, _)| (k.into(), v.into())).collect();
        let environment = c.str(d, "environment").map_or(Some(Environment::Cloud), |w| {
            keyword(d, "environment", w, Environment::WORDS, Environment::from_word)
        });
        let execution_model = c.str(d, "execution_model").map_or(Some(ExecutionModel::Container), |w| {
            keyword(d, "execution model", w, ExecutionModel::WORDS, ExecutionModel::from_word)
        });
        let zones: Vec<Arc<str>> = c
            .str_list(d, "zones")
            .filter(|z| !z.is_empty())
            .map_or_else(|| vec![Arc::from("default")], |z| z.into_iter().map(|(z, _)| Arc::from(z)).collect());
        let cost_per_hour = read_cost_per_hour(&mut c, d);
        let latency_class = read_latency_class(&mut c, d);
        let drivers: Vec<Arc<str>> = c.str_list(d, "drivers").map_or_else(
            || vec![Arc::from("exec"), Arc::from("mock")],
            |v| v.into_iter().map(|(x, _)| Arc::from(x)).collect(),
        );
        let node_juris: Vec<Arc<str>> = c
            .str_list(d, "jurisdictions")
            .map_or_else(|| jurisdictions.clone(), |v| v.into_iter().map(|(x, _)| Arc::from(x)).collect());
        let datasets: Vec<Arc<str>> =
            c.str_list(d, "datasets").unwrap_or_default().into_iter().map(|(x, _)| Arc::from(x)).collect();
        let mut gpus = Vec::new();
        if let Some(mut g) = c.table(d, "gpus") {
            let model = g.required_str(d, "model", "\"nvidia-a100\"").map(|(m, _)| Arc::<str>::from(m));
            let count = g.int(d, "count").map_or(1, |(n, _)| n.clamp(0, 64) as u32);
            g.finish(d);
            if let Some(model) = model {
                gpus.push(GpuDevices { model, count });
            }
        }
        c.finish(d);
        let (Some(class), Some(environment), Some(execution_model)) = (class, environment, execution_model) else {
            continue;
        };
        let class: Arc<str> = Arc::from(class);
        for i in 0..count.min(FLEET_NODES_MAX) {
            nodes.push(Node {
                id: NodeId::new(format!("{class}-{i:05}")),
                class: class.clone(),
                region: region.clone(),
                zone: zones[i as usize % zones.len()].clone(),
                environment,
                execution_model,
                attributes: attributes.clone(),
                meta: meta.clone(),
                drivers: drivers.clone(),
                jurisdictions: node_juris.clone(),
                datasets: datasets.clone(),
                capacity,
                gpus: gpus.clone(),
                cost_per_hour,
                latency_class,
                status: NodeStatus::Ready,
                eligible: true,
                draining: false,
                drain_deadline_ms: None,
                agent_address: None,
            });
        }
    }
    if total > FLEET_NODES_MAX {
        d.error_hint(
            0..0,
            format!("the fleet has {total} nodes"),
            format!("a fleet file describes at most {FLEET_NODES_MAX}"),
        );
    }
    Some(Fleet { name: name?, region: region.to_string(), nodes })
}

/// `cost_per_hour`, 0 or more (0 when absent); for fleets and agents.
pub fn read_cost_per_hour(t: &mut Table, d: &mut Diagnostics) -> f64 {
    match t.float(d, "cost_per_hour") {
        Some((x, s)) if x < 0.0 => {
            d.error(s, "cost_per_hour cannot be negative");
            0.0
        }
        Some((x, _)) => x,
        None => 0.0,
    }
}

/// `latency_class`, 0 (nearest) to 9 (farthest), 1 when absent; for
/// fleets and agents.
pub fn read_latency_class(t: &mut Table, d: &mut Diagnostics) -> u8 {
    match t.int(d, "latency_class") {
        Some((n, _)) if (0..=9).contains(&n) => n as u8,
        Some((n, s)) => {
            d.error_hint(s, format!("latency_class {n} is out of range"), "use 0 (nearest) to 9 (farthest)");
            0
        }
        None => 1,
    }
}
