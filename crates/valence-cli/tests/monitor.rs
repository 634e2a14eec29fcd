//! `valence monitor` with real parts on loopback: three live sources (RTP L16 over UDP sent by
//! `gst-launch-1.0` and described by an SDP file, a looping speech file, a file served over
//! HTTP), a real Prometheus server scraping `/metrics` and read back through its query API, one
//! source killed and brought back, and headless Chromium over WebDriver drawing the live page.
//! Every server is started here, waited for with bounded loops, and killed on drop. Where a
//! tool is missing (`scripts/deps.sh` installs them all) the test says so and skips.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

/// A child process killed (and reaped) when dropped, also when an assertion fails.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(what: &'static str, cmd: &mut Command) -> Proc {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    Proc(child)
}

fn have(tool: &str, arg: &str) -> bool {
    let ok = Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: {tool} is not installed (bash scripts/deps.sh installs it)");
    }
    ok
}

fn gst_element(name: &str) -> bool {
    let ok = Command::new("gst-inspect-1.0")
        .arg(name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: GStreamer element {name} is missing (bash scripts/deps.sh)");
    }
    ok
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn valence() -> &'static str {
    env!("CARGO_BIN_EXE_valence")
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("valence-monitor-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `secs` seconds of espeak-ng speech, looped by ffmpeg, 16 kHz mono WAV.
fn speech(dir: &Path, secs: u32) -> PathBuf {
    let voice = dir.join("voice.wav");
    let ok = Command::new("espeak-ng")
        .arg("-w")
        .arg(&voice)
        .arg(
            "The weather was lovely this morning, and we walked along the river. \
             Then the train was late again, and nobody told us why.",
        )
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "espeak-ng failed");
    let out = dir.join("speech.wav");
    let ok = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-stream_loop",
            "-1",
            "-i",
        ])
        .arg(&voice)
        .args(["-t", &secs.to_string(), "-ar", "16000", "-ac", "1"])
        .arg(&out)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ffmpeg failed");
    out
}

fn tiny_model(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    valence_model::synthetic::write_tiny_model(&m, 5).unwrap();
    m
}

fn get_json(url: &str) -> Option<Value> {
    let mut r = ureq::get(url).call().ok()?;
    r.body_mut().read_json().ok()
}

/// Polls `f` every 500 ms until it gives Some, for at most `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Starts `valence monitor` on a free port with `model` for every source and the `[[source]]`
/// tables of `sources`, and waits until its HTTP side answers: the process, its base URL and
/// its port.
fn start_monitor(dir: &Path, model: &Path, sources: &str) -> (Proc, String, u16) {
    let port = free_port();
    let path = dir.join("monitor.toml");
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\n\n[element]\nmodel = \"{}\"\n\n{sources}",
        model.display()
    );
    std::fs::write(&path, config).unwrap();
    let p = spawn(
        "valence monitor",
        Command::new(valence())
            .args(["monitor", "--config"])
            .arg(&path),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_for("the monitor's HTTP side", Duration::from_secs(30), || {
        get_json(&format!("{base}/api/streams"))
    });
    (p, base, port)
}

fn stream_up(base: &str, name: &str) -> Option<bool> {
    get_json(&format!("{base}/api/streams"))?
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["up"].as_bool())
}

