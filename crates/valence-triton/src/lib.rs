//! valenceclassify's client of NVIDIA Triton Inference Server: `model=triton://HOST:PORT/NAME`
//! runs each window on a server instead of in this process, over the KServe v2 / Open Inference
//! Protocol's gRPC API, as DeepStream's `nvinferserver` does.
//!
//! One [`TritonModel`] (one HTTP/2 connection, multiplexing every request) per server and
//! model is shared by all elements through the same [`InferenceService`] the local models use
//! (windows batched, outcomes handed back per element); Triton's dynamic batcher then merges
//! the requests of every pipeline machine. Every request has a deadline; a lost connection is
//! re-established on the next request (tonic's lazy channel), with back-off while a request is
//! retried.
//!
//! The model served is what `valence export triton` writes: input `samples` [batch, n] FP32,
//! output `probabilities` [batch, labels] FP32. Its metadata is checked when the service starts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use once_cell::sync::Lazy;
use tonic::transport::{Channel, Endpoint};
use valence_model::serving::service::{Backend, BatchConfig, InferenceService, WindowError};

#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};

/// The scheme of remote model addresses.
pub const SCHEME: &str = "triton://";
/// The exported graph's tensor names (`valence export triton`).
pub const INPUT_NAME: &str = "samples";
pub const OUTPUT_NAME: &str = "probabilities";

/// Whether a `model` property value names a Triton server rather than a local model.
pub fn is_remote(spec: &str) -> bool {
    spec.trim().starts_with(SCHEME)
}

/// `triton://HOST:PORT/NAME[/VERSION]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TritonUrl {
    pub host: String,
    pub port: u16,
    pub model: String,
    /// Empty: the server's choice (its version policy).
    pub version: String,
}

impl TritonUrl {
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        let rest = spec
            .strip_prefix(SCHEME)
            .with_context(|| format!("`{spec}` does not start with {SCHEME}"))?;
        let (authority, path) = rest
            .split_once('/')
            .with_context(|| format!("`{spec}`: no model name (triton://HOST:PORT/NAME)"))?;
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>()
                    .with_context(|| format!("`{spec}`: bad port `{p}`"))?,
            ),
            _ => bail!("`{spec}`: give HOST:PORT (Triton's gRPC port, 8001 by default)"),
        };
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let (model, version) = match parts.as_slice() {
            [m] => (m.to_string(), String::new()),
            [m, v] if v.chars().all(|c| c.is_ascii_digit()) => (m.to_string(), v.to_string()),
            _ => bail!("`{spec}`: expected triton://HOST:PORT/NAME or .../NAME/VERSION"),
        };
        Ok(Self {
            host: host.to_string(),
            port,
            model,
            version,
        })
    }

    fn endpoint(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for TritonUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}:{}/{}", self.host, self.port, self.model)?;
        if !self.version.is_empty() {
            write!(f, "/{}", self.version)?;
        }
        Ok(())
    }
}

/// Deadlines and retries.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Establishing the connection.
    pub connect: Duration,
    /// Each request, from sending to the whole answer.
    pub request: Duration,
    /// How long a batch is retried (with back-off) while the server is unreachable, before
    /// its windows fail. Once a batch has failed so, later batches try once until one succeeds
    /// (live streams do not queue behind a dead server).
    pub retry_for: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(10),
            retry_for: Duration::from_secs(3),
        }
    }
}

/// One process-wide runtime for every connection: two threads drive all of the HTTP/2 I/O.
static RUNTIME: Lazy<tokio::runtime::Runtime> = Lazy::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("valence-triton")
        .enable_all()
        .build()
        .expect("cannot start the Triton client's runtime")
});

/// Runs `f` on the client's runtime and waits for it. Called from a thread of an application's
/// own tokio runtime (an app that sets pipeline states from async code), blocking there would
/// panic, so the wait moves to a scoped thread.
fn block_on<F>(f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(|| RUNTIME.block_on(f))
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    } else {
        RUNTIME.block_on(f)
    }
}

