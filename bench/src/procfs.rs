//! CPU time and memory of processes, and of the whole machine, read from `/proc`.
//!
//! CPU is reported as a percentage of one core: the process's user + system time over a
//! window divided by the window's wall time (so 200% is both cores of a 2-core machine).
//! Memory comes from `/proc/<pid>/status`: `VmRSS` now, and `VmHWM`, the peak, which the
//! bench resets at the start of each step (`/proc/<pid>/clear_refs`) so every step reports
//! its own peak.

use std::sync::OnceLock;
use std::time::Instant;

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`; 100 on Linux).
fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    parse_stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime from the text of `/proc/<pid>/stat`. The command name (field 2) is in
/// parentheses and may hold spaces, so fields are counted from the last `)`.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state (field 3) is index 0, so utime (14) is 11 and stime (15) 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// utime + stime of those threads of a process whose name (`/proc/<pid>/task/<tid>/comm`,
/// shown in parentheses in the thread's `stat`) is `comm`, in clock ticks; 0 when none is.
/// lapin names each connection's I/O thread `lapin-io-loop`, so this separates the AMQP
/// client's own thread from the service's.
pub fn thread_ticks(pid: u32, comm: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
        .filter(|stat| thread_name(stat) == Some(comm))
        .filter_map(|stat| parse_stat_ticks(&stat))
        .sum()
}

/// The name in a `stat` line: between the first `(` and the last `)`.
fn thread_name(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// A `kB` line of `/proc/<pid>/status`, such as `VmRSS` or `VmHWM`.
pub fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Resets a process's peak resident set size (`VmHWM`) to its current size, so the next
/// read of `VmHWM` is the peak since now. Needs the right to write the process's
/// `clear_refs` (its owner or root); returns whether it worked.
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Every process whose command name (`/proc/<pid>/comm`) is `comm`: RabbitMQ runs as
/// `beam.smp`, PostgreSQL as one `postgres` process per connection plus its helpers.
pub fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        .collect()
}

/// (busy, total) clock ticks of the whole machine, from the `cpu` line of `/proc/stat`.
/// Idle and iowait count as not busy.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest times are already in user).
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Logical CPUs of the machine.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The parent pid of a process (field 4 of `/proc/<pid>/stat`).
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every process id on the machine.
fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc").map_or_else(
        |_| Vec::new(),
        |entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .collect()
        },
    )
}

/// The process listening on a TCP port of this machine: the socket's inode from
/// `/proc/net/tcp{,6}`, then the process holding a descriptor on it. This tells the broker
/// and the database that serve the bench apart from other RabbitMQ or PostgreSQL instances on
/// the machine (a test's private node, a CLI tool's `beam.smp`).
pub fn listening_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let listening = *state == "0A";
            let on_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && on_port {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    all_pids().into_iter().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.filter_map(Result::ok).any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|link| inodes.iter().any(|i| link.as_os_str() == i.as_str()))
            })
        })
    })
}

/// What a [`CpuMeter`] watches.
#[derive(Clone, Debug)]
pub enum Target {
    /// One process.
    Pid(u32),
    /// A process and its children, summed: PostgreSQL's postmaster forks one backend per
    /// connection, RabbitMQ's `beam.smp` a few helpers.
    Tree(u32),
    /// Every process with this command name, summed (when the server's process is not
    /// found, e.g. in a container this machine cannot see into).
    Named(&'static str),
    /// The threads of one process with this name ([`thread_ticks`]): part of what
    /// [`Target::Pid`] of the same process counts, so never in the same meter as it.
    Threads(u32, &'static str),
}

impl Target {
    fn ticks(&self) -> u64 {
        match self {
            Self::Pid(pid) => cpu_ticks(*pid).unwrap_or(0),
            Self::Tree(root) => all_pids()
                .into_iter()
                .filter(|pid| pid == root || parent(*pid) == Some(*root))
                .filter_map(cpu_ticks)
                .sum(),
            Self::Named(comm) => pids_named(comm).into_iter().filter_map(cpu_ticks).sum(),
            Self::Threads(pid, comm) => thread_ticks(*pid, comm),
        }
    }
}

/// The broker's and the database's processes, found once per run by [`locate_servers`].
static SERVERS: OnceLock<(Target, Target)> = OnceLock::new();

/// Finds the processes serving RabbitMQ and PostgreSQL on these local ports, for every
/// [`CpuMeter::with_infrastructure`] of the run; returns whether each was found (by port)
/// rather than guessed (by name).
pub fn locate_servers(amqp_port: u16, postgres_port: u16) -> (bool, bool) {
    let rabbit = listening_pid(amqp_port);
    let postgres = listening_pid(postgres_port);
    let _ = SERVERS.set((
        rabbit.map_or(Target::Named("beam.smp"), Target::Tree),
        postgres.map_or(Target::Named("postgres"), Target::Tree),
    ));
    (rabbit.is_some(), postgres.is_some())
}

/// Measures the CPU use of labelled targets between two snapshots.
#[derive(Clone, Debug, Default)]
pub struct CpuMeter {
    targets: Vec<(String, Target)>,
}

/// CPU ticks of every target and of the machine at one instant.
#[derive(Clone, Debug)]
pub struct CpuSnapshot {
    at: Instant,
    ticks: Vec<u64>,
    machine: Option<(u64, u64)>,
}

/// CPU use over a window, in % of one core.
#[derive(Clone, Debug, Default)]
pub struct CpuUsage {
    /// Per target, in the meter's order.
    pub per: Vec<(String, f64)>,
    /// The whole machine (all processes, including ones not watched); 100 × cores at most.
    pub machine: Option<f64>,
}

impl CpuUsage {
    /// The use of one target, by label.
    pub fn of(&self, label: &str) -> Option<f64> {
        self.per.iter().find(|(l, _)| l == label).map(|(_, v)| *v)
    }

    /// The machine's use not accounted for by any target: other processes (a build, another
    /// test) competing for the cores, and the kernel's own work. Large values mean the figures
    /// of that window are skewed.
    pub fn other(&self) -> Option<f64> {
        let watched: f64 = self.per.iter().map(|(_, v)| v).sum();
        self.machine.map(|m| (m - watched).max(0.0))
    }
}

impl CpuMeter {
    /// Adds a target.
    pub fn watch(mut self, label: impl Into<String>, target: Target) -> Self {
        self.targets.push((label.into(), target));
        self
    }

    /// Adds the infrastructure every part shares: RabbitMQ, PostgreSQL and the bench process
    /// itself (load generator and sinks), which all compete for the same cores.
    pub fn with_infrastructure(self) -> Self {
        let (rabbit, postgres) = SERVERS
            .get()
            .cloned()
            .unwrap_or((Target::Named("beam.smp"), Target::Named("postgres")));
        self.watch("rabbitmq", rabbit)
            .watch("postgres", postgres)
            .watch("bench", Target::Pid(std::process::id()))
    }

    /// Reads every target now.
    pub fn snapshot(&self) -> CpuSnapshot {
        CpuSnapshot {
            at: Instant::now(),
            ticks: self.targets.iter().map(|(_, t)| t.ticks()).collect(),
            machine: machine_ticks(),
        }
    }

    /// CPU use between two snapshots of this meter.
    pub fn usage(&self, from: &CpuSnapshot, to: &CpuSnapshot) -> CpuUsage {
        let wall = to.at.saturating_duration_since(from.at).as_secs_f64();
        let per_core = |ticks: u64| {
            if wall > 0.0 {
                ticks as f64 / ticks_per_second() / wall * 100.0
            } else {
                0.0
            }
        };
        let per = self
            .targets
            .iter()
            .zip(from.ticks.iter().zip(&to.ticks))
            // A process that exited in between (a PostgreSQL backend) lowers the sum; never
            // report negative use.
            .map(|((label, _), (a, b))| (label.clone(), per_core(b.saturating_sub(*a))))
            .collect();
        let machine = match (from.machine, to.machine) {
            (Some((busy_a, total_a)), Some((busy_b, total_b))) if total_b > total_a => Some(
                (busy_b.saturating_sub(busy_a)) as f64 / (total_b - total_a) as f64
                    * 100.0
                    * cpus() as f64,
            ),
            _ => None,
        };
        CpuUsage { per, machine }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_are_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis, as a process may set it.
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    4 0 100 1000000 200 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(300));
    }

    #[test]
    fn this_process_can_be_measured() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_some());
        assert!(status_kb(pid, "VmRSS").is_some_and(|kb| kb > 0));
        assert!(status_kb(pid, "VmHWM").is_some());
        assert!(machine_ticks().is_some_and(|(busy, total)| busy <= total));
        assert_eq!(parent(pid), Some(std::os::unix::process::parent_id()));
    }

    #[test]
    fn a_threads_cpu_is_counted_under_its_name_and_no_other() {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let (spun, spinning) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-spinner".into())
            .spawn(move || {
                // 200 ms of CPU: 20 ticks at 100 Hz, well over the one needed to show.
                let start = Instant::now();
                while start.elapsed() < std::time::Duration::from_millis(200) {
                    std::hint::black_box(0u64);
                }
                spun.send(()).unwrap();
                // Stay alive until read: an exited thread leaves /proc/<pid>/task.
                wait.recv().unwrap();
            })
            .unwrap();
        spinning.recv().unwrap();
        let pid = std::process::id();
        let named = thread_ticks(pid, "bench-spinner");
        let unknown = thread_ticks(pid, "no-such-thread");
        done.send(()).unwrap();
        thread.join().unwrap();
        assert!(named >= 1, "the spinning thread's ticks: {named}");
        assert_eq!(unknown, 0);
        assert_eq!(thread_name("12 (lapin-io-loop) S 1"), Some("lapin-io-loop"));
        assert_eq!(thread_name("12 (my (odd) name) S 1"), Some("my (odd) name"));
    }

    #[test]
    fn the_process_listening_on_a_port_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listening_pid(port), Some(std::process::id()));
    }
}
