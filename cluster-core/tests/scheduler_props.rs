//! Properties of every plan, over random fleets and jobs:
//! - the applier accepts every placement, and no node ends over capacity
//!   in any dimension (cpu, memory, disk, power, GPUs per model);
//! - every placement satisfies the hard rules (constraints, drivers,
//!   jurisdiction, distinct hosts, node ready);
//! - an instance is left unplaced only if no feasible node could take it;
//! - the same seed gives the same plan.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cluster_core::ids::{JobId, NodeId};
use cluster_core::model::*;
use cluster_core::resources::{GpuAsk, GpuDevices, Resources};
use cluster_core::scheduler::{SchedulerConfig, schedule};
use cluster_core::state::ClusterState;
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

#[derive(Clone, Debug)]
struct ClassSpec {
    count: usize,
    cpu: u64,
    mem_gib: u64,
    power: u64,
    arch: &'static str,
    env: Environment,
    zone: &'static str,
    exec: bool,
    eu: bool,
    gpu: Option<(&'static str, u32)>,
    cost: f64,
    latency: u8,
    down_every: usize,
}

fn class_spec() -> impl Strategy<Value = ClassSpec> {
    (
        (1usize..25, 1u64..=32, 1u64..=64, prop_oneof![Just(0u64), 10u64..200]),
        (prop_oneof![Just("x86_64"), Just("arm64")], 0usize..3, prop_oneof![Just("a"), Just("b"), Just("c")]),
        (any::<bool>(), any::<bool>(), proptest::option::of((prop_oneof![Just("l4"), Just("a100")], 1u32..=8))),
        (0.0f64..3.0, 0u8..4, 0usize..6),
    )
        .prop_map(|((count, cpu, mem_gib, power), (arch, env, zone), (exec, eu, gpu), (cost, latency, down))| {
            ClassSpec {
                count,
                cpu,
                mem_gib,
                power,
                arch,
                env: [Environment::Cloud, Environment::Edge, Environment::Onprem][env],
                zone,
                exec,
                eu,
                gpu,
                cost,
                latency,
                down_every: down,
            }
        })
}

fn nodes(classes: &[ClassSpec]) -> Vec<Node> {
    let mut out = Vec::new();
    for (c, spec) in classes.iter().enumerate() {
        for i in 0..spec.count {
            let mut drivers: Vec<Arc<str>> = vec![Arc::from("mock")];
            if spec.exec {
                drivers.push(Arc::from("exec"));
            }
            out.push(Node {
                id: NodeId::new(format!("c{c}-{i}")),
                class: Arc::from(format!("c{c}")),
                region: Arc::from("r"),
                zone: Arc::from(spec.zone),
                environment: spec.env,
                execution_model: ExecutionModel::Container,
                attributes: BTreeMap::from([("arch".to_string(), spec.arch.to_string())]),
                meta: BTreeMap::new(),
                drivers,
                jurisdictions: vec![Arc::from(if spec.eu { "eu" } else { "us" })],
                datasets: Vec::new(),
                capacity: Resources {
                    cpu_millis: spec.cpu * 1000,
                    memory_bytes: spec.mem_gib * GIB,
                    disk_bytes: 100 * GIB,
                    power_watts: spec.power,
                },
                gpus: spec.gpu.map(|(m, n)| GpuDevices { model: Arc::from(m), count: n }).into_iter().collect(),
                cost_per_hour: spec.cost * spec.cpu as f64,
                latency_class: spec.latency,
                status: if spec.down_every > 0 && i % (spec.down_every + 1) == spec.down_every {
                    NodeStatus::Down
                } else {
                    NodeStatus::Ready
                },
                eligible: i % 7 != 6,
                draining: false,
                drain_deadline_ms: None,
                agent_address: None,
            });
        }
    }
    out
}

fn group(index: usize) -> impl Strategy<Value = TaskGroup> {
    (
        (0u32..60, 100u64..8000, 64u64..16384, prop_oneof![Just(0u64), 1u64..20]),
        (proptest::option::of((1u32..4, proptest::option::of(prop_oneof![Just("l4"), Just("a100")]))), any::<bool>()),
        (0usize..4, any::<bool>(), any::<bool>(), any::<bool>()),
    )
        .prop_map(move |((count, cpu, mem_mib, power), (gpu, exec), (constraint, distinct, affinity, spread))| {
            let constraints = match constraint {
                0 => vec![],
                1 => vec![Predicate::new(Target::Attr("arch".into()), Operator::Eq, "arm64".into()).unwrap()],
                2 => vec![Predicate::new(Target::Environment, Operator::Ne, "edge".into()).unwrap()],
                _ => vec![Predicate::new(Target::Zone, Operator::Regexp, "^[ab]$".into()).unwrap()],
            };
            TaskGroup {
                name: Arc::from(format!("g{index}")),
                count,
                constraints,
                affinities: if affinity {
                    vec![Affinity {
                        predicate: Predicate::new(Target::Environment, Operator::Eq, "onprem".into()).unwrap(),
                        weight: 60,
                    }]
                } else {
                    vec![]
                },
                spreads: if spread {
                    vec![Spread { target: Target::Zone, weight: 50, targets: vec![] }]
                } else {
                    vec![]
                },
                distinct_hosts: distinct,
                datasets: vec![],
                restart: Default::default(),
                on_disconnect: cluster_core::model::job::OnDisconnect::Keep,
                update: None,
                reschedule: cluster_core::model::job::ReschedulePolicy::for_type(cluster_core::model::JobType::Service),
                tasks: vec![Task {
                    name: Arc::from("t"),
                    driver: if exec {
                        Driver::Exec { command: "/bin/true".into(), args: vec![], env: BTreeMap::new(), user: None }
                    } else {
                        Driver::Mock { run_for_ms: 0, exit_code: 0 }
                    },
                    resources: Resources {
                        cpu_millis: cpu,
                        memory_bytes: mem_mib << 20,
                        disk_bytes: GIB,
                        power_watts: power,
                    },
                    gpu: gpu.map(|(count, model)| GpuAsk { count, model: model.map(Arc::from) }),
                    kill_timeout_ms: 5_000,
                    checks: vec![],
                }],
            }
        })
}

fn job(name: &'static str) -> impl Strategy<Value = Job> {
    (0usize..3, 0usize..4, any::<bool>(), prop::collection::vec(0usize..1, 1..=3)).prop_flat_map(
        move |(t, o, eu_only, groups)| {
            let groups: Vec<_> = (0..groups.len()).map(group).collect();
            groups.prop_map(move |groups| Job {
                id: JobId::new(name),
                namespace: Arc::from("default"),
                job_type: [JobType::Service, JobType::Batch, JobType::System][t],
                priority: 50,
                objective: [Objective::Latency, Objective::Cost, Objective::Throughput, Objective::Balanced][o],
                labels: BTreeMap::new(),
                jurisdictions: if eu_only { vec![Arc::from("eu")] } else { vec![] },
                federation: FederationSpec::default(),
                groups,
                version: 0,
                stopped: false,
            })
        },
    )
}

/// The hard rules, written again independently of the scheduler.
fn statically_feasible(node: &Node, job: &Job, g: &TaskGroup) -> bool {
    node.schedulable()
        && g.tasks.iter().all(|t| node.drivers.iter().any(|d| &**d == t.driver_name()))
        && (job.jurisdictions.is_empty() || node.jurisdictions.iter().any(|j| job.jurisdictions.contains(j)))
        && g.constraints.iter().all(|c| c.matches(node.resolve(&c.target).as_deref()))
}

fn check_job(state: &mut ClusterState, job: &Job, seed: u64) -> Result<(), TestCaseError> {
    let config = SchedulerConfig { seed, ..Default::default() };
    let plan = schedule(state, job, &config);
    prop_assert_eq!(&plan, &schedule(state, job, &config), "same seed, same plan");

    for p in &plan.placements {
        let node = state.node(p.node_idx);
        let g = job.group(&p.group).unwrap();
        prop_assert!(statically_feasible(node, job, g), "{} placed on infeasible node {}", p.group, node.id);
    }
    let mut per_group_node: HashMap<(&str, &NodeId), u32> = HashMap::new();
    for p in &plan.placements {
        let n = per_group_node.entry((&p.group, &p.node)).or_default();
        *n += 1;
        let g = job.group(&p.group).unwrap();
        prop_assert!(!(g.distinct_hosts && *n > 1), "distinct_hosts broken on {}", p.node);
        if job.job_type == JobType::System {
            prop_assert!(*n == 1, "system job placed twice on {}", p.node);
        }
    }
    if job.job_type != JobType::System {
        for g in &job.groups {
            let placed = plan.placements.iter().filter(|p| p.group == g.name).count() as u64;
            let unplaced: u64 = plan.unplaced.iter().filter(|u| u.group == g.name).map(|u| u64::from(u.count)).sum();
            prop_assert_eq!(placed + unplaced, u64::from(g.count), "group {} accounting", &g.name);
        }
    }

    let applied = state.apply_plan(&plan);
    prop_assert!(applied.refused.is_empty(), "applier refused {:?}", applied.refused.first());

    let usage = state.recomputed_usage();
    for (i, node) in state.nodes().iter().enumerate() {
        let u = &usage[i];
        prop_assert!(
            u.res.exceeds(Resources::default(), node.capacity).is_none(),
            "node {} over capacity: {:?}",
            node.id,
            u.res
        );
        for (d, dev) in node.gpus.iter().enumerate() {
            prop_assert!(u.gpus[d] <= dev.count, "node {} over its {} GPUs", node.id, dev.model);
        }
        prop_assert_eq!(u, state.usage(cluster_core::ids::NodeIdx(i as u32)), "incremental usage index drifted");
    }

    // Unplaced means unplaceable: no feasible node could still take one.
    for u in &plan.unplaced {
        let g = job.group(&u.group).unwrap();
        let ask = g.resources();
        let gpu = g.gpu();
        for (i, node) in state.nodes().iter().enumerate() {
            let idx = cluster_core::ids::NodeIdx(i as u32);
            let hosts_one = plan.placements.iter().any(|p| p.group == g.name && p.node_idx == idx);
            if !statically_feasible(node, job, g)
                || ((g.distinct_hosts || job.job_type == JobType::System) && hosts_one)
            {
                continue;
            }
            prop_assert!(
                state.usage(idx).fit(node, ask, gpu.as_ref()).is_err(),
                "group {} left {} unplaced ({}) but node {} fits one",
                &g.name,
                u.count,
                u.explain(),
                node.id
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn plans_respect_capacity_constraints_and_seeds(
        classes in prop::collection::vec(class_spec(), 1..6),
        first in job("first"),
        second in job("second"),
        seed in any::<u64>(),
    ) {
        let mut state = ClusterState::with_nodes(nodes(&classes)).unwrap();
        check_job(&mut state, &first, seed)?;
        // The second job plans against the usage the first left behind.
        check_job(&mut state, &second, seed.wrapping_add(1))?;
    }
}
