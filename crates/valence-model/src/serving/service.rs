//! One inference service per shared model: dispatch threads (one per core, at most 4) that
//! collect windows from every client (every element using the model), run them as batches
//! through a [`Backend`] (a [`ValenceModel`] in this process, or a remote inference server),
//! and hand each outcome back to the client that sent it.
//!
//! A batch is dispatched when it is full (`max_batch`) or when its oldest window has waited
//! `timeout`, as DeepStream's `batched-push-timeout` does. A service with a single client never
//! waits: nobody else could fill the batch. Windows of one length share a batch; others wait for
//! the next one, so batching never changes a result.
//!
//! Windows may carry a speech gate ([`SpeechGate`]): the dispatch thread runs the stream's
//! speech detector over its queued audio first, and a window with too little speech comes back
//! without going to the model (for a remote model too: it is never sent).
//!
//! Locks: the queue and each client's inbox are separate mutexes, never held together and never
//! held while the model runs. Clients wait on their inbox's condvar (which releases the mutex).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::ValenceModel;
use crate::speech::{SileroVad, SpeechGate};

/// When the dispatch loop runs a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// The most windows run at once (1: no batching).
    pub max_batch: usize,
    /// The longest the oldest queued window waits for others before its batch runs.
    pub timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            timeout: Duration::ZERO,
        }
    }
}

/// Why a window has no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowError {
    pub message: String,
    /// The backend itself could not be reached (a remote server lost, after retries), as
    /// opposed to this window being unfit for the model: callers may treat it as an outage.
    pub unavailable: bool,
}

impl std::fmt::Display for WindowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl WindowError {
    pub fn window(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            unavailable: false,
        }
    }
}

/// What a service runs windows on.
pub trait Backend: Send + Sync + 'static {
    /// The model's name, for messages.
    fn name(&self) -> &str;
    /// Class names, in the order of the probabilities.
    fn labels(&self) -> &[String];
    /// Shortest window (16 kHz samples) the model accepts.
    fn min_samples(&self) -> usize;
    /// One outcome per window, in order; windows may have different lengths.
    fn classify_batch(&self, windows: &[&[f32]]) -> Vec<Result<Vec<f32>, WindowError>>;
    /// Where and how it runs (device, weight format, server), for logs and benchmarks.
    fn describe(&self) -> String;
    /// How many batches may run at once.
    fn concurrency(&self) -> usize {
        dispatch_threads()
    }
    /// The speech detector that gates this model's windows, if it names one.
    fn speech_detector(&self) -> Option<Arc<SileroVad>> {
        None
    }
}

impl Backend for ValenceModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn labels(&self) -> &[String] {
        &self.labels
    }

    fn min_samples(&self) -> usize {
        self.encoder.min_samples()
    }

    fn speech_detector(&self) -> Option<Arc<SileroVad>> {
        self.speech_detector.clone()
    }

    fn classify_batch(&self, windows: &[&[f32]]) -> Vec<Result<Vec<f32>, WindowError>> {
        ValenceModel::classify_batch(self, windows)
            .into_iter()
            .map(|r| {
                r.map(|p| p.probabilities)
                    .map_err(|e| WindowError::window(format!("{e:#}")))
            })
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "{} on {}, encoder weights {}",
            self.name,
            crate::device_name(&self.device),
            self.encoder_weights
        )
    }
}

/// One window's outcome as a client receives it.
#[derive(Debug, Clone)]
pub struct Completed {
    /// The tag the client gave at submission.
    pub tag: u64,
    /// Probabilities in the model's label order; None when the speech gate kept the window
    /// from the model (too little speech); or why the window was not classified.
    pub outcome: Result<Option<Vec<f32>>, WindowError>,
    /// The share of the window's frames the speech detector called speech (gated windows).
    pub speech: Option<f32>,
    /// How many windows ran in the batch this one ran in.
    pub batch_size: usize,
    /// The batch's model time divided by its size: this window's share.
    pub model_time: Duration,
}

struct Request {
    client: Arc<ClientShared>,
    generation: u64,
    tag: u64,
    samples: Vec<f32>,
    gate: Option<SpeechGate>,
    queued_at: Instant,
}

#[derive(Default)]
struct Queue {
    requests: VecDeque<Request>,
    shutdown: bool,
}

struct ServiceShared {
    queue: Mutex<Queue>,
    wake: Condvar,
    config: BatchConfig,
    clients: AtomicUsize,
}

