//! A Triton Inference Server on loopback for benchmarks and tests: PyTriton's `tritonserver`
//! serving an exported model through `scripts/triton_serve.py` (carried in the binary, so an
//! installed `valence` needs no checkout). Production runs Triton's own ONNX Runtime or TensorRT
//! backend on the same repository instead (README.md, "Triton Inference Server").

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use valence_triton::{Timeouts, TritonModel, TritonUrl};

const SCRIPT: &str = include_str!("../../../scripts/triton_serve.py");

/// A free TCP port on loopback (bound and released: free now, not reserved).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The server process (Python and the `tritonserver` it starts, in their own process group,
/// killed together when this is dropped).
pub struct LocalTriton {
    child: Option<Child>,
    python: String,
    repo: PathBuf,
    name: String,
    pub grpc_port: u16,
    log: PathBuf,
}

impl LocalTriton {
    /// Starts serving `repo/name` with `python` (one with nvidia-pytriton and onnxruntime:
    /// `scripts/triton-venv.sh`) and waits until the model answers.
    pub fn start(python: &str, repo: &Path, name: &str, grpc_port: u16) -> Result<Self> {
        let mut s = Self {
            child: None,
            python: python.into(),
            repo: repo.into(),
            name: name.into(),
            grpc_port,
            log: repo.join(format!("triton-{grpc_port}.log")),
        };
        s.spawn()?;
        Ok(s)
    }

    pub fn url(&self, model: &str) -> String {
        format!("triton://127.0.0.1:{}/{model}", self.grpc_port)
    }

    /// Starts the server (again, after [`Self::kill`]) on the same port and waits until ready.
    pub fn spawn(&mut self) -> Result<()> {
        let script = self.repo.join("triton_serve.py");
        std::fs::write(&script, SCRIPT)?;
        let log = std::fs::File::create(&self.log)?;
        let child = Command::new(&self.python)
            .arg(&script)
            .arg("--repo")
            .arg(&self.repo)
            .args(["--name", &self.name])
            .args(["--grpc-port", &self.grpc_port.to_string()])
            .args(["--http-port", &free_port()?.to_string()])
            .args(["--metrics-port", &free_port()?.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start Triton with {}", self.python))?;
        self.child = Some(child);
        let url = TritonUrl::parse(&self.url(&self.name))?;
        let t0 = Instant::now();
        loop {
            if TritonModel::connect(&url, Timeouts::default()).is_ok() {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if exited.is_some() || t0.elapsed() > Duration::from_secs(120) {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                self.kill();
                bail!(
                    "Triton did not become ready ({exited:?}); its log ends:\n{}",
                    log.lines()
                        .rev()
                        .take(15)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Kills the server at once (SIGKILL to its process group), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the process group of a child this struct started.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Drop for LocalTriton {
    fn drop(&mut self) {
        self.kill();
    }
}