/// Counters of the server's own statistics for one model (Triton's statistics extension).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStatistics {
    /// Requests' batch rows (windows) the model ran.
    pub inferences: u64,
    /// Model executions (batches the dynamic batcher formed).
    pub executions: u64,
}

impl ServerStatistics {
    /// Mean batch size over what happened between `before` and `self`.
    pub fn mean_batch_since(&self, before: &ServerStatistics) -> Option<f64> {
        let runs = self.executions.checked_sub(before.executions)?;
        let rows = self.inferences.checked_sub(before.inferences)?;
        (runs > 0).then(|| rows as f64 / runs as f64)
    }
}

/// A model on a Triton server.
pub struct TritonModel {
    url: TritonUrl,
    labels: Vec<String>,
    client: GrpcInferenceServiceClient<Channel>,
    timeouts: Timeouts,
    /// Since when the server has been unreachable (None: it answered last time).
    down_since: Mutex<Option<Instant>>,
}

/// Whether a failed call says the server could not be reached (worth retrying), rather than
/// that the request was refused.
fn is_unavailable(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Aborted
    )
}

impl TritonModel {
    /// Connects and checks the server and the model: live, ready, and with one FP32 input of
    /// rank 2 (batch, samples) and one FP32 output [batch, 3]. Errors name the URL.
    pub fn connect(url: &TritonUrl, timeouts: Timeouts) -> Result<Self> {
        let _guard = RUNTIME.enter();
        let channel = Endpoint::from_shared(url.endpoint())
            .with_context(|| format!("{url}: not a usable address"))?
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.request)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let client = GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(256 << 20);
        let mut model = Self {
            url: url.clone(),
            labels: Vec::new(),
            client,
            timeouts,
            down_since: Mutex::new(None),
        };
        model.check()?;
        Ok(model)
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.set_timeout(self.timeouts.request);
        r
    }

    fn check(&mut self) -> Result<()> {
        let url = self.url.clone();
        let mut client = self.client.clone();
        let (ready, metadata) = block_on(async {
            let ready = client
                .server_ready(self.request(proto::ServerReadyRequest {}))
                .await
                .map_err(|s| anyhow::anyhow!("{url}: server not reachable: {}", s.message()))?
                .into_inner()
                .ready;
            if !ready {
                bail!("{url}: the server is up but not ready");
            }
            let model_ready = client
                .model_ready(self.request(proto::ModelReadyRequest {
                    name: url.model.clone(),
                    version: url.version.clone(),
                }))
                .await
                .map(|r| r.into_inner().ready)
                .unwrap_or(false);
            let metadata = client
                .model_metadata(self.request(proto::ModelMetadataRequest {
                    name: url.model.clone(),
                    version: url.version.clone(),
                }))
                .await;
            Ok((model_ready, metadata))
        })?;
        let metadata = match metadata {
            Ok(m) => m.into_inner(),
            Err(s) => bail!(
                "{url}: the server has no model `{}`{} ({})",
                url.model,
                if url.version.is_empty() {
                    String::new()
                } else {
                    format!(" version {}", url.version)
                },
                s.message()
            ),
        };
        if !ready {
            bail!("{url}: model `{}` is not ready", url.model);
        }
        let labels = check_metadata(&metadata).with_context(|| {
            format!(
                "{url}: model `{}` does not take what valenceclassify sends (export it with \
                 `valence export triton`)",
                url.model
            )
        })?;
        self.labels = labels;
        Ok(())
    }

    pub fn url(&self) -> &TritonUrl {
        &self.url
    }

    /// Runs windows of one length as one request.
    fn infer_once(&self, windows: &[&[f32]]) -> Result<Vec<Vec<f32>>, tonic::Status> {
        let len = windows[0].len();
        let mut raw = Vec::with_capacity(windows.len() * len * 4);
        for w in windows {
            for v in w.iter() {
                raw.extend_from_slice(&v.to_le_bytes());
            }
        }
        let request = proto::ModelInferRequest {
            model_name: self.url.model.clone(),
            model_version: self.url.version.clone(),
            inputs: vec![InferInputTensor {
                name: INPUT_NAME.into(),
                datatype: "FP32".into(),
                shape: vec![windows.len() as i64, len as i64],
                ..Default::default()
            }],
            outputs: vec![InferRequestedOutputTensor {
                name: OUTPUT_NAME.into(),
                ..Default::default()
            }],
            raw_input_contents: vec![raw],
            ..Default::default()
        };
        let mut client = self.client.clone();
        let response = block_on(client.model_infer(self.request(request)))?.into_inner();
        parse_probabilities(&response, windows.len(), self.labels.len())
            .map_err(|e| tonic::Status::internal(format!("{e:#}")))
    }

    /// `Self::infer_once` with retries while the server is unreachable (see
    /// [`Timeouts::retry_for`]).
    pub fn infer(&self, windows: &[&[f32]]) -> Result<Vec<Vec<f32>>, WindowError> {
        let started = Instant::now();
        let already_down = self.lock_down().is_some();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.infer_once(windows) {
                Ok(p) => {
                    *self.lock_down() = None;
                    return Ok(p);
                }
                Err(s) if is_unavailable(&s) => {
                    if already_down || started.elapsed() + backoff > self.timeouts.retry_for {
                        self.lock_down().get_or_insert(started);
                        return Err(WindowError {
                            message: format!("{}: server unreachable: {}", self.url, s.message()),
                            unavailable: true,
                        });
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(s) => {
                    return Err(WindowError::window(format!(
                        "{}: {:?}: {}",
                        self.url,
                        s.code(),
                        s.message()
                    )));
                }
            }
        }
    }

    fn lock_down(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.down_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server's counters for this model (Triton's statistics extension).
    pub fn statistics(&self) -> Result<ServerStatistics> {
        let mut client = self.client.clone();
        let response = block_on(client.model_statistics(self.request(
            proto::ModelStatisticsRequest {
                name: self.url.model.clone(),
                version: self.url.version.clone(),
            },
        )))
        .map_err(|s| anyhow::anyhow!("{}: statistics: {}", self.url, s.message()))?
        .into_inner();
        Ok(response
            .model_stats
            .iter()
            .fold(ServerStatistics::default(), |acc, m| ServerStatistics {
                inferences: acc.inferences + m.inference_count,
                executions: acc.executions + m.execution_count,
            }))
    }
}

