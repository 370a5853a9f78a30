//! hiway end to end: HTTP load at fixed rates stepped upward, through ingress, the
//! transformer and the sender, to the sink, with the audit trail on.
//!
//! Each step offers one rate for `--step-seconds`, then waits until every queue is empty and
//! every accepted message has reached the sink, so steps do not leak into each other. A step
//! is *sustained* when hiway kept up with it (see [`verdict`]); the ladder stops after two
//! consecutive steps that were not. Then one more step runs at half the highest sustained
//! rate, for the latency target.
//!
//! The route has a filter and a jq transform (the form to a DHIS2 tracker event,
//! `install::TRANSFORM`), so the figures include parsing, jq and serializing per message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::broker::Depths;
use crate::install::{self, Installation};
use crate::load::{Errors, Load};
use crate::plan::Plan;
use crate::processes::Fleet;
use crate::procfs::{self, CpuMeter, CpuUsage, Target};
use crate::sink::Sink;

/// The service processes of the end-to-end part, in the order the report lists them.
pub const SERVICES: [&str; 4] = ["ingress", "transformer", "sender", "audit"];
/// The queues watched, in the order the report lists them.
pub const QUEUES: [&str; 3] = ["ingress", "deliver", "audit"];
/// The name lapin gives each connection's I/O thread: every publish, confirm, delivery and
/// ack a service makes crosses between it and the service's own thread.
pub const AMQP_IO_THREAD: &str = "lapin-io-loop";
/// A step is flat when no watched queue holds more ready messages at its end than this
/// fraction of the messages the step offered.
pub const FLAT_FRACTION: f64 = 0.02;
/// A step is sustained only if at least this fraction of its offered messages reached the
/// sink by the step's end plus the grace period.
pub const COMPLETED_FRACTION: f64 = 0.99;
/// How often queue depths are sampled during a step (for the maximum).
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// What the part needs from the run.
pub struct Ctx<'a> {
    /// The plan.
    pub plan: &'a Plan,
    /// The installation.
    pub install: &'a Installation,
    /// Depth reader.
    pub depths: Arc<Depths>,
    /// The destination.
    pub sink: &'a Sink,
}

/// Accepted-to-delivered latency of a step's messages.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    /// Median.
    pub p50: Duration,
    /// 95th percentile.
    pub p95: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest.
    pub max: Duration,
}

/// One step of the ladder.
#[derive(Clone, Debug)]
pub struct Step {
    /// `ladder`, or `half-rate` for the extra step.
    pub kind: &'static str,
    /// Offered rate, messages per second.
    pub rate: u32,
    /// Length of the load.
    pub duration: Duration,
    /// Requests due (sent or not).
    pub offered: u64,
    /// Answered 202.
    pub accepted: usize,
    /// Failed requests.
    pub errors: Errors,
    /// Accepted messages that reached the sink by the step's end plus the grace period.
    pub completed: usize,
    /// Accepted messages that reached the sink by the end of the drain.
    pub delivered: usize,
    /// Over every delivered message of the step.
    pub latency: Option<Latency>,
    /// Ready messages at the step's end, per [`QUEUES`].
    pub depth_end: Vec<u32>,
    /// Largest ready count seen during the step, per [`QUEUES`].
    pub depth_max: Vec<u32>,
    /// CPU during the load, per service then infrastructure.
    pub cpu: CpuUsage,
    /// Of each service's CPU in `cpu`, what lapin's I/O thread used ([`AMQP_IO_THREAD`]), per
    /// [`SERVICES`]. Kept apart: it is already counted in `cpu`.
    pub amqp_io: CpuUsage,
    /// Peak resident memory (VmHWM) during the step, per [`SERVICES`], in kB.
    pub peak_kb: Vec<Option<u64>>,
    /// Whether VmHWM could be reset at the step's start (else the peak is since start-up).
    pub peak_reset: bool,
    /// Time from the step's end until every queue was empty and every message delivered;
    /// `None` if that did not happen within the drain timeout.
    pub drain: Option<Duration>,
    /// Whether hiway kept up.
    pub sustained: bool,
    /// Why not, when it did not.
    pub reasons: Vec<String>,
}

impl Step {
    /// Accepted messages delivered by the grace deadline, per second of load.
    pub fn completed_rate(&self) -> f64 {
        self.completed as f64 / self.duration.as_secs_f64()
    }

