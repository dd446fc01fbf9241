//! The sampler: one thread that reads the sources on a fixed cadence and
//! publishes samples into the engine (`gpu:<index>`, `gpu:status`,
//! `sys:host`). Failure policy lives here, not in the sources: backoff for
//! initialisation and lost devices, unsupported metrics remembered, one
//! warning per episode.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::layer::engine::Engine;
use crate::telemetry::config::TelemetryConfig;
use crate::telemetry::host::HostSource;
use crate::telemetry::source::{
    DeviceInfo, DeviceState, DeviceStatus, GpuError, GpuSource, GpuStatus, Metric, Reading,
    BENIGN_THROTTLE_REASONS,
};

/// Event name of the record published while the GPU library is unavailable.
pub const GPU_STATUS_EVENT: &str = "gpu:status";
/// Event name of the host samples.
pub const HOST_EVENT: &str = "sys:host";

#[derive(Default)]
struct Ctl {
    stop: bool,
    slow: bool,
}

/// What the handle and the sampler thread share.
pub(crate) struct Shared {
    status: Mutex<(GpuStatus, Vec<DeviceStatus>)>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    pub(crate) samples: AtomicU64,
    pub(crate) ticks: AtomicU64,
    pub(crate) busy_ns: AtomicU64,
    pub(crate) init_ns: AtomicU64,
    pub(crate) started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn new(status: GpuStatus) -> Arc<Shared> {
        Arc::new(Shared {
            status: Mutex::new((status, Vec::new())),
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            samples: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            init_ns: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    pub(crate) fn status(&self) -> GpuStatus {
        lock(&self.status).0.clone()
    }

    pub(crate) fn devices(&self) -> Vec<DeviceStatus> {
        lock(&self.status).1.clone()
    }

    pub(crate) fn request_stop(&self) {
        lock(&self.ctl).stop = true;
        self.cv.notify_all();
    }

    pub(crate) fn request_slow(&self) {
        lock(&self.ctl).slow = true;
        self.cv.notify_all();
    }

    fn take_slow(&self) -> bool {
        std::mem::take(&mut lock(&self.ctl).slow)
    }

    /// Waits until `next`, a stop (false) or a slow request (true, early).
    fn wait(&self, next: Instant) -> bool {
        let mut ctl = lock(&self.ctl);
        loop {
            if ctl.stop {
                return false;
            }
            let now = Instant::now();
            if ctl.slow || now >= next {
                return true;
            }
            ctl = self
                .cv
                .wait_timeout(ctl, next - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

struct Lost {
    reason: String,
    retry_at: Instant,
    backoff: Duration,
}

struct Dev {
    info: DeviceInfo,
    name: String,
    base: Map<String, Value>,
    unsupported: Vec<Metric>,
    lost: Option<Lost>,
    last_energy: Option<(Instant, f64)>,
}

impl Dev {
    fn new(info: DeviceInfo) -> Dev {
        let mut base = Map::new();
        base.insert("section".into(), "devices".into());
        base.insert("window".into(), json!({"status": "ok"}));
        base.insert("index".into(), info.index.into());
        base.insert("uuid".into(), info.uuid.clone().into());
        base.insert("name".into(), info.name.clone().into());
        if let Some(b) = info.memory_total_bytes {
            base.insert("memory_total_bytes".into(), b.into());
        }
        if let Some(w) = info.power_limit_watts {
            base.insert("power_limit_watts".into(), w.into());
        }
        Dev {
            name: format!("gpu:{}", info.index),
            info,
            base,
            unsupported: Vec::new(),
            lost: None,
            last_energy: None,
        }
    }

    fn payload(&self, metrics: Map<String, Value>, throttle: Option<Vec<String>>) -> Value {
        let mut p = self.base.clone();
        let status = match &self.lost {
            Some(l) => format!("lost: {}", l.reason),
            None => "ok".into(),
        };
        p.insert("status".into(), status.into());
        if let Some(t) = throttle {
            p.insert("throttle_reasons".into(), t.into());
        }
        p.insert("metrics".into(), Value::Object(metrics));
        Value::Object(p)
    }

    fn state(&self) -> DeviceState {
        match &self.lost {
            Some(l) => DeviceState::Lost(l.reason.clone()),
            None => DeviceState::Ok,
        }
    }

    /// Marks the device lost (warning once per loss) or, if it already is,
    /// schedules the next retry further out.
    fn mark_lost(&mut self, reason: String, now: Instant, cfg: &TelemetryConfig) {
        match &mut self.lost {
            None => {
                tracing::warn!(
                    target: "spillway::telemetry",
                    "GPU {} ({}, {}) lost: {reason}; the other devices go on",
                    self.info.index,
                    self.info.name,
                    self.info.uuid
                );
                self.last_energy = None;
                self.lost = Some(Lost {
                    reason,
                    retry_at: now + cfg.retry_initial(),
                    backoff: (cfg.retry_initial() * 2).min(cfg.retry_max()),
                });
            }
            Some(l) => {
                l.reason = reason;
                l.retry_at = now + l.backoff;
                l.backoff = (l.backoff * 2).min(cfg.retry_max());
            }
        }
    }
}

/// A reading as JSON: integral values as integers (bytes, MHz, percent
/// from NVML read naturally), the rest as floats.
fn num(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        if v >= 0.0 {
            return (v as u64).into();
        }
        return (v as i64).into();
    }
    v.into()
}

/// The mean power between two energy-counter readings, in watts; `None`
/// for the first reading or after the counter went back (driver reload).
pub(crate) fn power_from_energy(prev: Option<(Instant, f64)>, cur: (Instant, f64)) -> Option<f64> {
    let (t0, e0) = prev?;
    let dt = cur.0.checked_duration_since(t0)?.as_secs_f64();
    let de = cur.1 - e0;
    (dt > 0.0 && de >= 0.0).then(|| de / dt)
}

enum Outcome {
    Publish(Value),
    Skip,
    Unavailable(String),
}

enum Phase {
    Down {
        reason: String,
        retry_at: Instant,
        backoff: Duration,
    },
    Up(Vec<Dev>),
}

struct Gpu {
    source: Box<dyn GpuSource>,
    phase: Phase,
    /// The unavailability reason already logged in this episode.
    warned: Option<String>,
    /// Time spent in `init` during the current tick (reported apart: it is
    /// a one-off, not the steady cost).
    init_spent: Duration,
}

impl Gpu {
    fn go_down(&mut self, reason: String, now: Instant, backoff: Duration, cfg: &TelemetryConfig) {
        if self.warned.as_deref() != Some(reason.as_str()) {
            tracing::warn!(
                target: "spillway::telemetry",
                "GPU telemetry unavailable: {reason}; retrying in {backoff:?}, with backoff"
            );
            self.warned = Some(reason.clone());
        } else {
            tracing::debug!(target: "spillway::telemetry", "GPU telemetry still unavailable: {reason}");
        }
        self.phase = Phase::Down {
            reason,
            retry_at: now + backoff,
            backoff: (backoff * 2).min(cfg.retry_max()),
        };
    }

    fn try_init(&mut self, now: Instant, backoff: Duration, cfg: &TelemetryConfig) {
        let source = &mut self.source;
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| source.init()))
            .unwrap_or_else(|_| Err(GpuError::Unavailable("the GPU source panicked".into())));
        self.init_spent += started.elapsed();
        match result {
            Ok(devices) if !devices.is_empty() => {
                tracing::info!(
                    target: "spillway::telemetry",
                    "GPU telemetry: {} device(s) via {}",
                    devices.len(),
                    self.source.name()
                );
                self.warned = None;
                self.phase = Phase::Up(devices.into_iter().map(Dev::new).collect());
            }
            Ok(_) => self.go_down(
                format!("{} found no GPU", self.source.name()),
                now,
                backoff,
                cfg,
            ),
            Err(e) => self.go_down(e.to_string(), now, backoff, cfg),
        }
    }

    /// One sample of every device; returns the records to publish.
    fn tick(&mut self, now: Instant, slow: bool, cfg: &TelemetryConfig) -> Vec<(String, Value)> {
        if let Phase::Down {
            retry_at, backoff, ..
        } = self.phase
        {
            if now >= retry_at {
                self.try_init(now, backoff, cfg);
            }
        }
        let devices = match &mut self.phase {
            Phase::Down { reason, .. } => {
                let status = format!("unavailable: {reason}");
                return vec![(
                    GPU_STATUS_EVENT.into(),
                    json!({"window": {"status": status, "devices": []}}),
                )];
            }
            Phase::Up(devices) => devices,
        };
        let mut out = Vec::with_capacity(devices.len());
        let mut down = None;
        for dev in devices.iter_mut() {
            let source = &mut self.source;
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                sample_device(dev, source.as_mut(), now, slow, cfg)
            }))
            .unwrap_or_else(|_| Outcome::Unavailable("the GPU source panicked".into()));
            match outcome {
                Outcome::Publish(p) => out.push((dev.name.clone(), p)),
                Outcome::Skip => {}
                Outcome::Unavailable(reason) => {
                    down = Some(reason);
                    break;
                }
            }
        }
        if let Some(reason) = down {
            self.go_down(reason, now, cfg.retry_initial(), cfg);
            return self.tick(now, slow, cfg);
        }
        out
    }

    fn status(&self) -> (GpuStatus, Vec<DeviceStatus>) {
        match &self.phase {
            Phase::Down { reason, .. } => (GpuStatus::Unavailable(reason.clone()), Vec::new()),
            Phase::Up(devices) => (
                GpuStatus::Ok,
                devices
                    .iter()
                    .map(|d| DeviceStatus {
                        info: d.info.clone(),
                        state: d.state(),
                    })
                    .collect(),
            ),
        }
    }
}

fn sample_device(
    dev: &mut Dev,
    source: &mut dyn GpuSource,
    now: Instant,
    slow: bool,
    cfg: &TelemetryConfig,
) -> Outcome {
    if let Some(l) = &dev.lost {
        if now < l.retry_at {
            return Outcome::Publish(dev.payload(Map::new(), None));
        }
    }
    let wanted: Vec<Metric> = Metric::FAST
        .iter()
        .chain(if slow { &Metric::SLOW[..] } else { &[] })
        .copied()
        .filter(|m| !dev.unsupported.contains(m))
        .collect();
    let readings = match source.sample(&dev.info, &wanted) {
        Ok(r) => r,
        Err(GpuError::Unavailable(reason)) => return Outcome::Unavailable(reason),
        Err(GpuError::Lost(reason)) => {
            dev.mark_lost(reason, now, cfg);
            return Outcome::Publish(dev.payload(Map::new(), None));
        }
        Err(e) => {
            tracing::debug!(target: "spillway::telemetry", "GPU {}: sample failed: {e}", dev.info.index);
            if let Some(l) = &dev.lost {
                let reason = l.reason.clone();
                dev.mark_lost(reason, now, cfg);
                return Outcome::Publish(dev.payload(Map::new(), None));
            }
            return Outcome::Skip;
        }
    };
    let mut metrics = Map::new();
    let mut throttle = None;
    let mut lost = None;
    for (m, r) in readings {
        match r {
            Ok(Reading::Value(v)) if m == Metric::Energy => {
                if let Some(w) = power_from_energy(dev.last_energy, (now, v)) {
                    metrics.insert(m.field().into(), w.into());
                }
                dev.last_energy = Some((now, v));
            }
            Ok(Reading::Value(v)) => {
                metrics.insert(m.field().into(), num(v));
            }
            Ok(Reading::Reasons(reasons)) => {
                let throttled = reasons
                    .iter()
                    .any(|r| !BENIGN_THROTTLE_REASONS.contains(&r.as_str()));
                metrics.insert(
                    "throttled_percent".into(),
                    if throttled { 100 } else { 0 }.into(),
                );
                throttle = Some(reasons);
            }
            Err(GpuError::NotSupported) => {
                tracing::debug!(
                    target: "spillway::telemetry",
                    "GPU {}: {} not supported; not asked again",
                    dev.info.index,
                    m.field()
                );
                if !dev.unsupported.contains(&m) {
                    dev.unsupported.push(m);
                }
            }
            Err(GpuError::Lost(reason)) => lost = Some(reason),
            Err(GpuError::Unavailable(reason)) => return Outcome::Unavailable(reason),
            Err(GpuError::Failed(e)) => tracing::trace!(
                target: "spillway::telemetry",
                "GPU {}: {} failed: {e}",
                dev.info.index,
                m.field()
            ),
        }
    }
    if let Some(reason) = lost {
        dev.mark_lost(reason, now, cfg);
        return Outcome::Publish(dev.payload(Map::new(), None));
    }
    if dev.lost.take().is_some() {
        tracing::info!(
            target: "spillway::telemetry",
            "GPU {} ({}) is back",
            dev.info.index,
            dev.info.name
        );
    }
    Outcome::Publish(dev.payload(metrics, throttle))
}

/// The sampler: its state and its sources. Driven by [`run`] on its own
/// thread, or tick by tick in tests.
pub(crate) struct Sampler {
    engine: Engine,
    config: TelemetryConfig,
    shared: Arc<Shared>,
    gpu: Option<Gpu>,
    host: Option<(HostSource, Map<String, Value>)>,
    next_slow: Option<Instant>,
}

impl Sampler {
    pub(crate) fn new(
        engine: Engine,
        config: TelemetryConfig,
        shared: Arc<Shared>,
        gpu: Option<Box<dyn GpuSource>>,
        host: Option<HostSource>,
    ) -> Sampler {
        let now = Instant::now();
        let gpu = gpu.map(|source| Gpu {
            source,
            phase: Phase::Down {
                reason: "not initialised yet".into(),
                retry_at: now,
                backoff: config.retry_initial(),
            },
            warned: None,
            init_spent: Duration::ZERO,
        });
        let host = host.map(|h| {
            let mut base = Map::new();
            base.insert("section".into(), "hosts".into());
            base.insert("window".into(), json!({"status": "ok"}));
            base.insert("name".into(), h.host_name().into());
            base.insert("status".into(), "ok".into());
            (h, base)
        });
        Sampler {
            engine,
            config,
            shared,
            gpu,
            host,
            next_slow: None,
        }
    }