/// Checks a model's metadata against the exported graph and returns its labels.
fn check_metadata(m: &proto::ModelMetadataResponse) -> Result<Vec<String>> {
    let [input] = m.inputs.as_slice() else {
        bail!("it has {} inputs, not one", m.inputs.len());
    };
    let [output] = m.outputs.as_slice() else {
        bail!("it has {} outputs, not one", m.outputs.len());
    };
    if input.name != INPUT_NAME || input.datatype != "FP32" || input.shape.len() != 2 {
        bail!(
            "its input is `{}` {} {:?}, not `{INPUT_NAME}` FP32 [batch, samples]",
            input.name,
            input.datatype,
            input.shape
        );
    }
    let labels = valence_model::LABELS.len() as i64;
    if output.name != OUTPUT_NAME
        || output.datatype != "FP32"
        || output.shape.len() != 2
        || output.shape[1] != labels
    {
        bail!(
            "its output is `{}` {} {:?}, not `{OUTPUT_NAME}` FP32 [batch, {labels}]",
            output.name,
            output.datatype,
            output.shape
        );
    }
    Ok(valence_model::LABELS
        .iter()
        .map(|s| s.to_string())
        .collect())
}

/// The probabilities of a response: `rows` rows of `labels` FP32 values, raw or typed.
fn parse_probabilities(
    r: &proto::ModelInferResponse,
    rows: usize,
    labels: usize,
) -> Result<Vec<Vec<f32>>> {
    let idx = r
        .outputs
        .iter()
        .position(|o| o.name == OUTPUT_NAME)
        .with_context(|| format!("the response has no `{OUTPUT_NAME}`"))?;
    let out = &r.outputs[idx];
    if out.datatype != "FP32" || out.shape != [rows as i64, labels as i64] {
        bail!(
            "`{OUTPUT_NAME}` is {} {:?}, expected FP32 [{rows}, {labels}]",
            out.datatype,
            out.shape
        );
    }
    let values: Vec<f32> = match r.raw_output_contents.get(idx) {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        None => out
            .contents
            .as_ref()
            .map(|c| c.fp32_contents.clone())
            .unwrap_or_default(),
    };
    if values.len() != rows * labels {
        bail!("{} values for [{rows}, {labels}]", values.len());
    }
    Ok(values.chunks(labels).map(|c| c.to_vec()).collect())
}

