//! Resource quantities and the units people write them in.
//!
//! Quantities are integers in their smallest unit (millicores, bytes, watts)
//! so that adding and comparing them is exact: a node is over-committed or it
//! is not, with no rounding in between.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The scalar dimensions of a node's capacity or an allocation's demand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// Power drawn (demand) or budgeted (capacity); 0 on a node means no budget.
    pub power_watts: u64,
}

impl Resources {
    pub fn saturating_add(self, o: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(o.memory_bytes),
            disk_bytes: self.disk_bytes.saturating_add(o.disk_bytes),
            power_watts: self.power_watts.saturating_add(o.power_watts),
        }
    }

    pub fn saturating_sub(self, o: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(o.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(o.memory_bytes),
            disk_bytes: self.disk_bytes.saturating_sub(o.disk_bytes),
            power_watts: self.power_watts.saturating_sub(o.power_watts),
        }
    }

    /// The first scalar dimension in which `self + ask` exceeds `capacity`.
    /// A node without a power budget (0) never runs out of power.
    pub fn exceeds(self, ask: Resources, capacity: Resources) -> Option<Dimension> {
        let sum = self.saturating_add(ask);
        if sum.cpu_millis > capacity.cpu_millis {
            Some(Dimension::Cpu)
        } else if sum.memory_bytes > capacity.memory_bytes {
            Some(Dimension::Memory)
        } else if sum.disk_bytes > capacity.disk_bytes {
            Some(Dimension::Disk)
        } else if capacity.power_watts > 0 && sum.power_watts > capacity.power_watts {
            Some(Dimension::Power)
        } else {
            None
        }
    }
}

/// GPUs of one model on a node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuDevices {
    pub model: Arc<str>,
    pub count: u32,
}

/// GPUs asked for by a task: `count` devices of `model`, or of any model.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuAsk {
    pub count: u32,
    pub model: Option<Arc<str>>,
}

impl GpuAsk {
    pub fn accepts(&self, model: &str) -> bool {
        self.model.as_deref().is_none_or(|m| m == model)
    }
}

/// A resource dimension, named in placement failure reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dimension {
    Cpu,
    Memory,
    Disk,
    Power,
    Gpu,
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dimension::Cpu => "cpu",
            Dimension::Memory => "memory",
            Dimension::Disk => "disk",
            Dimension::Power => "power",
            Dimension::Gpu => "gpu",
        })
    }
}

/// Parses a CPU quantity: `"500m"` (millicores), `"2"` or `"1.5"` (cores).
pub fn parse_cpu(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.contains(' ') {
        return Err(format!("remove the space: write \"{}\"", t.replace(' ', "")));
    }
    if let Some(m) = t.strip_suffix('m') {
        return m
            .parse::<u64>()
            .map_err(|_| "millicores are a whole number followed by `m`, e.g. \"500m\"".to_string());
    }
    let cores: f64 = t.parse().map_err(|_| "write cores (\"2\", \"0.5\") or millicores (\"500m\")".to_string())?;
    if !cores.is_finite() || cores < 0.0 {
        return Err("cpu must be a positive number of cores".into());
    }
    let millis = cores * 1000.0;
    if millis.fract() != 0.0 {
        return Err("cpu is counted in whole millicores: at most 3 decimals".into());
    }
    Ok(millis as u64)
}

const BYTE_UNITS: &[(&str, u64)] = &[
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("K", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("B", 1),
];

/// Parses a byte quantity with a unit: `"512MiB"`, `"2GiB"`, `"1.5GB"`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    parse_with_units(text, BYTE_UNITS, "\"512MiB\" or \"2GiB\"")
}

/// Parses a power quantity: `"300W"`, `"1.2kW"`.
pub fn parse_watts(text: &str) -> Result<u64, String> {
    parse_with_units(text, &[("kW", 1000), ("W", 1)], "\"300W\" or \"1.2kW\"")
}

fn parse_with_units(text: &str, units: &[(&str, u64)], example: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.contains(' ') {
        return Err(format!("write the number and unit without a space: \"{}\"", t.replace(' ', "")));
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if unit.is_empty() {
        return Err(format!("a unit is needed, e.g. {example}"));
    }
    let Some(&(_, scale)) = units.iter().find(|(u, _)| *u == unit) else {
        let known: Vec<&str> = units.iter().map(|(u, _)| *u).collect();
        return Err(match closest(unit, known.iter().copied()) {
            Some(c) => format!("unknown unit `{unit}`: did you mean `{c}`?"),
            None => format!("unknown unit `{unit}`; use one of {}", known.join(", ")),
        });
    };
    let value: f64 = number.parse().map_err(|_| format!("`{number}` is not a number; write e.g. {example}"))?;
    let total = value * scale as f64;
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err("the quantity is too large".into());
    }
    Ok(total.round() as u64)
}

/// The candidate nearest to `word` by edit distance, if it is near enough to
/// be a likely typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&word.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Formats millicores as people write them: `2`, `1.5`, `250m`.
pub fn fmt_cpu(millis: u64) -> String {
    if millis % 1000 == 0 {
        format!("{}", millis / 1000)
    } else if millis % 100 == 0 {
        format!("{:.1}", millis as f64 / 1000.0)
    } else {
        format!("{millis}m")
    }
}

/// Formats bytes with the largest binary unit that keeps one decimal exact enough.
pub fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, scale) in UNITS {
        if bytes >= scale {
            let v = bytes as f64 / scale as f64;
            return if bytes % scale == 0 { format!("{}{name}", bytes / scale) } else { format!("{v:.1}{name}") };
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_units() {
        assert_eq!(parse_cpu("500m"), Ok(500));
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert_eq!(parse_cpu("1.5"), Ok(1500));
        assert!(parse_cpu("2 cores").unwrap_err().contains("space"));
        assert!(parse_cpu("0.0001").is_err());
        assert!(parse_cpu("-1").is_err());
    }

    #[test]
    fn byte_units() {
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        let spaced = parse_bytes("2 GB").unwrap_err();
        assert!(spaced.contains("\"2GB\""), "{spaced}");
        assert!(parse_bytes("2048").unwrap_err().contains("unit"));
        assert!(parse_bytes("2Gib").unwrap_err().contains("did you mean"));
    }

    #[test]
    fn watts() {
        assert_eq!(parse_watts("300W"), Ok(300));
        assert_eq!(parse_watts("1.2kW"), Ok(1200));
    }

    #[test]
    fn formatting_round_trips() {
        for b in [1u64 << 30, 512 << 20, 3 << 40] {
            assert_eq!(parse_bytes(&fmt_bytes(b)), Ok(b));
        }
        for c in [250u64, 1500, 2000] {
            assert_eq!(parse_cpu(&fmt_cpu(c)), Ok(c));
        }
    }

    #[test]
    fn exceeds_names_the_first_dimension_short() {
        let cap = Resources { cpu_millis: 1000, memory_bytes: 100, disk_bytes: 100, power_watts: 0 };
        let used = Resources { cpu_millis: 500, memory_bytes: 90, ..Default::default() };
        let ask = Resources { cpu_millis: 400, memory_bytes: 20, power_watts: 1_000_000, ..Default::default() };
        assert_eq!(used.exceeds(ask, cap), Some(Dimension::Memory));
        let small = Resources { memory_bytes: 10, ..ask };
        assert_eq!(used.exceeds(small, cap), None, "no power budget means no power limit");
    }
}