    /// Requests due per second of load.
    pub fn offered_rate(&self) -> f64 {
        self.offered as f64 / self.duration.as_secs_f64()
    }
}

/// What the part measured.
#[derive(Clone, Debug, Default)]
pub struct E2e {
    /// Resident memory (VmRSS) of each of [`SERVICES`] after start-up, before any load, kB.
    pub idle_rss_kb: Vec<Option<u64>>,
    /// The ladder, then the half-rate step if one was run.
    pub steps: Vec<Step>,
    /// Index of the highest sustained step.
    pub best: Option<usize>,
    /// Index of the step that measures latency at half the sustained rate.
    pub half: Option<usize>,
    /// Why the ladder ended.
    pub ladder_end: String,
}

impl E2e {
    /// The highest sustained step.
    pub fn best(&self) -> Option<&Step> {
        self.best.map(|i| &self.steps[i])
    }

    /// The half-rate step.
    pub fn half(&self) -> Option<&Step> {
        self.half.map(|i| &self.steps[i])
    }
}

/// Starts the transformer, the sender (serving the fast sink only) and ingress, and waits
/// until ingress is ready. The audit service is already running.
pub async fn start_services(ctx: &Ctx<'_>, fleet: &mut Fleet) -> anyhow::Result<()> {
    fleet.spawn("hiway-transformer", "transformer", &[])?;
    let only_sink = format!("[\"{}\"]", install::SINK);
    fleet.spawn(
        "hiway-sender",
        "sender",
        &[("HIWAY_SENDER__DESTINATIONS", &only_sink)],
    )?;
    fleet.spawn("hiway-ingress", "ingress", &[])?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let ready = format!("{}/readyz", ctx.install.ingress_url);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        fleet.check_alive()?;
        if let Ok(r) = http.get(&ready).send().await
            && r.status() == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("ingress was not ready within 60 s at {ready}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the ladder and the half-rate step, filling `result` as it goes (so a run that fails
/// half-way still reports the steps it made).
pub async fn run(ctx: &Ctx<'_>, fleet: &mut Fleet, result: &mut E2e) -> anyhow::Result<()> {
    let pids: Vec<u32> = SERVICES
        .iter()
        .map(|s| fleet.pid(s).with_context(|| format!("{s} is not running")))
        .collect::<anyhow::Result<_>>()?;
    let load = Load::new(
        &ctx.install.ingress_url,
        install::CHANNEL,
        install::CLIENT_KEY,
    )?;
    tokio::time::sleep(ctx.plan.settle).await;
    result.idle_rss_kb = pids
        .iter()
        .map(|pid| procfs::status_kb(*pid, "VmRSS"))
        .collect();
    crate::progress(&format!(
        "idle RSS (kB) {}",
        SERVICES
            .iter()
            .zip(&result.idle_rss_kb)
            .map(|(s, kb)| format!("{s}={}", kb.map_or("?".into(), |k| k.to_string())))
            .collect::<Vec<_>>()
            .join(" ")
    ));

    if !ctx.plan.warmup.is_zero() {
        let rate = ctx.plan.rates[0].min(250);
        crate::progress(&format!(
            "warm-up: {rate}/s for {:?} (not reported)",
            ctx.plan.warmup
        ));
        let warm = step(ctx, &load, &pids, rate, ctx.plan.warmup, "warm-up").await?;
        if warm.drain.is_none() {
            bail!("the warm-up did not drain: hiway is not delivering (see the service logs)");
        }
    }

    let mut misses = 0;
    result.ladder_end = "every rate of the ladder was run".into();
    for &rate in &ctx.plan.rates {
        fleet.check_alive()?;
        crate::progress(&format!("step: {rate}/s for {:?}", ctx.plan.step));
        let s = step(ctx, &load, &pids, rate, ctx.plan.step, "ladder").await?;
        crate::progress(&describe(&s));
        let drained = s.drain.is_some();
        misses = if s.sustained { 0 } else { misses + 1 };
        result.steps.push(s);
        if !drained {
            result.ladder_end = format!(
                "stopped at {rate}/s: the queues did not drain within {:?}",
                ctx.plan.drain_timeout
            );
            break;
        }
        if misses == 2 {
            result.ladder_end =
                format!("stopped at {rate}/s after two consecutive steps that were not sustained");
            break;
        }
    }
    fleet.check_alive()?;

    result.best = result
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.sustained)
        .max_by_key(|(_, s)| s.rate)
        .map(|(i, _)| i);
    let all_drained = result.steps.iter().all(|s| s.drain.is_some());
    if let Some(best) = result.best() {
        let half = best.rate / 2;
        if let Some(i) = result.steps.iter().position(|s| s.rate == half) {
            result.half = Some(i);
        } else if half > 0 && all_drained {
            crate::progress(&format!("half-rate step: {half}/s for {:?}", ctx.plan.step));
            let s = step(ctx, &load, &pids, half, ctx.plan.step, "half-rate").await?;
            crate::progress(&describe(&s));
            result.steps.push(s);
            result.half = Some(result.steps.len() - 1);
        }
    }
    Ok(())
}

/// One line of progress about a step.
fn describe(s: &Step) -> String {
    format!(
        "  offered {:.0}/s, completed {:.0}/s, errors {}, ready at end {:?}, p99 {}, {}",
        s.offered_rate(),
        s.completed_rate(),
        s.errors.total(),
        s.depth_end,
        s.latency
            .map_or("-".into(), |l| format!("{:.1} ms", ms(l.p99))),
        if s.sustained {
            "sustained".to_owned()
        } else {
            format!("not sustained: {}", s.reasons.join("; "))
        }
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Offers `rate` for `duration`, waits for the drain, and measures everything.
async fn step(
    ctx: &Ctx<'_>,
    load: &Load,
    pids: &[u32],
    rate: u32,
    duration: Duration,
    kind: &'static str,
) -> anyhow::Result<Step> {
    let names = &ctx.install.names;
    let queues = vec![
        names.ingress_queue(),
        names.deliver_queue(&Installation::destination(install::SINK)),
        names.audit_queue(),
    ];
    let meter = per_service(pids, Target::Pid).with_infrastructure();
    let io_meter = per_service(pids, |pid| Target::Threads(pid, AMQP_IO_THREAD));
    let peak_reset = pids.iter().all(|pid| procfs::reset_peak(*pid));
    ctx.sink.reset();

    let (cpu_before, io_before) = (meter.snapshot(), io_meter.snapshot());
    let started = Instant::now();
    let end = started + duration;
    let stop_sampling = CancellationToken::new();
    let sampler = async {
        let mut max = vec![0u32; queues.len()];
        loop {
            tokio::select! {
                _ = stop_sampling.cancelled() => break,
                _ = tokio::time::sleep(SAMPLE_EVERY) => {
                    if let Ok(depths) = ctx.depths.all(&queues).await {
                        for (m, d) in max.iter_mut().zip(depths) {
                            *m = (*m).max(d);
                        }
                    }
                }
            }
        }
        max
    };
    let at_end = async {
        tokio::time::sleep_until(end.into()).await;
        let (cpu_after, io_after) = (meter.snapshot(), io_meter.snapshot());
        let peaks: Vec<Option<u64>> = pids
            .iter()
            .map(|pid| procfs::status_kb(*pid, "VmHWM"))
            .collect();
        let depths = ctx.depths.all(&queues).await;
        stop_sampling.cancel();
        (cpu_after, io_after, peaks, depths)
    };
    let (outcome, max, (cpu_after, io_after, peak_kb, depth_end)) = tokio::join!(
        load.run(f64::from(rate), started, duration),
        sampler,
        at_end
    );
    let depth_end = depth_end.context("cannot read queue depths at the step's end")?;
    let depth_max: Vec<u32> = max
        .iter()
        .zip(&depth_end)
        .map(|(m, e)| (*m).max(*e))
        .collect();

    let ids: Vec<u128> = outcome.accepted.iter().map(|(id, _)| *id).collect();
    let drain_started = Instant::now();
    let drain = drain(ctx, &queues, &ids).await?;
    let drain = drain.then(|| drain_started.elapsed());

    let deadline = end + ctx.plan.grace;
    let arrivals = ctx.sink.arrivals_of(&ids);
    let mut latencies: Vec<Duration> = Vec::with_capacity(ids.len());
    let mut completed = 0;
    for ((_, accepted_at), arrived) in outcome.accepted.iter().zip(&arrivals) {
        if let Some(arrived) = arrived {
            // The sink may see a message a hair before the load generator has read its 202.
            latencies.push(arrived.saturating_duration_since(*accepted_at));
            if *arrived <= deadline {
                completed += 1;
            }
        }
    }
    let delivered = latencies.len();
    let latency = percentiles(&mut latencies);
    let (sustained, mut reasons) = verdict(
        outcome.offered,
        outcome.errors.total(),
        completed,
        &depth_end,
    );
    if drain.is_none() {
        reasons.push(format!(
            "{} accepted messages still undelivered {:?} after the step",
            ids.len() - delivered,
            ctx.plan.drain_timeout
        ));
    }
    Ok(Step {
        kind,
        rate,
        duration,
        offered: outcome.offered,
        accepted: ids.len(),
        errors: outcome.errors,
        completed,
        delivered,
        latency,
        depth_end,
        depth_max,
        cpu: meter.usage(&cpu_before, &cpu_after),
        amqp_io: io_meter.usage(&io_before, &io_after),
        peak_kb,
        peak_reset,
        drain,
        sustained: sustained && drain.is_some(),
        reasons,
    })
}

/// Waits until every queue is empty and every accepted message has reached the sink; false
/// if that did not happen within the drain timeout. Afterwards it waits a little more, so the
/// audit service's last batch (held unacknowledged, so not counted as ready) is written
/// before the next step starts.
async fn drain(ctx: &Ctx<'_>, queues: &[String], ids: &[u128]) -> anyhow::Result<bool> {
    let deadline = Instant::now() + ctx.plan.drain_timeout;
    loop {
        let depths = ctx.depths.all(queues).await?;
        if depths.iter().all(|d| *d == 0) && ctx.sink.count_of(ids) >= ids.len() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a step was sustained, and if not, why. Sustained means: no request failed, at least
/// [`COMPLETED_FRACTION`] of the offered messages reached the sink by the step's end plus the
/// grace period, and the queues stayed flat — every watched queue held at most
/// [`FLAT_FRACTION`] of the step's offered messages (rounded down, at least 1) ready at the
/// step's end.
pub fn verdict(
    offered: u64,
    errors: u64,
    completed: usize,
    depth_end: &[u32],
) -> (bool, Vec<String>) {
    let mut reasons = Vec::new();
    if errors > 0 {
        reasons.push(format!("{errors} requests failed"));
    }
    let done = completed as f64 / (offered.max(1)) as f64;
    if done < COMPLETED_FRACTION {
        reasons.push(format!(
            "only {:.1}% delivered by the step's end + grace",
            done * 100.0
        ));
    }
    let flat = flat_limit(offered);
    for (queue, depth) in QUEUES.iter().zip(depth_end) {
        if u64::from(*depth) > flat {
            reasons.push(format!(
                "{queue} queue grew: {depth} ready at the end (limit {flat})"
            ));
        }
    }
    (reasons.is_empty(), reasons)
}

/// The most ready messages a queue may hold at a step's end for the step to count as flat.
pub fn flat_limit(offered: u64) -> u64 {
    ((offered as f64 * FLAT_FRACTION).floor() as u64).max(1)
}

/// p50, p95, p99 and max by nearest rank; `None` for no samples.
pub fn percentiles(samples: &mut [Duration]) -> Option<Latency> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = |p: f64| {
        let i = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i]
    };
    Some(Latency {
        p50: rank(0.50),
        p95: rank(0.95),
        p99: rank(0.99),
        max: samples[samples.len() - 1],
    })
}

/// A meter with one target per service, labelled as [`SERVICES`] names them.
fn per_service(pids: &[u32], target: impl Fn(u32) -> Target) -> CpuMeter {
    SERVICES
        .iter()
        .zip(pids)
        .fold(CpuMeter::default(), |m, (label, pid)| {
            m.watch(*label, target(*pid))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let l = percentiles(&mut samples).unwrap();
        assert_eq!(
            (l.p50, l.p95, l.p99, l.max),
            (
                Duration::from_millis(50),
                Duration::from_millis(95),
                Duration::from_millis(99),
                Duration::from_millis(100)
            )
        );
        assert!(percentiles(&mut []).is_none());
    }

    #[test]
    fn a_step_is_sustained_only_if_complete_error_free_and_flat() {
        assert_eq!(verdict(10_000, 0, 9_950, &[0, 3, 200]), (true, vec![]));
        let (ok, reasons) = verdict(10_000, 2, 9_800, &[201, 0, 0]);
        assert!(!ok);
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[2].contains("ingress queue grew"), "{reasons:?}");
        // Tiny steps still allow one ready message.
        assert_eq!(flat_limit(10), 1);
    }
}