impl Backend for TritonModel {
    fn name(&self) -> &str {
        &self.url.model
    }

    fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The exported front end pads by reflection 200 samples each side, which needs more than
    /// 200; Whisper needs two frames (320 samples).
    fn min_samples(&self) -> usize {
        320
    }

    /// Windows of one length go in one request (a server's batch holds one shape); each group
    /// succeeds or fails as a whole.
    fn classify_batch(&self, windows: &[&[f32]]) -> Vec<Result<Vec<f32>, WindowError>> {
        let mut outcomes: Vec<Option<Result<Vec<f32>, WindowError>>> = vec![None; windows.len()];
        for members in valence_model::groups_by_length(windows) {
            let group: Vec<&[f32]> = members.iter().map(|&i| windows[i]).collect();
            match self.infer(&group) {
                Ok(rows) => {
                    for (&i, p) in members.iter().zip(rows) {
                        outcomes[i] = Some(Ok(p));
                    }
                }
                Err(e) => {
                    for &i in &members {
                        outcomes[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(WindowError::window("window not sent"))))
            .collect()
    }

    fn describe(&self) -> String {
        format!("{} (Triton Inference Server, gRPC)", self.url)
    }

    /// Requests in flight at once: the server batches across them, and a request spends most
    /// of its time waiting on the network and the server's queue.
    fn concurrency(&self) -> usize {
        8
    }
}

type ServiceKey = (TritonUrl, String);
static SERVICES: Lazy<Mutex<HashMap<ServiceKey, Weak<InferenceService>>>> =
    Lazy::new(Default::default);

/// The inference service for a model on a Triton server, shared by every element in the process
/// that names the same URL and `instance` id (one connection; the first caller's `config`
/// starts it). Connecting and checking the model happens here, not on a streaming thread.
pub fn shared_service(
    spec: &str,
    instance: &str,
    config: BatchConfig,
) -> Result<Arc<InferenceService>> {
    let url = TritonUrl::parse(spec)?;
    let key = (url.clone(), instance.to_string());
    if let Some(s) = lock_services().get(&key).and_then(|s| s.upgrade()) {
        return Ok(s);
    }
    // Connect without the registry lock: a dead server must not stall other elements.
    let model = Arc::new(TritonModel::connect(&url, Timeouts::default())?);
    let mut services = lock_services();
    services.retain(|_, s| s.strong_count() > 0);
    if let Some(s) = services.get(&key).and_then(|s| s.upgrade()) {
        return Ok(s);
    }
    let service = InferenceService::start(model, config)?;
    services.insert(key, Arc::downgrade(&service));
    Ok(service)
}

fn lock_services() -> std::sync::MutexGuard<'static, HashMap<ServiceKey, Weak<InferenceService>>> {
    SERVICES.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_print() {
        let u = TritonUrl::parse("triton://gpu-pool.example:8001/valence").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.model.as_str(),
                u.version.as_str()
            ),
            ("gpu-pool.example", 8001, "valence", "")
        );
        assert_eq!(u.to_string(), "triton://gpu-pool.example:8001/valence");
        assert_eq!(u.endpoint(), "http://gpu-pool.example:8001");
        let v = TritonUrl::parse(" triton://127.0.0.1:9001/m/3 ").unwrap();
        assert_eq!((v.model.as_str(), v.version.as_str()), ("m", "3"));
        assert_eq!(v.to_string(), "triton://127.0.0.1:9001/m/3");
        let six = TritonUrl::parse("triton://[::1]:8001/m").unwrap();
        assert_eq!(six.endpoint(), "http://[::1]:8001");
        for bad in [
            "triton://host/m",
            "triton://host:port/m",
            "triton://host:8001",
            "triton://host:8001/",
            "triton://host:8001/m/v1",
            "http://host:8001/m",
        ] {
            assert!(TritonUrl::parse(bad).is_err(), "{bad} parsed");
        }
        assert!(is_remote("triton://h:1/m") && !is_remote("default"));
    }