/// How many batches of one service run at once: one per core, at most 4. One model run at a
/// time left a core idle on the f32 path (a 150-row product does not keep both cores of a
/// 2-core machine busy): 20 live streams held with a thread per element and skipped 15 %
/// with a single dispatch thread there.
/// `VALENCE_DISPATCH_THREADS` overrides it (for measuring).
fn dispatch_threads() -> usize {
    if let Some(n) = std::env::var("VALENCE_DISPATCH_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return n.clamp(1, 64);
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The dispatch loop of one model; shared by its clients through an `Arc`. Dropping the last
/// `Arc` ends the loop after the batch it is running, without waiting for it.
pub struct InferenceService {
    shared: Arc<ServiceShared>,
    backend: Arc<dyn Backend>,
}

impl InferenceService {
    pub fn start(backend: Arc<dyn Backend>, config: BatchConfig) -> std::io::Result<Arc<Self>> {
        let config = BatchConfig {
            max_batch: config.max_batch.max(1),
            timeout: config.timeout,
        };
        let shared = Arc::new(ServiceShared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            config,
            clients: AtomicUsize::new(0),
        });
        for _ in 0..backend.concurrency().max(1) {
            let (s, b) = (shared.clone(), backend.clone());
            std::thread::Builder::new()
                .name("valence-service".into())
                .spawn(move || dispatch_loop(&s, b.as_ref()))?;
        }
        Ok(Arc::new(Self { shared, backend }))
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Whether this service runs on `backend` (the same object, not an equal one).
    pub fn runs_on(&self, backend: &Arc<dyn Backend>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.backend), Arc::as_ptr(backend))
    }

    pub fn config(&self) -> BatchConfig {
        self.shared.config
    }

    /// A new client: a caller (one element) with its own inbox.
    pub fn client(self: &Arc<Self>) -> Client {
        self.shared.clients.fetch_add(1, Ordering::Relaxed);
        Client {
            service: self.clone(),
            shared: Arc::new(ClientShared {
                inbox: Mutex::new(Inbox::default()),
                ready: Condvar::new(),
            }),
        }
    }
}

impl Drop for InferenceService {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.wake.notify_all();
    }
}

/// Takes the next batch: the oldest request and up to `max_batch - 1` more of its length, in
/// queue order. Waits (releasing the lock) until there is work, and, when several clients share
/// the service, until the batch is full or its oldest request has waited `timeout`.
fn next_batch(shared: &ServiceShared) -> Option<Vec<Request>> {
    let config = shared.config;
    let mut q = lock(&shared.queue);
    loop {
        if q.shutdown {
            return None;
        }
        let Some(oldest) = q.requests.front() else {
            q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let len = oldest.samples.len();
        let deadline = oldest.queued_at + config.timeout;
        let same_len = q.requests.iter().filter(|r| r.samples.len() == len).count();
        let now = Instant::now();
        let lone_client = shared.clients.load(Ordering::Relaxed) <= 1;
        if same_len >= config.max_batch || now >= deadline || lone_client {
            let mut batch = Vec::with_capacity(same_len.min(config.max_batch));
            let mut rest = VecDeque::with_capacity(q.requests.len());
            for r in q.requests.drain(..) {
                if batch.len() < config.max_batch && r.samples.len() == len {
                    batch.push(r);
                } else {
                    rest.push_back(r);
                }
            }
            q.requests = rest;
            return Some(batch);
        }
        q = shared
            .wake
            .wait_timeout(q, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Runs the speech gate of every gated window in a batch (the detector catches up on each
/// stream's queued audio here, off the streaming threads); windows with too little speech are
/// delivered at once, the rest returned with their shares.
fn gate(batch: Vec<Request>) -> Vec<(Request, Option<f32>)> {
    let mut keep = Vec::with_capacity(batch.len());
    for req in batch {
        let Some(g) = &req.gate else {
            keep.push((req, None));
            continue;
        };
        let judged =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| g.judge(req.samples.len())));
        let (outcome, speech) = match judged {
            Ok((share, true)) => {
                keep.push((req, share));
                continue;
            }
            Ok((share, false)) => (Ok(None), share),
            Err(_) => (
                Err(WindowError::window("the speech detector panicked")),
                None,
            ),
        };
        req.client.deliver(
            req.generation,
            Completed {
                tag: req.tag,
                outcome,
                speech,
                batch_size: 0,
                model_time: Duration::ZERO,
            },
        );
    }
    keep
}

fn dispatch_loop(shared: &ServiceShared, backend: &dyn Backend) {
    while let Some(batch) = next_batch(shared) {
        let batch = gate(batch);
        if batch.is_empty() {
            continue;
        }
        let t0 = Instant::now();
        let inputs: Vec<&[f32]> = batch.iter().map(|(r, _)| r.samples.as_slice()).collect();
        let outcomes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            backend.classify_batch(&inputs)
        }));
        let n = batch.len();
        let share = t0.elapsed() / n as u32;
        let outcomes = match outcomes {
            Ok(o) if o.len() == n => o,
            Ok(o) => vec![
                Err(WindowError::window(format!(
                    "the backend gave {} outcomes for {n} windows",
                    o.len()
                )));
                n
            ],
            Err(_) => vec![Err(WindowError::window("inference panicked")); n],
        };
        for ((req, speech), outcome) in batch.into_iter().zip(outcomes) {
            req.client.deliver(
                req.generation,
                Completed {
                    tag: req.tag,
                    outcome: outcome.map(Some),
                    speech,
                    batch_size: n,
                    model_time: share,
                },
            );
        }
    }
}

