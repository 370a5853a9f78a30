//! The markdown report: the machine and versions, the targets met or not, and every figure
//! measured, with the definitions needed to read them.

use std::fmt::Write as _;
use std::time::Duration;

use crate::baseline::{self, Baseline};
use crate::e2e::{self, E2e, Step};
use crate::plan::Plan;
use crate::processes::LogSummary;
use crate::procfs;
use crate::scaling::Scaling;

/// Target: sustained end to end at least this fraction of the baseline.
pub const RATIO_TARGET: f64 = 0.25;
/// Target: p99 at half the sustained rate at most this.
pub const P99_TARGET: Duration = Duration::from_millis(250);
/// Target: idle RSS of each service at most this many kB (30 MB).
pub const IDLE_RSS_TARGET_KB: u64 = 30 * 1024;
/// A scaling step grows when its rate is at least this multiple of the previous cell's.
const GROWTH: f64 = 1.10;
/// A cell is CPU-bound when the machine was at least this busy (fraction of all cores).
const CPU_BOUND: f64 = 0.85;

/// Where and with what the run happened.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    /// UTC date and time of the start.
    pub when: String,
    /// CPU model.
    pub cpu_model: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Total memory.
    pub memory: String,
    /// Kernel release.
    pub kernel: String,
    /// RabbitMQ version.
    pub rabbitmq: String,
    /// PostgreSQL version.
    pub postgres: String,
    /// rustc on PATH.
    pub rustc: String,
    /// git commit of the working directory.
    pub commit: String,
    /// Machine CPU use during one idle second before the run, % of one core.
    pub busy_before: Option<f64>,
    /// Whether the RabbitMQ and PostgreSQL processes were found by their listening port
    /// (else their CPU is summed over every process of that name).
    pub servers_found: (bool, bool),
}

impl Meta {
    /// Reads what can be read without the broker and database (those are filled in by the
    /// caller).
    pub fn local() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let kb: f64 = m
                    .lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?;
                Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let commit = match command("git", &["rev-parse", "--short", "HEAD"]) {
            Some(c) => {
                let dirty = command("git", &["status", "--porcelain", "--untracked-files=no"])
                    .is_some_and(|s| !s.is_empty());
                if dirty {
                    format!("{c} (with uncommitted changes in tracked files)")
                } else {
                    c
                }
            }
            None => "unknown (not run from a git checkout)".into(),
        };
        Self {
            when: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            cpu_model,
            cpus: procfs::cpus(),
            memory,
            kernel,
            rabbitmq: "unknown".into(),
            postgres: "unknown".into(),
            rustc: command("rustc", &["--version"]).unwrap_or_else(|| "unknown".into()),
            commit,
            busy_before: None,
            servers_found: (false, false),
        }
    }
}