    /// One tick at `now`; returns the time spent initialising the GPU
    /// library in it. Fails only when the engine no longer accepts samples.
    pub(crate) fn tick(&mut self, now: Instant) -> Result<Duration> {
        let mut init = Duration::ZERO;
        let requested = self.shared.take_slow();
        let slow = requested || self.next_slow.is_none_or(|t| now >= t);
        if slow {
            self.next_slow = Some(now + self.config.slow_interval());
        }
        if let Some(gpu) = &mut self.gpu {
            let records = gpu.tick(now, slow, &self.config);
            init = std::mem::take(&mut gpu.init_spent);
            *lock(&self.shared.status) = gpu.status();
            for (name, payload) in records {
                self.publish(name, payload)?;
            }
        }
        if let Some((host, base)) = &mut self.host {
            let s = host.sample(now);
            let mut p = base.clone();
            p.insert("memory_total_bytes".into(), s.memory_total_bytes.into());
            p.insert("swap_total_bytes".into(), s.swap_total_bytes.into());
            let metrics: Map<String, Value> = s
                .metrics
                .into_iter()
                .map(|(k, v)| (k.to_string(), num(v)))
                .collect();
            p.insert("metrics".into(), Value::Object(metrics));
            self.publish(HOST_EVENT.into(), Value::Object(p))?;
        }
        Ok(init)
    }