#[derive(Default)]
struct Inbox {
    /// Bumped by [`Client::cancel`]: outcomes of older submissions are dropped on arrival.
    generation: u64,
    /// Submitted in this generation and not yet delivered.
    outstanding: usize,
    done: Vec<Completed>,
}

struct ClientShared {
    inbox: Mutex<Inbox>,
    ready: Condvar,
}

impl ClientShared {
    fn deliver(&self, generation: u64, c: Completed) {
        let mut inbox = lock(&self.inbox);
        if inbox.generation == generation {
            inbox.outstanding = inbox.outstanding.saturating_sub(1);
            inbox.done.push(c);
            drop(inbox);
            self.ready.notify_all();
        }
    }
}

/// Why [`Client::wait_idle`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Everything submitted in the generation waited for has an outcome.
    Idle,
    /// The client was cancelled (a flush) meanwhile.
    Cancelled,
}

/// One caller's connection to a service. Dropping it cancels its queued windows.
pub struct Client {
    service: Arc<InferenceService>,
    shared: Arc<ClientShared>,
}

impl Client {
    /// The current generation (see [`Self::cancel`]).
    pub fn generation(&self) -> u64 {
        lock(&self.shared.inbox).generation
    }

    /// Windows submitted and not yet delivered.
    pub fn outstanding(&self) -> usize {
        lock(&self.shared.inbox).outstanding
    }

    /// Queues one window; its outcome arrives in this client's inbox with `tag`.
    pub fn submit(&self, tag: u64, samples: Vec<f32>) {
        self.submit_gated(tag, samples, None);
    }

    /// Queues one window that the speech gate judges before the model sees it (where the
    /// model runs, never on the caller's thread).
    pub fn submit_gated(&self, tag: u64, samples: Vec<f32>, gate: Option<SpeechGate>) {
        let generation = {
            let mut inbox = lock(&self.shared.inbox);
            inbox.outstanding += 1;
            inbox.generation
        };
        let svc = &self.service.shared;
        lock(&svc.queue).requests.push_back(Request {
            client: self.shared.clone(),
            generation,
            tag,
            samples,
            gate,
            queued_at: Instant::now(),
        });
        svc.wake.notify_all();
    }

    /// Outcomes delivered since the last call, in delivery order.
    pub fn take_done(&self) -> Vec<Completed> {
        std::mem::take(&mut lock(&self.shared.inbox).done)
    }