/// The trimmed stdout of a command that succeeded.
fn command(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Everything a run produced.
pub struct Report {
    /// Where and with what.
    pub meta: Meta,
    /// What was asked.
    pub plan: Plan,
    /// RabbitMQ alone (before the end-to-end ladder, when there is one).
    pub baseline: Option<Baseline>,
    /// RabbitMQ alone again, after the ladder (runs with both parts only).
    pub baseline_after: Option<Baseline>,
    /// hiway end to end.
    pub e2e: Option<E2e>,
    /// Sender scaling.
    pub scaling: Option<Scaling>,
    /// Service logs.
    pub logs: Vec<LogSummary>,
    /// Redeliveries seen by the sinks, and requests without a message id.
    pub sink_anomalies: (u64, u64),
    /// Bodies the end-to-end sink got that are not the route's transform output.
    pub untransformed: u64,
    /// Why the run stopped early, if it did.
    pub failure: Option<String>,
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// What lapin's I/O threads took of each service's figure in a step, as a sentence to follow
/// the step's CPU line; empty when none was measured (a report of an older run).
fn amqp_io(step: &Step) -> String {
    let threads: Vec<String> = step
        .amqp_io
        .per
        .iter()
        .filter_map(|(service, io)| {
            let all = step.cpu.of(service)?;
            Some(format!("{service} {io:.0}% of its {all:.0}%"))
        })
        .collect();
    if threads.is_empty() {
        return String::new();
    }
    format!(
        " Of which lapin's I/O threads ({}): {}.",
        e2e::AMQP_IO_THREAD,
        threads.join(", ")
    )
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**not met**" }
}

/// The most CPU (% of one core) that anything outside the measured processes may use while
/// a window that decides a target (the ratio, or p99) runs for that target to be judged. On a
/// shared virtual machine the hypervisor's steal time shows up there; it slows the windows
/// unequally: twice a run with a halved baseline printed the ratio target as met, and a run
/// whose steps above the highest sustained one lost 20–66% of a core printed it as not met.
pub const SKEW_LIMIT: f64 = 10.0;

/// A ratio to the baseline, with two decimals unless rounding them would carry it across
/// the target: 0.2486 printed as "0.25" next to "not met" (session 11, 00:53) reads as a
/// contradiction, so it gets four.
fn ratio_text(ratio: f64) -> String {
    let short = format!("{ratio:.2}");
    let rounded_meets = short.parse::<f64>().is_ok_and(|r| r >= RATIO_TARGET);
    if rounded_meets == (ratio >= RATIO_TARGET) {
        short
    } else {
        format!("{ratio:.4}")
    }
}

/// The most the two baselines of a run (before and after the ladder) may differ, as a
/// fraction of the higher, for a ratio that falls short to be judged. *other* does not see
/// everything the host does to a virtual machine (a busy sibling hyperthread, a shared cache):
/// in session 10 hiway's rate moved by half between windows that *other* called equally
/// quiet. The broker measured alone twice, ten minutes apart, sees such a change in the
/// machine's speed. Four back-to-back baselines on a quiet machine spread by 9% (11832–12942/s,
/// session 11), so 15% leaves room for that.
pub const DRIFT_LIMIT: f64 = 0.15;

/// Why a target cannot be judged, if it cannot: the *other* CPU of each window that decides
/// it, against [`SKEW_LIMIT`].
fn skew(windows: &[(String, Option<f64>)]) -> Option<String> {
    not_judged(windows, None)
}

/// "**not judged**" with every reason, or `None` when there is none: the *other* CPU of each
/// deciding window over [`SKEW_LIMIT`], and a drift between the baselines (see [`drift`]).
fn not_judged(windows: &[(String, Option<f64>)], drift: Option<String>) -> Option<String> {
    let skewed: Vec<String> = windows
        .iter()
        .filter_map(|(what, other)| {
            other.filter(|o| *o > SKEW_LIMIT).map(|o| {
                // 10.3% printed as "10%" would read as within the limit.
                let decimals = usize::from(o < SKEW_LIMIT + 1.0);
                format!("*other* used {o:.decimals$}% during {what}")
            })
        })
        .collect();
    let mut reasons = Vec::new();
    if !skewed.is_empty() {
        reasons.push(format!("{} (limit {SKEW_LIMIT:.0}%)", skewed.join(" and ")));
    }
    reasons.extend(drift);
    (!reasons.is_empty()).then(|| {
        format!(
            "**not judged**: {}; rerun on a quiet machine",
            reasons.join("; ")
        )
    })
}

/// The baselines of a run, each with the window name its *other* CPU is reported under.
fn baseline_windows(baselines: &[(&str, &Baseline)]) -> Vec<(String, Option<f64>)> {
    baselines
        .iter()
        .map(|(when, b)| {
            let what = if when.is_empty() {
                "the baseline".to_owned()
            } else {
                format!("the baseline {when}")
            };
            (what, b.cpu.other())
        })
        .collect()
}

/// Why a ratio that falls short cannot be judged on account of the machine's speed: its two
/// baselines differ by more than [`DRIFT_LIMIT`]. The ratio is read against the higher, so a
/// machine that was fast for one baseline and slow for the ladder makes hiway look slower
/// than it is; a ratio met against the higher stands.
fn drift(baselines: &[(&str, &Baseline)], met: bool) -> Option<String> {
    let [(first, a), (second, b)] = baselines else {
        return None;
    };
    let (low, high) = (a.rate.min(b.rate), a.rate.max(b.rate));
    let apart = (high - low) / high;
    (!met && apart > DRIFT_LIMIT).then(|| {
        format!(
            "RabbitMQ alone ran at {:.0}/s {first} and {:.0}/s {second}, {:.0}% apart \
             (limit {:.0}%): the machine's speed changed during the run",
            a.rate,
            b.rate,
            apart * 100.0,
            DRIFT_LIMIT * 100.0
        )
    })
}

/// The windows that decide the ratio's verdict, for [`skew`]: always the baselines and
/// the highest sustained step. When the ratio falls short, also every ladder step above that
/// step (none of them was sustained): noise there makes hiway look slower than it is, as noise
/// in the baseline makes it look faster. A ratio that is met stands whatever happened above
/// it: noise there could only have hidden a higher rate.
fn deciding_windows(
    baselines: &[(&str, &Baseline)],
    e2e: &E2e,
    best: &Step,
    met: bool,
) -> Vec<(String, Option<f64>)> {
    let mut windows = baseline_windows(baselines);
    windows.push(("that step".to_owned(), best.cpu.other()));
    if !met {
        windows.extend(
            e2e.steps
                .iter()
                .filter(|s| s.kind == "ladder" && s.rate > best.rate)
                .map(|s| (format!("the {}/s step above it", s.rate), s.cpu.other())),
        );
    }
    windows
}

/// The latency target's verdict. Noise on the machine only ever makes latency worse, so a
/// p99 within the target stands; one over it, measured while *other* used more than
/// [`SKEW_LIMIT`], is not judged (the 21:52 run of session 10: 749 ms at 1125/s with *other*
/// at 58%).
fn latency_verdict(p99: Duration, other: Option<f64>) -> String {
    if p99 <= P99_TARGET {
        return verdict(true).to_owned();
    }
    skew(&[("that step".to_owned(), other)]).unwrap_or_else(|| verdict(false).to_owned())
}

impl Report {
    /// The baselines measured, each with when it ran ("" when the ladder did not run).
    fn baselines(&self) -> Vec<(&'static str, &Baseline)> {
        match (&self.baseline, &self.baseline_after) {
            (Some(b), Some(a)) => vec![("before the ladder", b), ("after the ladder", a)],
            (Some(b), None) => vec![("", b)],
            (None, Some(a)) => vec![("after the ladder", a)],
            (None, None) => Vec::new(),
        }
    }

    /// The rate the end-to-end ratio is read against: the higher of the baselines, so that a
    /// machine that slowed down during the run cannot make hiway look faster.
    fn baseline_rate(&self) -> Option<f64> {
        self.baselines()
            .iter()
            .map(|(_, b)| b.rate)
            .max_by(f64::total_cmp)
    }

    /// The report as markdown.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        self.header(&mut out);
        self.targets(&mut out);
        self.baseline(&mut out);
        self.e2e(&mut out);
        self.scaling(&mut out);
        self.cpu_hints(&mut out);
        self.logs(&mut out);
        out
    }

    fn header(&self, out: &mut String) {
        let m = &self.meta;
        let p = &self.plan;
        let profile = p
            .bin_dir
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| *n == "release" || *n == "debug")
            .map_or(String::new(), |n| format!(" ({n} build)"));
        let _ = writeln!(out, "# hiway benchmark report\n");
        if p.smoke {
            let _ = writeln!(
                out,
                "> **Smoke run**: durations are too short for any figure below to mean anything \
                 about speed. It only shows that the benchmark runs.\n"
            );
        }
        if let Some(failure) = &self.failure {
            let _ = writeln!(
                out,
                "> **The run stopped early**: {failure}\n>\n> What was measured before is below.\n"
            );
        }
        let _ = writeln!(out, "- When: {}", m.when);
        let _ = writeln!(out, "- Command: `{}`", p.command_line);
        let _ = writeln!(
            out,
            "- Service binaries: `{}`{profile}",
            p.bin_dir.display()
        );
        let _ = writeln!(
            out,
            "- Settings: {:.0} s per step, ladder {} /s, grace {:.0} s, {}.",
            p.step.as_secs_f64(),
            p.rates
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            p.grace.as_secs_f64(),
            settings_scope(&p.service_env),
        );
        if !p.service_env.is_empty() {
            let _ = writeln!(
                out,
                "- **Not hiway as shipped**: every service ran with {}. The targets are about \
                 the defaults; this run is a diagnosis.",
                p.service_env
                    .iter()
                    .map(|(k, v)| format!("`{k}={v}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let _ = writeln!(out, "\n## Machine and versions\n");
        let _ = writeln!(out, "| | |\n|---|---|");
        let _ = writeln!(out, "| CPU | {} |", m.cpu_model);
        let _ = writeln!(out, "| Logical CPUs (nproc) | {} |", m.cpus);
        let _ = writeln!(out, "| Memory | {} |", m.memory);
        let _ = writeln!(out, "| Kernel | {} |", m.kernel);
        let _ = writeln!(out, "| RabbitMQ | {} |", m.rabbitmq);
        let _ = writeln!(out, "| PostgreSQL | {} |", m.postgres);
        let _ = writeln!(out, "| rustc | {} |", m.rustc);
        let _ = writeln!(out, "| hiway commit | {} |", m.commit);
        let _ = writeln!(
            out,
            "| Machine CPU busy in the idle second before the run | {}% of one core |",
            pct(m.busy_before)
        );
        let _ = writeln!(out);
        let found = |yes: bool, port_name: &str, name: &str| {
            if yes {
                format!("the process listening on the {port_name} port and its children")
            } else {
                format!("every `{name}` process (the server was not found by its port)")
            }
        };
        let _ = writeln!(
            out,
            "CPU figures are % of one core ({}% = every core). *rabbitmq* is {}; *postgres* is \
             {}; *bench* is this process (load generator and sinks); *other* is the machine's use \
             not accounted for by the processes listed (anything else running, the kernel): \
             when it is large, the figures of that row are skewed.\n",
            m.cpus * 100,
            found(m.servers_found.0, "AMQP", "beam.smp"),
            found(m.servers_found.1, "PostgreSQL", "postgres"),
        );
    }

    fn targets(&self, out: &mut String) {
        let _ = writeln!(out, "## Targets (2-core machine)\n");
        let _ = writeln!(out, "| target | figures | result |\n|---|---|---|");
        let e2e = self.e2e.as_ref();
        let baselines = self.baselines();
        match (self.baseline_rate(), e2e.and_then(|e| Some((e, e.best()?)))) {
            (Some(rate), Some((e, s))) => {
                let ratio = f64::from(s.rate) / rate;
                let met = ratio >= RATIO_TARGET;
                let result = not_judged(
                    &deciding_windows(&baselines, e, s, met),
                    drift(&baselines, met),
                )
                .unwrap_or_else(|| verdict(met).to_owned());
                let which = if baselines.len() > 1 {
                    " (the higher baseline)"
                } else {
                    ""
                };
                let _ = writeln!(
                    out,
                    "| Sustained end to end ≥ {RATIO_TARGET} × baseline | {}/s ÷ {rate:.0}/s{which} = {} | {result} |",
                    s.rate,
                    ratio_text(ratio),
                );
            }
            (Some(rate), None) if self.e2e.is_some() => {
                let _ = writeln!(
                    out,
                    "| Sustained end to end ≥ {RATIO_TARGET} × baseline | no step was sustained; baseline {rate:.0}/s | **not met** |",
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "| Sustained end to end ≥ {RATIO_TARGET} × baseline | not measured (needs the baseline and e2e parts) | - |"
                );
            }
        }
        match self.e2e.as_ref().and_then(|e| Some((e.half()?, e.best()?))) {
            Some((h, best)) => match h.latency {
                Some(l) => {
                    let _ = writeln!(
                        out,
                        "| p99 ≤ {} ms at half the sustained rate | p99 {} ms at {}/s (half of {}/s{}) | {} |",
                        P99_TARGET.as_millis(),
                        ms(l.p99),
                        h.rate,
                        best.rate,
                        if h.kind == "half-rate" {
                            ", its own step"
                        } else {
                            ", the ladder step at that rate"
                        },
                        latency_verdict(l.p99, h.cpu.other())
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "| p99 ≤ {} ms at half the sustained rate | no message was delivered at {}/s | **not met** |",
                        P99_TARGET.as_millis(),
                        h.rate
                    );
                }
            },
            None => {
                let _ = writeln!(
                    out,
                    "| p99 ≤ {} ms at half the sustained rate | not measured (no sustained step) | - |",
                    P99_TARGET.as_millis()
                );
            }
        }
        match &self.e2e {
            Some(e) if !e.idle_rss_kb.is_empty() => {
                let figures: Vec<String> = e2e::SERVICES
                    .iter()
                    .zip(&e.idle_rss_kb)
                    .map(|(s, kb)| format!("{s} {}", kb.map_or("?".into(), mb)))
                    .collect();
                let met = e
                    .idle_rss_kb
                    .iter()
                    .all(|kb| kb.is_some_and(|kb| kb <= IDLE_RSS_TARGET_KB));
                let _ = writeln!(
                    out,
                    "| Idle RSS ≤ 30 MB per service | {} | {} |",
                    figures.join(", "),
                    verdict(met)
                );
            }
            _ => {
                let _ = writeln!(out, "| Idle RSS ≤ 30 MB per service | not measured | - |");
            }
        }
        if let Some(s) = &self.scaling {
            let (met, summary) = scaling_verdict(s);
            let _ = writeln!(
                out,
                "| Sender throughput grows with processes and concurrency until the CPU is the limit | {summary} | {} |",
                verdict(met)
            );
        }
        let _ = writeln!(out);
    }

    fn baseline(&self, out: &mut String) {
        let baselines = self.baselines();
        let Some((_, b)) = baselines.first() else {
            return;
        };
        let _ = writeln!(out, "## Baseline: RabbitMQ alone, one hop\n");
        let _ = writeln!(
            out,
            "One lapin publisher sends persistent {}-byte messages (with hiway's envelope headers) \
             into one quorum queue, keeping {} publisher confirms in flight, for {:.0} s; one \
             lapin consumer on its own connection, prefetch {}, acks each message as it goes. \
             Rate = messages consumed ÷ (first publish → last ack).{}\n",
            b.body_bytes,
            baseline::WINDOW,
            b.publishing.as_secs_f64(),
            baseline::PREFETCH,
            if baselines.len() > 1 {
                format!(
                    " It runs before the end-to-end ladder and again after it: the ratio is read \
                     against the higher of the two, and one that falls short is not judged when \
                     they are more than {:.0}% apart (the machine's speed changed during the run).",
                    DRIFT_LIMIT * 100.0
                )
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            out,
            "| when | published | consumed | first publish → last ack | **rate** | confirmed publish rate | CPU rabbitmq | CPU postgres | CPU bench | CPU other | CPU machine |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
        for (when, b) in &baselines {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1} s | **{:.0}/s** | {:.0}/s | {}% | {}% | {}% | {}% | {}% |",
                if when.is_empty() { "-" } else { when },
                b.published,
                b.consumed,
                b.elapsed.as_secs_f64(),
                b.rate,
                b.publish_rate,
                pct(b.cpu.of("rabbitmq")),
                pct(b.cpu.of("postgres")),
                pct(b.cpu.of("bench")),
                pct(b.cpu.other()),
                pct(b.cpu.machine)
            );
        }
        let _ = writeln!(out);
    }

    fn e2e(&self, out: &mut String) {
        let Some(e) = &self.e2e else { return };
        let p = &self.plan;
        let _ = writeln!(
            out,
            "## End to end: HTTP → ingress → transformer → sender → sink, audit on\n"
        );
        let _ = writeln!(
            out,
            "The load generator posts a {}-byte CommCare form forward (JSON) to ingress at a fixed \
             rate, open loop (requests are sent on schedule whether or not earlier ones were \
             answered; at most {} in flight, a request over that cap is not sent and counts as an \
             error). One route sends the channel to one destination, a sink in the bench process \
             that answers 200 at once. The route has a jq filter on the form's name and a jq \
             transform that turns the form into a DHIS2 tracker event (the sink checks that \
             every body it gets is one). hiway-audit writes the whole audit trail to \
             PostgreSQL meanwhile.\n",
            crate::load::FORM.len(),
            crate::load::MAX_IN_FLIGHT
        );
        let _ = writeln!(
            out,
            "- *offered*: requests due per second of load. *completed*: accepted messages that \
             reached the sink by the step's end + {:.0} s, per second of load. *errors*: any \
             answer but 202, transport errors, requests not sent.\n\
             - *latency*: from the 202 reaching the load generator to the message reaching the \
             sink (same process, same clock), over every message of the step.\n\
             - *ready at end*: ready messages in the ingress, deliver (sink) and audit queues at \
             the step's end; *max*: the largest seen (sampled every 250 ms).\n\
             - *drain*: after the step, time until every queue was empty and every accepted \
             message delivered (the next step starts only then).\n\
             - **sustained** = no errors, ≥ {:.0}% of offered messages completed, and the queues \
             flat: each holds at most {:.0}% of the step's offered messages ready at its end.\n",
            p.grace.as_secs_f64(),
            e2e::COMPLETED_FRACTION * 100.0,
            e2e::FLAT_FRACTION * 100.0
        );
        let _ = writeln!(
            out,
            "| step | offered/s | accepted | completed/s | errors | ready at end (ingress/deliver/audit) | max ready | p50 ms | p95 ms | p99 ms | max ms | drain | sustained |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for s in &e.steps {
            let lat = |f: fn(&e2e::Latency) -> Duration| {
                s.latency.as_ref().map_or("-".into(), |l| ms(f(l)))
            };
            let _ = writeln!(
                out,
                "| {} | {:.0} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                step_name(s),
                s.offered_rate(),
                s.accepted,
                s.completed_rate(),
                if s.errors.total() == 0 {
                    "0".to_owned()
                } else {
                    s.errors.describe()
                },
                join(&s.depth_end),
                join(&s.depth_max),
                lat(|l| l.p50),
                lat(|l| l.p95),
                lat(|l| l.p99),
                lat(|l| l.max),
                s.drain.map_or_else(
                    || format!(
                        "not within the timeout ({} of {} delivered)",
                        s.delivered, s.accepted
                    ),
                    |d| format!("{:.1} s", d.as_secs_f64())
                ),
                if s.sustained {
                    "yes".to_owned()
                } else {
                    format!("no: {}", s.reasons.join("; "))
                }
            );
        }
        let _ = writeln!(out);
        match e.best() {
            Some(best) => {
                let ratio = self.baseline_rate().map_or(String::new(), |rate| {
                    format!(
                        ", {} × the baseline",
                        ratio_text(f64::from(best.rate) / rate)
                    )
                });
                let below: Vec<String> = e
                    .steps
                    .iter()
                    .filter(|s| s.kind == "ladder" && s.rate < best.rate && !s.sustained)
                    .map(|s| format!("{}/s", s.rate))
                    .collect();
                let caveat = if below.is_empty() {
                    String::new()
                } else {
                    format!(
                        " Caution: {} below it {} not sustained, so hiway does not keep up \
                         reliably at every rate up to it.",
                        below.join(", "),
                        if below.len() == 1 { "was" } else { "were" }
                    )
                };
                let _ = writeln!(
                    out,
                    "**Highest sustained rate: {}/s**{ratio}. Ladder: {}.{caveat}\n",
                    best.rate, e.ladder_end
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "**No step was sustained.** Ladder: {}.\n",
                    e.ladder_end
                );
            }
        }

        let _ = writeln!(
            out,
            "CPU during each step's load (% of one core) and peak resident memory (VmHWM, reset at each step's start):\n"
        );
        let _ = writeln!(
            out,
            "| step | ingress | transformer | sender | audit | rabbitmq | postgres | bench | other | machine | peak MB ingress/transformer/sender/audit |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
        for s in &e.steps {
            let cpu = |l: &str| pct(s.cpu.of(l));
            let peaks: Vec<String> = s
                .peak_kb
                .iter()
                .map(|kb| kb.map_or("?".into(), |kb| format!("{:.1}", kb as f64 / 1024.0)))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} |",
                step_name(s),
                cpu("ingress"),
                cpu("transformer"),
                cpu("sender"),
                cpu("audit"),
                cpu("rabbitmq"),
                cpu("postgres"),
                cpu("bench"),
                pct(s.cpu.other()),
                pct(s.cpu.machine),
                peaks.join(" / "),
                if s.peak_reset {
                    ""
                } else {
                    " (since start-up)"
                }
            );
        }
        let _ = writeln!(out);
        let (duplicates, unidentified) = self.sink_anomalies;
        if duplicates > 0 || unidentified > 0 {
            let _ = writeln!(
                out,
                "The sinks saw {duplicates} redeliveries of a message they already had and {unidentified} requests without a message id.\n"
            );
        }
        if self.untransformed > 0 {
            let _ = writeln!(
                out,
                "**The end-to-end sink got {} bodies that are not the transform's output.**\n",
                self.untransformed
            );
        }
    }

    fn scaling(&self, out: &mut String) {
        let Some(s) = &self.scaling else { return };
        let _ = writeln!(
            out,
            "## Scaling per destination: a destination taking {} ms per request\n",
            s.delay.as_millis()
        );
        let _ = writeln!(
            out,
            "Each cell preloads N messages into the destination's deliver queue (valid envelopes \
             published straight to the deliver exchange, so ingress and the transformer take no \
             part), starts the sender processes with `HIWAY_DESTINATIONS__SLOW__CONCURRENCY` set \
             (prefetch stays at its default, the larger of 256 and 4 × concurrency) while hiway-audit writes the trail, \
             and times the sink receiving all N: rate = N ÷ (first arrival → last answer). Ideal = \
             processes × concurrency ÷ {} ms. CPU is measured from the processes' start to the \
             last arrival (% of one core; *senders* is all sender processes together).\n",
            s.delay.as_millis()
        );
        let _ = writeln!(
            out,
            "| concurrency per process | sender processes | messages | time | **delivered/s** | ideal/s | % of ideal | CPU senders | CPU audit | CPU rabbitmq | CPU postgres | CPU bench | CPU other | CPU machine |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for c in &s.cells {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1} s | **{:.0}**{} | {:.0} | {:.0}% | {} | {} | {} | {} | {} | {} | {} |",
                c.concurrency,
                c.processes,
                c.messages,
                c.elapsed.as_secs_f64(),
                c.rate,
                if c.complete {
                    String::new()
                } else {
                    format!(" (only {} arrived before the timeout)", c.delivered)
                },
                c.ideal,
                c.rate / c.ideal * 100.0,
                pct(c.cpu.of("senders")),
                pct(c.cpu.of("audit")),
                pct(c.cpu.of("rabbitmq")),
                pct(c.cpu.of("postgres")),
                pct(c.cpu.of("bench")),
                pct(c.cpu.other()),
                pct(c.cpu.machine)
            );
        }
        let (_, summary) = scaling_verdict(s);
        let _ = writeln!(out, "\nGrowth: {summary}.\n");
    }

    /// The busiest processes where it matters: at the highest sustained step and at the first
    /// step above it that was not sustained.
    fn cpu_hints(&self, out: &mut String) {
        let Some(e) = &self.e2e else { return };
        let Some(best) = e.best() else { return };
        let above = e
            .steps
            .iter()
            .filter(|s| s.kind == "ladder" && s.rate > best.rate && !s.sustained)
            .min_by_key(|s| s.rate);
        let _ = writeln!(out, "## Where the CPU goes\n");
        for (what, s) in [
            ("highest sustained step", Some(best)),
            ("first step above it", above),
        ] {
            let Some(s) = s else { continue };
            let mut per: Vec<(String, f64)> = s.cpu.per.clone();
            if let Some(other) = s.cpu.other() {
                per.push(("other".into(), other));
            }
            per.sort_by(|a, b| b.1.total_cmp(&a.1));
            let _ = writeln!(
                out,
                "- {what} ({}/s): machine {}% of {}%; {}.{}",
                s.rate,
                pct(s.cpu.machine),
                self.meta.cpus * 100,
                per.iter()
                    .map(|(l, v)| format!("{l} {v:.0}%"))
                    .collect::<Vec<_>>()
                    .join(", "),
                amqp_io(s)
            );
        }
        let _ = writeln!(out);
    }

    fn logs(&self, out: &mut String) {
        if self.logs.is_empty() {
            return;
        }
        let _ = writeln!(out, "## Service logs (level warn and above)\n");
        let noisy: Vec<&LogSummary> = self.logs.iter().filter(|l| l.lines > 0).collect();
        if noisy.is_empty() {
            let _ = writeln!(out, "No service process logged a warning or an error.\n");
            return;
        }
        let _ = writeln!(
            out,
            "| process | lines | first distinct lines |\n|---|---|---|"
        );
        for l in noisy {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                l.label,
                l.lines,
                l.samples
                    .iter()
                    .map(|s| format!("`{}`", s.replace('|', "\\|").replace('`', "'")))
                    .collect::<Vec<_>>()
                    .join("<br>")
            );
        }
        let _ = writeln!(out);
    }
}

fn step_name(s: &Step) -> String {
    if s.kind == "ladder" {
        format!("{}/s", s.rate)
    } else {
        format!("{}/s ({})", s.rate, s.kind)
    }
}

fn join(v: &[u32]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Which hiway settings a run used: the shipped defaults, unless `--service-env` overrode
/// some (the report lists those on the next line).
fn settings_scope(service_env: &[(String, String)]) -> &'static str {
    if service_env.is_empty() {
        "every hiway setting at its default (config/default.toml) except names, addresses and \
         `log.filter = \"warn\"`"
    } else {
        "hiway's settings at their defaults (config/default.toml) except names, addresses, \
         `log.filter = \"warn\"` and the overrides on the next line"
    }
}

/// Whether sender throughput grew with each added process and with more concurrency, until
/// the CPU was the limit; and a sentence saying so.
///
/// Compared in order: within each concurrency, each process count against the previous one;
/// then, for each process count, each concurrency against the previous one. A comparison
/// passes when the rate grew by at least 10%, or when either cell had the machine at least
/// 85% busy (the CPU is the limit).
pub fn scaling_verdict(s: &Scaling) -> (bool, String) {
    let capacity = procfs::cpus() as f64 * 100.0;
    let busy = |c: &crate::scaling::Cell| c.cpu.machine.unwrap_or(0.0) >= CPU_BOUND * capacity;
    let mut grew = 0;
    let mut cpu_bound = 0;
    let mut failed = Vec::new();
    let mut compare = |a: &crate::scaling::Cell, b: &crate::scaling::Cell| {
        if b.rate >= GROWTH * a.rate {
            grew += 1;
        } else if busy(a) || busy(b) {
            cpu_bound += 1;
        } else {
            failed.push(format!(
                "{}×{} → {}×{}: {:.0}/s → {:.0}/s with the machine at {}%",
                a.processes,
                a.concurrency,
                b.processes,
                b.concurrency,
                a.rate,
                b.rate,
                pct(b.cpu.machine)
            ));
        }
    };
    let mut concurrencies: Vec<usize> = s.cells.iter().map(|c| c.concurrency).collect();
    concurrencies.dedup();
    let mut processes: Vec<usize> = s.cells.iter().map(|c| c.processes).collect();
    processes.sort_unstable();
    processes.dedup();
    for conc in &concurrencies {
        let row: Vec<_> = s.cells.iter().filter(|c| c.concurrency == *conc).collect();
        for pair in row.windows(2) {
            compare(pair[0], pair[1]);
        }
    }
    for procs in &processes {
        let column: Vec<_> = s.cells.iter().filter(|c| c.processes == *procs).collect();
        for pair in column.windows(2) {
            compare(pair[0], pair[1]);
        }
    }
    let total = grew + cpu_bound + failed.len();
    let summary = if failed.is_empty() {
        format!(
            "{grew} of {total} steps grew ≥ 10%; {cpu_bound} did not with the machine ≥ {:.0}% busy (CPU-bound)",
            CPU_BOUND * 100.0
        )
    } else {
        format!(
            "{grew} of {total} steps grew ≥ 10%, {cpu_bound} were CPU-bound; did not grow while CPU was left: {}",
            failed.join("; ")
        )
    };
    (failed.is_empty() && total > 0, summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_line_claims_the_defaults_only_when_no_service_setting_was_overridden() {
        assert!(settings_scope(&[]).starts_with("every hiway setting at its default"));
        let overridden = [("HIWAY_TRANSFORMER__PREFETCH".to_owned(), "512".to_owned())];
        let scope = settings_scope(&overridden);
        assert!(!scope.contains("every hiway setting"), "{scope}");
        assert!(scope.ends_with("the overrides on the next line"), "{scope}");
    }

    fn window(what: &str, other: Option<f64>) -> (String, Option<f64>) {
        (what.to_owned(), other)
    }

    #[test]
    fn a_ratio_is_judged_only_when_no_deciding_window_was_skewed() {
        assert_eq!(
            skew(&[
                window("the baseline", Some(6.0)),
                window("that step", Some(4.0))
            ]),
            None
        );
        assert_eq!(skew(&[window("the baseline", None)]), None);
        let baseline = skew(&[
            window("the baseline", Some(15.0)),
            window("that step", Some(4.0)),
        ])
        .unwrap();
        assert!(baseline.starts_with("**not judged**"), "{baseline}");
        assert!(baseline.contains("15% during the baseline"), "{baseline}");
        let edge = skew(&[window("that step", Some(10.3))]).unwrap();
        assert!(edge.contains("used 10.3% during that step"), "{edge}");
        assert!(!baseline.contains("that step"), "{baseline}");
        let both = skew(&[
            window("the baseline", Some(58.0)),
            window("that step", Some(25.0)),
        ])
        .unwrap();
        assert!(
            both.contains("58% during the baseline and *other* used 25% during that step"),
            "{both}"
        );
    }

    #[test]
    fn a_p99_over_the_target_on_a_noisy_machine_is_not_judged_but_one_within_it_stands() {
        let ms = Duration::from_millis;
        assert_eq!(latency_verdict(ms(18), Some(58.0)), "**met**");
        assert_eq!(latency_verdict(ms(749), Some(4.0)), "**not met**");
        assert_eq!(latency_verdict(ms(749), None), "**not met**");
        let noisy = latency_verdict(ms(749), Some(58.0));
        assert!(
            noisy.starts_with("**not judged**: *other* used 58% during that step"),
            "{noisy}"
        );
    }

    /// A step whose *other* CPU is `other`: 50% watched, `50 + other` for the machine.
    fn step(kind: &'static str, rate: u32, sustained: bool, other: f64) -> Step {
        Step {
            kind,
            rate,
            duration: Duration::from_secs(10),
            offered: u64::from(rate) * 10,
            accepted: 0,
            errors: Default::default(),
            completed: 0,
            delivered: 0,
            latency: None,
            depth_end: vec![],
            depth_max: vec![],
            cpu: procfs::CpuUsage {
                per: vec![("rabbitmq".into(), 50.0)],
                machine: Some(50.0 + other),
            },
            amqp_io: procfs::CpuUsage::default(),
            peak_kb: vec![],
            peak_reset: true,
            drain: None,
            sustained,
            reasons: vec![],
        }
    }

    #[test]
    fn the_cpu_line_says_what_lapins_io_thread_took_of_each_service() {
        let mut s = step("ladder", 3000, true, 4.0);
        assert_eq!(amqp_io(&s), "", "nothing measured, nothing said");
        s.cpu.per = vec![
            ("transformer".into(), 33.0),
            ("sender".into(), 22.4),
            ("rabbitmq".into(), 74.0),
        ];
        s.amqp_io.per = vec![("transformer".into(), 8.2), ("sender".into(), 5.6)];
        assert_eq!(
            amqp_io(&s),
            " Of which lapin's I/O threads (lapin-io-loop): transformer 8% of its 33%, sender 6% of its 22%."
        );
    }

    #[test]
    fn noise_in_the_steps_that_stopped_the_ladder_leaves_a_ratio_short_of_the_target_unjudged() {
        // The 21:52 run of session 10: quiet up to 2250/s, then the machine was taken from it.
        let steps = vec![
            step("ladder", 2000, true, 3.0),
            step("ladder", 2250, true, 6.0),
            step("ladder", 2500, false, 20.0),
            step("ladder", 2750, false, 66.0),
            step("half-rate", 1125, true, 58.0),
        ];
        let e2e = E2e {
            steps,
            best: Some(1),
            ..Default::default()
        };
        let baseline = broker_alone(12767.0, 4.0);
        let baselines = [("", &baseline)];
        let windows = deciding_windows(&baselines, &e2e, e2e.best().unwrap(), false);
        let names: Vec<&str> = windows.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(
            names,
            [
                "the baseline",
                "that step",
                "the 2500/s step above it",
                "the 2750/s step above it"
            ],
            "the half-rate step and the steps below decide nothing"
        );
        let verdict = skew(&windows).unwrap();
        assert!(
            verdict.contains("*other* used 20% during the 2500/s step above it and *other* used 66% during the 2750/s step above it"),
            "{verdict}"
        );

        // The same run with the steps above it quiet is judged.
        let mut quiet = e2e.clone();
        quiet.steps[2] = step("ladder", 2500, false, 3.0);
        quiet.steps[3] = step("ladder", 2750, false, 4.0);
        assert_eq!(
            skew(&deciding_windows(
                &baselines,
                &quiet,
                quiet.best().unwrap(),
                false
            )),
            None
        );

        // A ratio that is met stands whatever happened above it (the 21:44 run: 4500/s, the
        // second step above its highest sustained one, saw 13%).
        let met = deciding_windows(&baselines, &e2e, e2e.best().unwrap(), true);
        assert_eq!(met.len(), 2, "{met:?}");
        assert_eq!(skew(&met), None);
    }

    fn broker_alone(rate: f64, other: f64) -> Baseline {
        Baseline {
            published: 0,
            consumed: 0,
            publishing: Duration::from_secs(10),
            elapsed: Duration::from_secs(10),
            rate,
            publish_rate: rate,
            body_bytes: 1023,
            cpu: step("ladder", 0, true, other).cpu,
        }
    }

    #[test]
    fn a_short_ratio_is_not_judged_when_the_baselines_before_and_after_the_ladder_drifted_apart() {
        let (before, after) = (broker_alone(15000.0, 2.0), broker_alone(12000.0, 2.0));
        let both = [("before the ladder", &before), ("after the ladder", &after)];
        let reason = drift(&both, false).expect("20% apart is over the limit");
        assert_eq!(
            reason,
            "RabbitMQ alone ran at 15000/s before the ladder and 12000/s after the ladder, \
             20% apart (limit 15%): the machine's speed changed during the run"
        );
        // A ratio met against the higher baseline stands.
        assert_eq!(drift(&both, true), None);
        // Within the limit (9%, the spread of four back-to-back quiet baselines) it is judged.
        let near = broker_alone(13650.0, 2.0);
        assert_eq!(
            drift(
                &[("before the ladder", &before), ("after the ladder", &near)],
                false
            ),
            None
        );
        // One baseline has nothing to drift from.
        assert_eq!(drift(&[("", &before)], false), None);
    }

    /// A report of one run with both baselines and a ladder whose highest sustained step
    /// is `best`/s, every window quiet.
    fn run_with(before: f64, after: f64, best: u32) -> Report {
        let args = <crate::plan::Args as clap::Parser>::parse_from(["hiway-bench"]);
        let plan = Plan::from_args(&args).expect("default plan");
        let e2e = E2e {
            steps: vec![
                step("ladder", best, true, 2.0),
                step("ladder", best + 250, false, 2.0),
            ],
            best: Some(0),
            ..Default::default()
        };
        Report {
            meta: Meta::default(),
            plan,
            baseline: Some(broker_alone(before, 2.0)),
            baseline_after: Some(broker_alone(after, 3.0)),
            e2e: Some(e2e),
            scaling: None,
            logs: Vec::new(),
            sink_anomalies: (0, 0),
            untransformed: 0,
            failure: None,
        }
    }

    fn ratio_row(report: &Report) -> String {
        report
            .to_markdown()
            .lines()
            .find(|l| l.starts_with("| Sustained end to end"))
            .expect("the ratio's row")
            .to_owned()
    }

    #[test]
    fn the_ratio_is_read_against_the_higher_of_the_two_baselines() {
        // 3000/s is 0.25 × 12000/s but only 0.24 × 12500/s.
        let row = ratio_row(&run_with(12000.0, 12500.0, 3000));
        assert!(
            row.contains("3000/s ÷ 12500/s (the higher baseline) = 0.24 | **not met**"),
            "{row}"
        );
        let row = ratio_row(&run_with(12500.0, 12000.0, 3250));
        assert!(
            row.contains("3250/s ÷ 12500/s (the higher baseline) = 0.26 | **met**"),
            "{row}"
        );
        // Both baselines appear in the report, each with when it ran.
        let markdown = run_with(12500.0, 12000.0, 3250).to_markdown();
        assert!(
            markdown.contains("| before the ladder | 0 | 0 | 10.0 s | **12500/s** |"),
            "{markdown}"
        );
        assert!(
            markdown.contains("| after the ladder | 0 | 0 | 10.0 s | **12000/s** |"),
            "{markdown}"
        );
        assert!(
            markdown.contains("3250/s**, 0.26 × the baseline"),
            "{markdown}"
        );
    }

    #[test]
    fn a_run_whose_baselines_drifted_apart_says_so_instead_of_not_met() {
        let row = ratio_row(&run_with(15000.0, 11000.0, 3000));
        assert!(row.contains("= 0.20 | **not judged**: RabbitMQ alone ran at 15000/s before the ladder and 11000/s after the ladder, 27% apart"), "{row}");
        assert!(row.ends_with("; rerun on a quiet machine |"), "{row}");
        // Noise and drift together: both reasons are given.
        let mut noisy = run_with(15000.0, 11000.0, 3000);
        noisy.baseline_after = Some(broker_alone(11000.0, 40.0));
        let row = ratio_row(&noisy);
        assert!(
            row.contains("*other* used 40% during the baseline after the ladder (limit 10%); RabbitMQ alone ran at"),
            "{row}"
        );
    }

    #[test]
    fn a_ratio_just_short_of_the_target_is_not_printed_as_the_target() {
        assert_eq!(ratio_text(3000.0 / 12068.0), "0.2486");
        assert_eq!(ratio_text(3750.0 / 14745.0), "0.25");
        assert_eq!(ratio_text(0.21), "0.21");
        let row = ratio_row(&run_with(12068.0, 11893.0, 3000));
        assert!(row.contains("= 0.2486 | **not met**"), "{row}");
    }
}
