//! One run: the parts in order on a private installation, and its removal whatever happens
//! (error, ctrl-c, SIGTERM), so a benchmark never leaves services, queues or databases behind.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::broker::{Depths, Management};
use crate::e2e::{self, E2e};
use crate::install::{self, Installation};
use crate::plan::{Part, Plan};
use crate::processes::Fleet;
use crate::procfs::CpuMeter;
use crate::report::{Meta, Report};
use crate::scaling::{self, Scaling};
use crate::sink::Sink;
use crate::{baseline, load};

/// The service binaries the bench starts.
const BINARIES: [&str; 4] = [
    "hiway-ingress",
    "hiway-transformer",
    "hiway-sender",
    "hiway-audit",
];

/// Runs the plan. An error in a part ends the run early but still returns the report of
/// what was measured, with the error in [`Report::failure`]; only an error before anything
/// could start (no broker, no binaries) is returned as `Err`.
pub async fn run(plan: Plan) -> anyhow::Result<Report> {
    let services_needed = plan.runs(Part::E2e) || plan.runs(Part::Scaling);
    if services_needed {
        Fleet::check_binaries(&plan.bin_dir, &BINARIES)?;
    }
    let mut meta = Meta::local();
    let port = |url: &str, default: u16| {
        url::Url::parse(url)
            .ok()
            .and_then(|u| u.port())
            .unwrap_or(default)
    };
    let (rabbit_found, postgres_found) =
        crate::procfs::locate_servers(port(&plan.amqp_url, 5672), port(&plan.database_url, 5432));
    meta.servers_found = (rabbit_found, postgres_found);
    // Anything else busy on the machine skews every figure; the report shows how busy it was.
    let meter = CpuMeter::default();
    let before = meter.snapshot();
    tokio::time::sleep(Duration::from_secs(1)).await;
    meta.busy_before = meter.usage(&before, &meter.snapshot()).machine;
    meta.rabbitmq = match Management::from_amqp_url(&plan.amqp_url) {
        Ok(m) => m
            .version()
            .await
            .unwrap_or_else(|e| format!("unknown (management API: {e:#})")),
        Err(e) => format!("unknown ({e:#})"),
    };
    meta.postgres = install::postgres_version(&plan.database_url)
        .await
        .with_context(|| {
            format!(
                "cannot reach PostgreSQL at {} (run deploy/deps.sh)",
                crate::plan::redact(&plan.database_url)
            )
        })?;
    crate::progress(&format!(
        "RabbitMQ {}, PostgreSQL {}, binaries in {}",
        meta.rabbitmq,
        meta.postgres,
        plan.bin_dir.display()
    ));

    let sink = Sink::start(Duration::ZERO).await?;
    let slow = Sink::start(plan.slow_delay).await?;
    let install =
        Installation::create(&plan.amqp_url, &plan.database_url, &sink.url(), &slow.url()).await?;
    crate::progress(&format!("installation {}", install.prefix));
    let mut fleet = Fleet::new(
        &plan.bin_dir,
        &install.config_dir(),
        &install.log_dir(),
        &plan.service_env,
    );
    let mut report = Report {
        meta,
        plan: plan.clone(),
        baseline: None,
        baseline_after: None,
        e2e: None,
        scaling: None,
        logs: Vec::new(),
        sink_anomalies: (0, 0),
        untransformed: 0,
        failure: None,
    };

    let outcome = tokio::select! {
        r = parts(&plan, &install, &mut fleet, &sink, &slow, &mut report) => r,
        signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    if let Err(error) = outcome {
        crate::warn(&format!("{error:#}"));
        report.failure = Some(format!("{error:#}"));
    }
    crate::progress("stopping the services and removing the installation");
    fleet.stop_all().await;
    report.logs = fleet.log_summaries();
    let (a, b) = (sink.anomalies(), slow.anomalies());
    report.sink_anomalies = (a.0 + b.0, a.1 + b.1);
    report.untransformed = sink.untransformed();
    if report.untransformed > 0 && report.failure.is_none() {
        report.failure = Some(format!(
            "the sink got {} bodies that are not the route's transform output",
            report.untransformed
        ));
    }
    install.remove().await;
    sink.stop().await;
    slow.stop().await;
    Ok(report)
}

/// The parts, in order, each writing into the report as it goes.
async fn parts(
    plan: &Plan,
    install: &Installation,
    fleet: &mut Fleet,
    sink: &Sink,
    slow: &Sink,
    report: &mut Report,
) -> anyhow::Result<()> {
    if plan.runs(Part::Baseline) {
        crate::progress(&format!("baseline: RabbitMQ alone for {:?}", plan.baseline));
        report.baseline = Some(broker_alone(plan, install).await?);
    }
    if !(plan.runs(Part::E2e) || plan.runs(Part::Scaling)) {
        return Ok(());
    }

    let depths = Arc::new(Depths::open(&plan.amqp_url).await?);
    // Audit first: it migrates the database and declares the topology, and both other parts
    // need the audit trail on.
    fleet.spawn("hiway-audit", "audit", &[])?;
    wait_for_queue(fleet, &depths, &install.names.audit_queue()).await?;

    if plan.runs(Part::E2e) {
        let ctx = e2e::Ctx {
            plan,
            install,
            depths: depths.clone(),
            sink,
        };
        e2e::start_services(&ctx, fleet).await?;
        let result = report.e2e.insert(E2e::default());
        e2e::run(&ctx, fleet, result).await?;
        // The scaling part needs the machine to itself.
        for service in ["ingress", "transformer", "sender"] {
            fleet.stop(service).await;
        }
        // The broker alone again, with the same machine minutes later: a baseline that moved
        // says the machine's speed changed while the ladder ran (see report::DRIFT_LIMIT).
        if plan.runs(Part::Baseline) {
            crate::progress("baseline again, after the ladder");
            report.baseline_after = Some(broker_alone(plan, install).await?);
        }
    }
    if plan.runs(Part::Scaling) {
        let result = report.scaling.insert(Scaling::default());
        scaling::run(plan, install, fleet, &depths, slow, result).await?;
    }
    depths.close().await;
    Ok(())
}

/// One baseline run: RabbitMQ alone, one hop, for the plan's baseline duration.
async fn broker_alone(plan: &Plan, install: &Installation) -> anyhow::Result<baseline::Baseline> {
    let b = baseline::run(
        &plan.amqp_url,
        &install.baseline_queue(),
        load::FORM,
        plan.baseline,
        plan.drain_timeout,
    )
    .await?;
    crate::progress(&format!("  {:.0} messages/s", b.rate));
    Ok(b)
}

/// Waits until a queue exists: the first service to connect declares the whole topology.
async fn wait_for_queue(fleet: &mut Fleet, depths: &Depths, queue: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        fleet.check_alive()?;
        if depths.ready(queue).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{queue} was not declared within 60 s: hiway-audit did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resolves on ctrl-c or SIGTERM (e.g. a CI timeout), so the run still removes what it made.
async fn interrupted() -> &'static str {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let sigterm = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        Ok(()) = tokio::signal::ctrl_c() => "ctrl-c",
        () = sigterm => "SIGTERM",
    }
}