    /// Blocks until every window submitted in `generation` has an outcome, or the client is
    /// cancelled. Holds no lock while waiting (the condvar releases the inbox).
    pub fn wait_idle(&self, generation: u64) -> Wait {
        let mut inbox = lock(&self.shared.inbox);
        loop {
            if inbox.generation != generation {
                return Wait::Cancelled;
            }
            if inbox.outstanding == 0 {
                return Wait::Idle;
            }
            inbox = self
                .shared
                .ready
                .wait(inbox)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Forgets everything submitted so far: queued windows leave the service's queue, outcomes
    /// of windows already running are dropped when they arrive, and a waiter returns at once.
    pub fn cancel(&self) {
        let svc = &self.service.shared;
        lock(&svc.queue)
            .requests
            .retain(|r| !Arc::ptr_eq(&r.client, &self.shared));
        let mut inbox = lock(&self.shared.inbox);
        inbox.generation += 1;
        inbox.outstanding = 0;
        inbox.done.clear();
        drop(inbox);
        self.shared.ready.notify_all();
        // The dispatcher may be waiting for a batch this client was part of.
        svc.wake.notify_all();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.cancel();
        self.service.shared.clients.fetch_sub(1, Ordering::Relaxed);
        self.service.shared.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tiny_model(seed: u64) -> Arc<ValenceModel> {
        let dir =
            std::env::temp_dir().join(format!("valence-service-{}-{seed}", std::process::id()));
        crate::synthetic::write_tiny_model(&dir, seed).unwrap();
        let m = Arc::new(ValenceModel::load(&dir, &Device::Cpu).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        m
    }

    fn signal(seed: u64, n: usize) -> Vec<f32> {
        let mut rng = crate::rng::SeededNormal::new(seed);
        (0..n).map(|_| rng.sample() * 0.1).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Batched windows of mixed lengths give what each gives alone (nine of one length: the
    /// log-mels of a large batch are computed on several threads).
    #[test]
    fn classify_batch_matches_one_at_a_time() {
        let model = tiny_model(31);
        let mut lengths = vec![16000, 48000, 16000, 16000, 30000, 48000, 100];
        lengths.extend([16000; 6]);
        let windows: Vec<Vec<f32>> = lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| signal(i as u64, n))
            .collect();
        let refs: Vec<&[f32]> = windows.iter().map(|w| w.as_slice()).collect();
        let batched = model.classify_batch(&refs);
        for (w, b) in windows.iter().zip(&batched) {
            match (model.classify(w), b) {
                (Ok(single), Ok(b)) => {
                    let d = max_diff(&single.probabilities, &b.probabilities);
                    assert!(d <= 1e-5, "{} samples: batched differs by {d}", w.len());
                }
                (Err(_), Err(_)) => {} // too short alone and in a batch
                (s, b) => panic!("{} samples: alone {s:?}, batched {b:?}", w.len()),
            }
        }
        assert!(batched[6].is_err(), "100 samples are too short for Whisper");
    }

    /// Many clients at once: every outcome reaches its own client, equal to batch 1, and the
    /// service does batch when clients submit together.
    #[test]
    fn clients_get_their_own_results_and_windows_are_batched() {
        let model = tiny_model(32);
        let service = InferenceService::start(
            model.clone() as Arc<dyn Backend>,
            BatchConfig {
                max_batch: 4,
                timeout: Duration::from_millis(200),
            },
        )
        .unwrap();
        let clients: Vec<Client> = (0..6).map(|_| service.client()).collect();
        for (c, client) in clients.iter().enumerate() {
            for k in 0..3u64 {
                client.submit(k, signal(100 * c as u64 + k, 16000));
            }
        }
        let mut biggest = 0;
        for (c, client) in clients.iter().enumerate() {
            let g = client.generation();
            assert_eq!(client.wait_idle(g), Wait::Idle);
            let mut done = client.take_done();
            done.sort_by_key(|d| d.tag);
            assert_eq!(done.len(), 3);
            for d in done {
                let want = model
                    .classify(&signal(100 * c as u64 + d.tag, 16000))
                    .unwrap();
                let got = d.outcome.unwrap().unwrap();
                assert!(max_diff(&want.probabilities, &got) <= 1e-5);
                assert!(d.batch_size <= 4);
                biggest = biggest.max(d.batch_size);
            }
        }
        assert_eq!(
            biggest, 4,
            "18 windows queued together must fill batches of 4"
        );
    }

    /// `max_batch` 1 never batches; a cancelled client's queued windows never run and a waiter
    /// returns at once.
    #[test]
    fn batch_size_one_and_cancel() {
        let model = tiny_model(33);
        let service = InferenceService::start(
            model as Arc<dyn Backend>,
            BatchConfig {
                max_batch: 1,
                timeout: Duration::from_secs(10),
            },
        )
        .unwrap();
        let a = service.client();
        let b = service.client();
        for k in 0..4 {
            a.submit(k, signal(k, 16000));
        }
        assert_eq!(a.wait_idle(a.generation()), Wait::Idle);
        assert!(a.take_done().iter().all(|d| d.batch_size == 1));

        for k in 0..50 {
            b.submit(k, signal(k, 48000));
        }
        let g = b.generation();
        let waiter = std::thread::scope(|s| {
            let h = s.spawn(|| b.wait_idle(g));
            std::thread::sleep(Duration::from_millis(20));
            b.cancel();
            h.join().unwrap()
        });
        assert_eq!(waiter, Wait::Cancelled);
        assert_eq!(b.outstanding(), 0);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            b.take_done().is_empty(),
            "outcomes from before the cancel are dropped"
        );
        // The service still serves the client after a cancel.
        b.submit(99, signal(9, 16000));
        assert_eq!(b.wait_idle(b.generation()), Wait::Idle);
        assert_eq!(b.take_done()[0].tag, 99);
    }
}
