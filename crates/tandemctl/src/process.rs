//! What a process costs, read from Linux's `/proc`: peak resident memory (`VmHWM`) and CPU
//! seconds (user + system, in clock ticks of 1/100 s, Linux's `USER_HZ`).

use std::path::Path;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ProcessUsage {
    pub name: String,
    pub pid: u32,
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
}

/// The process's usage now, or `None` if it is gone (or this is not Linux).
pub fn usage(name: &str, pid: u32) -> Option<ProcessUsage> {
    let peak_mib = memory_mib(pid, "VmHWM:")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|f| f.parse::<f64>().ok());
    let cpu_ticks = ticks(11)? + ticks(12)?;
    Some(ProcessUsage {
        name: name.to_owned(),
        pid,
        peak_rss_mib: peak_mib,
        cpu_seconds: cpu_ticks / 100.0,
    })
}

/// A memory figure of the process from `/proc/<pid>/status` (`field` is e.g. `VmRSS:` for the
/// resident memory now, `VmHWM:` for its peak), in MiB.
pub fn memory_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// CPU seconds the local Postgres server has spent: every live `postgres` process (the
/// postmaster, its backends and helpers) plus what the postmaster's exited children spent.
/// `None` when no Postgres runs on this machine (or this is not Linux).
pub fn postgres_cpu_seconds() -> Option<f64> {
    let mut total = 0.0;
    let mut found = false;
    for entry in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.ends_with("(postgres") {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |index: usize| {
            fields
                .get(index)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        found = true;
        // utime and stime; for the postmaster (whose parent is not a postgres), also cutime and
        // cstime: the backends that already exited.
        total += ticks(11) + ticks(12);
        let parent = fields
            .get(1)
            .and_then(|f| f.parse::<u32>().ok())
            .unwrap_or(0);
        let parent_is_postgres = std::fs::read_to_string(format!("/proc/{parent}/stat"))
            .is_ok_and(|s| s.contains("(postgres)"));
        if !parent_is_postgres {
            total += ticks(13) + ticks(14);
        }
    }
    found.then_some(total / 100.0)
}

/// Every `<name>.pid` in `dir` whose process is alive (the local scripts write them).
pub fn from_pid_files(dir: &Path) -> Vec<(String, u32)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut processes: Vec<(String, u32)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let path = entry.path();
            let name = path.file_name()?.to_str()?.strip_suffix(".pid")?.to_owned();
            let pid: u32 = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
            usage(&name, pid).map(|_| (name, pid))
        })
        .collect();
    processes.sort();
    processes
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
}

/// Cores and memory of this machine.
pub fn machine() -> Machine {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0.0);
    Machine {
        cores,
        memory_gib: memory_kib / 1024.0 / 1024.0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reads_this_process() {
        let me = usage("me", std::process::id()).unwrap();
        assert!(me.peak_rss_mib > 1.0);
        assert!(machine().cores >= 1);
    }
}