/// Prometheus' instant query: (labels, value) per series.
fn prom_query(prom: &str, q: &str) -> Vec<(Value, f64)> {
    let Ok(mut r) = ureq::get(&format!("{prom}/api/v1/query"))
        .query("query", q)
        .call()
    else {
        return vec![];
    };
    let Ok(v) = r.body_mut().read_json::<Value>() else {
        return vec![];
    };
    v["data"]["result"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| {
                    let val = s["value"][1].as_str()?.parse().ok()?;
                    Some((s["metric"].clone(), val))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn prom_value(prom: &str, q: &str, stream: &str) -> Option<f64> {
    prom_query(prom, q)
        .into_iter()
        .find(|(m, _)| m["stream"] == stream)
        .map(|(_, v)| v)
}

/// Serves `GET /live.wav`: a WAV header for an endless stream, then the 16 kHz mono 16-bit
/// samples of the file given, looped and paced at real time (argv: port, file).
const PACED_HTTP_SERVER: &str = r#"
import http.server, socketserver, struct, sys, time, wave
port, path = int(sys.argv[1]), sys.argv[2]
with wave.open(path) as w:
    assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
    pcm = w.readframes(w.getnframes())
size = 0x7FFFF000
header = (b"RIFF" + struct.pack("<I", size + 36) + b"WAVEfmt " +
          struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16) + b"data" + struct.pack("<I", size))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/live.wav":
            self.send_error(404); return
        self.send_response(200)
        self.send_header("Content-Type", "audio/x-wav")
        self.end_headers()
        self.wfile.write(header)
        t0, sent, chunk = time.monotonic(), 0, 3200
        while True:
            i = sent % len(pcm)
            self.wfile.write(pcm[i:i + chunk])
            sent += min(chunk, len(pcm) - i)
            ahead = sent / 32000 - (time.monotonic() - t0) - 0.2
            if ahead > 0:
                time.sleep(ahead)
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
S(("127.0.0.1", port), H).serve_forever()
"#;

#[test]
fn prometheus_scrapes_three_live_sources_and_a_dead_one_comes_back() {
    if !(have("prometheus", "--version")
        && have("gst-launch-1.0", "--version")
        && have("espeak-ng", "--version")
        && have("ffmpeg", "-version")
        && have("python3", "--version")
        && gst_element("sdpsrc")
        && gst_element("souphttpsrc"))
    {
        return;
    }
    let dir = temp_dir("prom");
    let model = tiny_model(&dir);
    let wav = speech(&dir, 120);

    // RTP L16 over UDP, paced by udpsink's clock, described by an SDP file.
    let rtp_port = free_port();
    let sdp = dir.join("call.sdp");
    std::fs::write(
        &sdp,
        format!(
            "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=call\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {rtp_port} RTP/AVP 96\r\na=rtpmap:96 L16/16000/1\r\n"
        ),
    )
    .unwrap();
    let _sender = spawn(
        "gst-launch-1.0 RTP sender",
        Command::new("gst-launch-1.0").args([
            "-q",
            "filesrc",
            &format!("location={}", wav.display()),
            "!",
            "wavparse",
            "!",
            "audioconvert",
            "!",
            "audio/x-raw,format=S16BE,rate=16000,channels=1",
            "!",
            "rtpL16pay",
            "!",
            "udpsink",
            "host=127.0.0.1",
            &format!("port={rtp_port}"),
        ]),
    );
    // An HTTP server that streams the speech in real time, as a web radio does.
    let http_port = free_port();
    let http_server = |wav: &Path| {
        spawn(
            "python3 HTTP audio server",
            Command::new("python3")
                .arg("-c")
                .arg(PACED_HTTP_SERVER)
                .arg(http_port.to_string())
                .arg(wav),
        )
    };
    let mut http = Some(http_server(&wav));
    std::thread::sleep(Duration::from_millis(500));

    let sources = format!(
        r#"[[source]]
name = "call"
uri = "sdp://{sdp}"

[[source]]
name = "studio"
uri = "{wav}"
loop = true

[[source]]
name = "web"
uri = "http://127.0.0.1:{http_port}/live.wav"
"#,
        sdp = sdp.display(),
        wav = wav.display(),
    );
    let (_monitor, base, port) = start_monitor(&dir, &model, &sources);
    for s in ["call", "studio", "web"] {
        wait_for(&format!("{s} up"), Duration::from_secs(40), || {
            stream_up(&base, s).filter(|&u| u)
        });
    }

    let prom_port = free_port();
    let prom_dir = dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  \
             - job_name: valence\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let _prometheus = spawn(
        "prometheus",
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                prom_dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .arg("--log.level=warn"),
    );
    let prom = format!("http://127.0.0.1:{prom_port}");

    // Every stream's windows, through Prometheus.
    let q = "sum by (stream) (valence_windows_total)";
    let windows = wait_for(
        "Prometheus to hold windows of all three streams",
        Duration::from_secs(60),
        || {
            let r = prom_query(&prom, q);
            (r.len() == 3 && r.iter().all(|(_, v)| *v >= 2.0)).then_some(r)
        },
    );
    eprintln!("windows per stream in Prometheus: {windows:?}");
    for s in ["call", "studio", "web"] {
        let p = prom_value(&prom, "sum by (stream) (valence_window_probability)", s)
            .expect("probabilities of every stream");
        assert!((p - 1.0).abs() < 1e-3, "{s}: probabilities sum to {p}");
        assert_eq!(prom_value(&prom, "valence_up", s), Some(1.0), "{s} up");
    }
    assert!(
        prom_value(
            &prom,
            "sum by (stream) (valence_window_latency_seconds_count)",
            "call"
        )
        .is_some_and(|c| c >= 1.0),
        "latency histogram of the RTP stream"
    );

    // Kill the HTTP server: that stream goes down, the others go on.
    let studio_before = prom_value(&prom, q, "studio").unwrap();
    drop(http.take());
    wait_for(
        "web to show up 0 in Prometheus",
        Duration::from_secs(60),
        || (prom_value(&prom, "valence_up", "web") == Some(0.0)).then_some(()),
    );
    wait_for("studio's windows to go on", Duration::from_secs(20), || {
        prom_value(&prom, q, "studio").filter(|&v| v >= studio_before + 3.0)
    });
    assert_eq!(prom_value(&prom, "valence_up", "call"), Some(1.0));
    assert_eq!(prom_value(&prom, "valence_up", "studio"), Some(1.0));

    // Bring it back: the monitor's back-off restarts it.
    http = Some(http_server(&wav));
    wait_for("web to come back (up 1)", Duration::from_secs(60), || {
        (prom_value(&prom, "valence_up", "web") == Some(1.0)).then_some(())
    });
    let restarts = prom_value(&prom, "valence_source_restarts_total", "web").unwrap_or(0.0);
    assert!(restarts >= 1.0, "web restarted {restarts} times");
    drop(http);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A W3C WebDriver session on chromedriver (Debian's chromium-driver).
struct WebDriver {
    base: String,
    session: String,
    _driver: Proc,
}

impl WebDriver {
    fn start(dir: &Path) -> WebDriver {
        let port = free_port();
        let driver = spawn(
            "chromedriver",
            Command::new("chromedriver").arg(format!("--port={port}")),
        );
        let base = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver", Duration::from_secs(20), || {
            get_json(&format!("{base}/status"))
        });
        let profile = dir.join("chromium-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--window-size=1400,900",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let v: Value = ureq::post(&format!("{base}/session"))
            .send_json(&caps)
            .expect("WebDriver session")
            .body_mut()
            .read_json()
            .unwrap();
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        WebDriver {
            base,
            session,
            _driver: driver,
        }
    }

    fn post(&self, path: &str, body: Value) -> Value {
        let v: Value = ureq::post(&format!("{}/session/{}/{path}", self.base, self.session))
            .send_json(&body)
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))
            .body_mut()
            .read_json()
            .unwrap();
        v["value"].clone()
    }

    fn get(&self, path: &str) -> Value {
        let v: Value = ureq::get(&format!("{}/session/{}/{path}", self.base, self.session))
            .call()
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))
            .body_mut()
            .read_json()
            .unwrap();
        v["value"].clone()
    }

    fn script(&self, js: &str) -> Value {
        self.post("execute/sync", json!({"script": js, "args": []}))
    }
}