    fn publish(&self, name: String, payload: Value) -> Result<()> {
        match self.engine.publish_sample(name, payload) {
            Ok(()) => {
                self.shared.samples.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(Error::ShutDown) => Err(Error::ShutDown),
            // Not the sampler's to fix (a bad name cannot happen): count nothing, go on.
            Err(e) => {
                tracing::debug!(target: "spillway::telemetry", "sample not accepted: {e}");
                Ok(())
            }
        }
    }
}

/// The sampler thread's body: tick on the cadence until stopped or the
/// engine shuts down. A late tick does not cause a burst of catch-up ticks.
pub(crate) fn run(mut sampler: Sampler) {
    let shared = sampler.shared.clone();
    let interval = sampler.config.interval();
    let mut next = Instant::now();
    while shared.wait(next) {
        let start = Instant::now();
        let result = sampler.tick(start);
        let spent = start.elapsed();
        let Ok(init) = result else {
            return;
        };
        let add = |counter: &AtomicU64, d: Duration| {
            counter.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        };
        add(&shared.busy_ns, spent.saturating_sub(init));
        add(&shared.init_ns, init);
        shared.ticks.fetch_add(1, Ordering::Relaxed);
        next += interval;
        let now = Instant::now();
        if next <= now {
            next = now + interval;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::config::BatchConfig;
    use crate::telemetry::fake::{FakeDevice, FakeFrame, FakeGpu};
    use std::sync::atomic::AtomicUsize;
    use tracing_subscriber::layer::SubscriberExt;

    /// Counts WARN events whose message contains a needle.
    struct CountWarns {
        needle: &'static str,
        n: Arc<AtomicUsize>,
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountWarns {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Msg(String);
            impl tracing::field::Visit for Msg {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    if f.name() == "message" {
                        self.0 = format!("{v:?}");
                    }
                }
            }
            if *event.metadata().level() == tracing::Level::WARN {
                let mut m = Msg(String::new());
                event.record(&mut m);
                if m.0.contains(self.needle) {
                    self.n.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn config() -> TelemetryConfig {
        TelemetryConfig {
            retry_initial_ms: 1000,
            retry_max_ms: 4000,
            ..TelemetryConfig::default()
        }
    }

    fn sampler(fake: &FakeGpu) -> (Sampler, Arc<Shared>, crate::layer::engine::Guard) {
        let (engine, guard) = Engine::builder(BatchConfig::default())
            .build()
            .expect("engine");
        let shared = Shared::new(GpuStatus::Starting);
        let s = Sampler::new(
            engine,
            config(),
            shared.clone(),
            Some(Box::new(fake.clone())),
            None,
        );
        (s, shared, guard)
    }

    // Catches initialisation retried every tick (hammering a missing
    // driver), backoff that does not double or exceed its cap, and the
    // warning being logged on every retry instead of once.
    #[test]
    fn init_retries_with_backoff_and_warns_once() {
        let fake = FakeGpu::new()
            .fail_init(["driver not loaded"; 4])
            .device(FakeDevice::new(0, "G"));
        let (mut s, shared, _guard) = sampler(&fake);
        let warns = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(CountWarns {
            needle: "unavailable: driver not loaded",
            n: warns.clone(),
        });
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        tracing::subscriber::with_default(subscriber, || {
            // Retries due at 0, +1 s, +3 s (1+2), +7 s (3+4, capped), +11 s (cap 4 s).
            let mut calls = Vec::new();
            for at in [
                0, 500, 999, 1000, 2000, 2999, 3000, 6999, 7000, 10_999, 11_000,
            ] {
                s.tick(t0 + ms(at)).expect("tick");
                calls.push((at, fake.init_calls()));
            }
            assert_eq!(
                calls,
                vec![
                    (0, 1),
                    (500, 1),
                    (999, 1),
                    (1000, 2),
                    (2000, 2),
                    (2999, 2),
                    (3000, 3),
                    (6999, 3),
                    (7000, 4),
                    (10_999, 4),
                    (11_000, 5),
                ]
            );
        });
        assert_eq!(warns.load(Ordering::Relaxed), 1, "one warning per episode");
        assert_eq!(shared.status(), GpuStatus::Ok, "the 5th init succeeds");
    }

    // Catches an unsupported metric being asked again on every sample, and
    // the supported ones being dropped along with it.
    #[test]
    fn unsupported_metric_is_asked_once() {
        let fake = FakeGpu::new().device(
            FakeDevice::new(0, "G")
                .unsupported(Metric::FanSpeed)
                .unsupported(Metric::PcieTx),
        );
        let (mut s, _shared, _guard) = sampler(&fake);
        let t0 = Instant::now();
        for i in 0..10 {
            s.tick(t0 + Duration::from_secs(10 * i)).expect("tick");
        }
        assert_eq!(fake.samples(0), 10);
        assert_eq!(fake.asked(0, Metric::FanSpeed), 1);
        assert_eq!(fake.asked(0, Metric::PcieTx), 1);
        assert_eq!(fake.asked(0, Metric::GpuUtilization), 10);
        assert_eq!(
            fake.asked(0, Metric::PcieRx),
            10,
            "slow metric every 10 s tick"
        );
    }

    // Catches expensive metrics read on every sample instead of the slow
    // cadence, or a request for them being ignored.
    #[test]
    fn slow_metrics_follow_their_cadence_or_a_request() {
        let fake = FakeGpu::new().device(FakeDevice::new(0, "G"));
        let (mut s, shared, _guard) = sampler(&fake);
        let t0 = Instant::now();
        // slow_interval is 5 s: ticks every 250 ms for 10 s -> slow at 0, 5 s.
        for i in 0..40u32 {
            s.tick(t0 + Duration::from_millis(250) * i).expect("tick");
        }
        assert_eq!(fake.asked(0, Metric::GpuUtilization), 40);
        assert_eq!(fake.asked(0, Metric::ComputeProcesses), 2);
        shared.request_slow();
        s.tick(t0 + Duration::from_millis(9_900)).expect("tick");
        assert_eq!(fake.asked(0, Metric::ComputeProcesses), 3);
    }

    // Catches a lost device stopping the others, a lost device being
    // retried every tick, or recovery not clearing the lost state.
    #[test]
    fn lost_device_is_retried_with_backoff_and_comes_back() {
        let ok = FakeFrame::ok([(Metric::GpuUtilization, 5.0)]);
        let fake = FakeGpu::new()
            .device(FakeDevice::new(0, "A").frames([
                ok.clone(),
                FakeFrame::lost("fell off the bus"),
                FakeFrame::lost("fell off the bus"),
                ok.clone(),
            ]))
            .device(FakeDevice::new(1, "B").frames([ok]));
        let (mut s, shared, _guard) = sampler(&fake);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        s.tick(at(0)).expect("tick");
        s.tick(at(250)).expect("tick"); // lost: retry at 1250
        let states = |sh: &Shared| {
            sh.devices()
                .iter()
                .map(|d| d.state.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            states(&shared),
            vec![
                DeviceState::Lost("fell off the bus".into()),
                DeviceState::Ok
            ]
        );
        s.tick(at(500)).expect("tick");
        s.tick(at(1000)).expect("tick");
        assert_eq!(fake.samples(0), 2, "not retried before its backoff");
        assert_eq!(fake.samples(1), 4, "the other device goes on");
        s.tick(at(1250)).expect("tick"); // still lost: next retry 2 s later
        s.tick(at(3000)).expect("tick");
        assert_eq!(fake.samples(0), 3);
        s.tick(at(3250)).expect("tick"); // back
        assert_eq!(fake.samples(0), 4);
        assert_eq!(states(&shared), vec![DeviceState::Ok, DeviceState::Ok]);
    }

    // Catches byte counts published as floats (`1e9` instead of
    // `1000000000`) and fractional values being truncated.
    #[test]
    fn readings_keep_integers_integral() {
        assert_eq!(num(1e9), json!(1_000_000_000u64));
        assert_eq!(num(-3.0), json!(-3));
        assert_eq!(num(12.5), json!(12.5));
        assert_eq!(num(f64::NAN), Value::Null);
    }

    // Catches a wrong energy-to-power conversion, or a counter reset being
    // reported as negative power.
    #[test]
    fn power_from_energy_counter() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(power_from_energy(None, (t1, 100.0)), None);
        assert_eq!(
            power_from_energy(Some((t0, 100.0)), (t1, 175.0)),
            Some(300.0)
        );
        assert_eq!(power_from_energy(Some((t0, 100.0)), (t1, 5.0)), None);
        assert_eq!(power_from_energy(Some((t1, 1.0)), (t0, 2.0)), None);
    }
}