    fn tensor(
        name: &str,
        datatype: &str,
        shape: &[i64],
    ) -> proto::model_metadata_response::TensorMetadata {
        proto::model_metadata_response::TensorMetadata {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn metadata_must_match_the_exported_graph() {
        let good = proto::ModelMetadataResponse {
            inputs: vec![tensor(INPUT_NAME, "FP32", &[-1, -1])],
            outputs: vec![tensor(OUTPUT_NAME, "FP32", &[-1, 3])],
            ..Default::default()
        };
        assert_eq!(check_metadata(&good).unwrap().len(), 3);
        let mut wrong_output = good.clone();
        wrong_output.outputs = vec![tensor("logits", "FP32", &[-1, 1000])];
        let e = check_metadata(&wrong_output).unwrap_err().to_string();
        assert!(e.contains("logits") && e.contains("1000"), "{e}");
        let mut wrong_input = good.clone();
        wrong_input.inputs = vec![tensor(INPUT_NAME, "INT16", &[-1, -1])];
        assert!(check_metadata(&wrong_input).is_err());
        let mut two = good.clone();
        two.inputs.push(tensor("x", "FP32", &[-1]));
        assert!(check_metadata(&two).is_err());
    }

    #[test]
    fn responses_raw_and_typed() {
        let probs = [0.1f32, 0.2, 0.7, 0.3, 0.3, 0.4];
        let out = proto::model_infer_response::InferOutputTensor {
            name: OUTPUT_NAME.into(),
            datatype: "FP32".into(),
            shape: vec![2, 3],
            ..Default::default()
        };
        let raw = proto::ModelInferResponse {
            outputs: vec![out.clone()],
            raw_output_contents: vec![probs.iter().flat_map(|v| v.to_le_bytes()).collect()],
            ..Default::default()
        };
        let rows = parse_probabilities(&raw, 2, 3).unwrap();
        assert_eq!(rows, vec![vec![0.1, 0.2, 0.7], vec![0.3, 0.3, 0.4]]);
        let mut typed_out = out.clone();
        typed_out.contents = Some(proto::InferTensorContents {
            fp32_contents: probs.to_vec(),
            ..Default::default()
        });
        let typed = proto::ModelInferResponse {
            outputs: vec![typed_out],
            ..Default::default()
        };
        assert_eq!(parse_probabilities(&typed, 2, 3).unwrap(), rows);
        assert!(
            parse_probabilities(&raw, 3, 3).is_err(),
            "row count checked"
        );
    }

    #[test]
    fn server_statistics_give_the_mean_batch() {
        let before = ServerStatistics {
            inferences: 10,
            executions: 5,
        };
        let after = ServerStatistics {
            inferences: 74,
            executions: 13,
        };
        assert_eq!(after.mean_batch_since(&before), Some(8.0));
        assert_eq!(before.mean_batch_since(&before), None);
    }

    /// Called from inside an application's tokio runtime, the client waits on its own.
    #[test]
    fn blocking_calls_work_from_inside_another_runtime() {
        let app = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let v = app.block_on(async { block_on(async { 41 + 1 }) });
        assert_eq!(v, 42);
    }

    /// Nothing listens on the port: connecting fails at once with the URL in the message.
    #[test]
    fn an_unreachable_server_is_an_error_naming_the_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(); // bound and released: nothing listens there now
        let url = TritonUrl::parse(&format!("triton://127.0.0.1:{port}/valence")).unwrap();
        let t0 = Instant::now();
        let err = TritonModel::connect(&url, Timeouts::default())
            .err()
            .expect("connected to nothing")
            .to_string();
        assert!(
            err.contains(&url.to_string()) && err.contains("not reachable"),
            "{err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