impl Drop for WebDriver {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
    }
}

/// Per timeline: stream name, windows drawn, and pixels that are not background.
const TIMELINES: &str = r#"
return [...document.querySelectorAll("section.stream")].map(s => {
  const c = s.querySelector("canvas.timeline");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let lit = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] > 60 || d[i + 1] > 60) lit++;
  return {name: s.dataset.stream, points: Number(c.dataset.points || 0),
          drawn: Number(c.dataset.drawn || 0), lit: lit,
          label: s.querySelector(".label").textContent};
});"#;

#[test]
fn the_live_page_draws_a_timeline_per_stream_in_chromium() {
    if !(have("chromedriver", "--version")
        && have("espeak-ng", "--version")
        && have("ffmpeg", "-version"))
    {
        return;
    }
    let dir = temp_dir("page");
    let model = tiny_model(&dir);
    let wav = speech(&dir, 30);
    let sources = format!(
        r#"[[source]]
name = "one"
uri = "{wav}"
loop = true

[[source]]
name = "two"
uri = "{wav}"
loop = true
"#,
        wav = wav.display(),
    );
    let (_monitor, base, _) = start_monitor(&dir, &model, &sources);
    let wd = WebDriver::start(&dir);
    wd.post("url", json!({"url": format!("{base}/")}));
    let first = wait_for("both timelines drawn", Duration::from_secs(40), || {
        let v = wd.script(TIMELINES);
        let a = v.as_array()?.clone();
        (a.len() == 2
            && a.iter()
                .all(|t| t["drawn"].as_u64() >= Some(2) && t["lit"].as_u64() > Some(20)))
        .then_some(a)
    });
    eprintln!("timelines: {first:?}");
    // The page updates itself from the events: more windows drawn a few seconds later.
    let later = wait_for("the timelines to update", Duration::from_secs(20), || {
        let a = wd.script(TIMELINES).as_array()?.clone();
        a.iter()
            .zip(&first)
            .all(|(l, f)| l["points"].as_u64() > f["points"].as_u64())
            .then_some(a)
    });
    for t in &later {
        let label = t["label"].as_str().unwrap_or("");
        assert!(
            ["negative", "neutral", "positive", "uncertain"].contains(&label),
            "{t}"
        );
    }
    let shot = wd.get("screenshot");
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot.as_str().expect("screenshot"))
        .expect("base64 screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let out = std::env::var_os("VALENCE_MONITOR_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("monitor.png"));
    std::fs::write(&out, &png).unwrap();
    eprintln!("screenshot: {}", out.display());
    drop(wd);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `valence monitor` on a config of `text`; it must fail: its stderr.
