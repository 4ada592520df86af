//! What an agent finds out about its machine: cores, memory, disk, arch,
//! os, kernel, and NVIDIA GPUs when `nvidia-smi` is there.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::resources::{GpuDevices, Resources};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fingerprint {
    pub resources: Resources,
    pub gpus: Vec<GpuDevices>,
    /// `arch`, `os`, `kernel`, `cpu.cores`, `memory.total`, `hostname`.
    pub attributes: BTreeMap<String, String>,
}

/// Fingerprints this machine; `data_dir`'s file system gives the disk.
pub fn fingerprint(data_dir: &Path) -> Fingerprint {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let memory = meminfo_total().unwrap_or(0);
    let disk = free_disk(data_dir).unwrap_or(0);
    let mut attributes = BTreeMap::new();
    attributes.insert("arch".into(), arch().into());
    attributes.insert("os".into(), std::env::consts::OS.into());
    if let Some(k) = read_trimmed("/proc/sys/kernel/osrelease") {
        attributes.insert("kernel".into(), k);
    }
    if let Some(h) = read_trimmed("/proc/sys/kernel/hostname") {
        attributes.insert("hostname".into(), h);
    }
    attributes.insert("cpu.cores".into(), cores.to_string());
    let gpus = nvidia_gpus();
    Fingerprint {
        resources: Resources { cpu_millis: cores * 1000, memory_bytes: memory, disk_bytes: disk, power_watts: 0 },
        gpus,
        attributes,
    }
}

/// The architecture in the words job constraints use (`x86_64`, `arm64`).
pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        other => other,
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn meminfo_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_total(&text)
}

/// `MemTotal:  16314292 kB` in bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn free_disk(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct we pass; the path is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

/// GPUs by model from `nvidia-smi`; none when it is absent or fails.
fn nvidia_gpus() -> Vec<GpuDevices> {
    let Ok(out) = Command::new("nvidia-smi").args(["--query-gpu=name", "--format=csv,noheader"]).output() else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
}

/// One model name a line (`NVIDIA A100-SXM4-80GB`), counted by model in
/// the words fleets and constraints use (`nvidia-a100`, `nvidia-t4`, `nvidia-rtx-4090`).
pub fn parse_nvidia_smi(text: &str) -> Vec<GpuDevices> {
    let mut by_model: BTreeMap<String, u32> = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let lower = line.to_lowercase();
        let mut name = lower.as_str();
        for vendor in ["nvidia ", "tesla ", "geforce "] {
            name = name.strip_prefix(vendor).unwrap_or(name);
        }
        let model = format!("nvidia-{}", name.split('-').next().unwrap_or(name).trim().replace(' ', "-"));
        *by_model.entry(model).or_default() += 1;
    }
    by_model.into_iter().map(|(model, count)| GpuDevices { model: model.into(), count }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meminfo_and_nvidia_smi() {
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\nMemTotal:  2048 kB\n"), Some(2 << 20));
        assert_eq!(parse_meminfo_total("nothing"), None);
        let gpus = parse_nvidia_smi("NVIDIA A100-SXM4-80GB\nNVIDIA A100-SXM4-80GB\nTesla T4\n\n");
        assert_eq!(gpus.len(), 2);
        assert_eq!((&*gpus[0].model, gpus[0].count), ("nvidia-a100", 2));
        assert_eq!((&*gpus[1].model, gpus[1].count), ("nvidia-t4", 1));
        let here = fingerprint(Path::new("/"));
        assert!(here.resources.cpu_millis >= 1000);
        assert!(here.resources.memory_bytes > 0);
    }
}