fn refused(cfg: &Path, text: &str) -> String {
    std::fs::write(cfg, text).unwrap();
    let out = Command::new(valence())
        .args(["monitor", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "started with {text}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn a_bad_config_names_its_line_and_starts_nothing() {
    let dir = temp_dir("bad");
    let port = free_port();
    let cfg = dir.join("bad.toml");
    let err = refused(
        &cfg,
        &format!(
            "listen = \"127.0.0.1:{port}\"\n\n[[source]]\nname = \"a\"\nuri = \"udp://127.0.0.1:5004\"\n\
             [source.element]\nno-such-property = 3\n"
        ),
    );
    assert!(
        err.contains("line 7") && err.contains("no-such-property"),
        "{err}"
    );
    assert!(
        TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "nothing listens after a bad config"
    );
    let err = refused(
        &cfg,
        "[[source]]\nname = \"a\"\nuri = \"udp://x\"\n[source.element]\nwindow = \"soon\"\n",
    );
    assert!(err.contains("line 5") && err.contains("soon"), "{err}");
    let err = refused(
        &cfg,
        "[element]\nmodel = \"/no/such/model\"\n[[source]]\nname = \"a\"\nuri = \"udp://x\"\n",
    );
    assert!(
        err.contains("line 2") && err.contains("does not exist"),
        "{err}"
    );
    let err = refused(
        &cfg,
        "[[source]]\nname = \"a\"\nuri = \"udp://x\"\n[[alert]]\nname = \"x\"\nclass = \"angry\"\nabove = 0.5\nover = 5\n",
    );
    assert!(
        err.contains("line 6") && err.contains("negative, neutral or positive"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
