//! `valence bench`: candle against PyTorch on the same models and inputs, in one run.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use valence_model::encoders::wav2vec2::Wav2Vec2Model;
use valence_model::encoders::whisper::WhisperEncoder;
use valence_model::serving::registry;
use valence_model::serving::runtime::Int8Kernel;

/// Set in the environment of a bench run restarted by [`rerun_avx2_only`].
pub const AVX2_ONLY_MARK: &str = "VALENCE_BENCH_AVX2_ONLY";

/// Runs this same command again in a child process whose environment caps every engine at
/// AVX2: our 8-bit kernel, and PyTorch's ATen kernels, oneDNN and MKL (which otherwise pick
/// AVX-512 and AMX where present). The f32 `gemm` products run AVX2/FMA kernels on every CPU.
/// A child, because the variables must be set before either engine starts.
pub fn rerun_avx2_only() -> Result<()> {
    let status = Command::new(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .env(AVX2_ONLY_MARK, "1")
        .env(valence_model::serving::runtime::INT8_KERNEL_VAR, "avx2")
        .env("ATEN_CPU_CAPABILITY", "avx2")
        .env("ONEDNN_MAX_CPU_ISA", "AVX2")
        .env("DNNL_MAX_CPU_ISA", "AVX2")
        .env("MKL_ENABLE_INSTRUCTIONS", "AVX2")
        .status()?;
    if !status.success() {
        bail!("the AVX2-only run failed ({status})");
    }
    Ok(())
}

/// `bench/torch_reference.py` running one model, timing one run per request.
struct TorchWorker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The worker's first line (parameters, torch version, threads).
    info: serde_json::Value,
}

impl TorchWorker {
    fn start(python: &str, what: &str, path: &Path) -> Result<Self> {
        Self::start_with(python, what, path, &[])
    }

    /// A worker with extra environment (`BENCH_DEVICE`, `BENCH_DTYPE`).
    fn start_with(python: &str, what: &str, path: &Path, envs: &[(&str, &str)]) -> Result<Self> {
        let script = reference_script();
        let mut child = Command::new(python)
            .arg(&script)
            .arg(what)
            .arg(path)
            .envs(envs.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!("cannot run {python} (a Python with torch and transformers)")
            })?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut worker = Self {
            child,
            stdin,
            stdout,
            info: serde_json::Value::Null,
        };
        worker.info = worker
            .read_line()
            .context("the PyTorch reference did not start")?;
        Ok(worker)
    }

    fn read_line(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).ok();
            }
            bail!("PyTorch reference exited: {}", err.trim());
        }
        serde_json::from_str(&line).with_context(|| format!("PyTorch reference printed {line:?}"))
    }

    /// Seconds for one run of the model on input `key` ("10s", "3s").
    fn run(&mut self, key: &str) -> Result<f64> {
        writeln!(self.stdin, "{key}")?;
        self.stdin.flush()?;
        self.read_line()?["seconds"]
            .as_f64()
            .context("PyTorch reference printed no time")
    }
}

impl Drop for TorchWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bench/torch_reference.py`: where this build's sources are, else under the current
/// directory (a binary copied to another machine, run from a checkout).
fn reference_script() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/torch_reference.py");
    if built.is_file() {
        built
    } else {
        PathBuf::from("crates/valence-cli/bench/torch_reference.py")
    }
}

/// Medians of candle's and PyTorch's times and of their per-round ratios.
struct Paired {
    candle: f64,
    torch: Option<f64>,
    ratio: Option<f64>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Times `candle` and the PyTorch worker's run of `key` alternately, one run each per round
/// after a warm-up of each: a shared machine's load drifts over minutes, and alternating makes
/// the drift hit both sides alike. Each run starts after a pause long enough for the other
/// side's idle worker threads to stop spinning (libgomp spins ~300,000 rounds after each
/// parallel region: milliseconds that would otherwise be charged to the next candle run).
fn paired<F: FnMut() -> Result<()>>(
    rounds: usize,
    mut candle: F,
    mut torch: Option<(&mut TorchWorker, &str)>,
) -> Result<Paired> {
    candle()?;
    if let Some((w, key)) = torch.as_mut() {
        w.run(key)?;
    }
    let (mut tc, mut tt, mut ratios) = (vec![], vec![], vec![]);
    let settle = || std::thread::sleep(std::time::Duration::from_millis(30));
    for _ in 0..rounds {
        settle();
        let t0 = Instant::now();
        candle()?;
        let c = t0.elapsed().as_secs_f64();
        tc.push(c);
        if let Some((w, key)) = torch.as_mut() {
            settle();
            let t = w.run(key)?;
            tt.push(t);
            ratios.push(c / t);
        }
    }
    Ok(Paired {
        candle: median(tc),
        torch: (!tt.is_empty()).then(|| median(tt)),
        ratio: (!ratios.is_empty()).then(|| median(ratios)),
    })
}

fn noise(n: usize) -> Vec<f32> {
    let mut r = valence_model::rng::SeededNormal::new(1);
    (0..n).map(|_| r.sample() * 0.1).collect()
}

/// A mono 32-bit float WAV file (format tag 3).
fn write_wav_f32(path: &Path, samples: &[f32], rate: u32) -> Result<()> {
    let data_len = (samples.len() * 4) as u32;
    let mut b = Vec::with_capacity(44 + data_len as usize);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&3u16.to_le_bytes()); // IEEE float
    b.extend_from_slice(&1u16.to_le_bytes()); // mono
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * 4).to_le_bytes());
    b.extend_from_slice(&4u16.to_le_bytes());
    b.extend_from_slice(&32u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        b.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, b)?;
    Ok(())
}

fn row(name: &str, audio_s: f64, p: &Paired) {
    row_beside(name, audio_s, p, "PyTorch");
}

/// [`row`] with the reference engine named `other`.
fn row_beside(name: &str, audio_s: f64, p: &Paired, other: &str) {
    let candle = p.candle;
    match (p.torch, p.ratio) {
        (Some(t), Some(r)) => println!(
            "{name:<38} {audio_s:>3.0} s audio  candle {candle:>7.3} s ({:>6.1}x real time)  {other} {t:>7.3} s  candle/{other} {r:>5.2}",
            audio_s / candle
        ),
        _ => println!(
            "{name:<38} {audio_s:>3.0} s audio  candle {candle:>7.3} s ({:>6.1}x real time)",
            audio_s / candle
        ),
    }
}

pub fn run(python: Option<&str>, what: &str, work: &Path, device: &str) -> Result<()> {
    if what == "gpu" {
        return gpu(python, work, device);
    }
    let threads = candle_core::utils::get_num_threads();
    let cpu = valence_model::serving::runtime::CpuFeatures::detect();
    let int8 = valence_model::serving::runtime::int8_kernel();
    let f32_products = if valence_model::kernels::packed_f32::PackedF32::runs_here() {
        format!(
            "packed AVX2/FMA tiles up to {} weights, gemm crate above",
            valence_model::kernels::packed_f32::PACK_LIMIT
        )
    } else {
        "gemm crate".to_string()
    };
    println!(
        "CPU features: {}; f32 products: {f32_products}; 8-bit products: {}{}",
        cpu.describe(),
        int8.name(),
        match std::env::var(valence_model::serving::runtime::INT8_KERNEL_VAR) {
            Ok(v) if !v.is_empty() => format!(
                " ({}={v})",
                valence_model::serving::runtime::INT8_KERNEL_VAR
            ),
            _ => String::new(),
        }
    );
    if std::env::var(AVX2_ONLY_MARK).is_ok() {
        println!(
            "--avx2-only: 8-bit kernel capped at AVX2; PyTorch with ATEN_CPU_CAPABILITY=avx2, \
             ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2"
        );
    }
    println!(
        "candle threads: {threads}; PyTorch threads: $BENCH_THREADS (default 2). Each row: medians of \
         runs alternating candle and PyTorch, and the median of their per-round ratios."
    );
    if what == "all" || what == "products" {
        products(python, int8)?;
    }
    if what == "all" || what == "whisper" {
        let enc_dir = registry::cache_dir().join("encoders/whisper-base");
        let mut enc = WhisperEncoder::load_dir(&enc_dir, DType::F32, &Device::Cpu)
            .context("the Whisper base encoder is needed (run `valence setup`)")?;
        let mut torch = python
            .map(|p| TorchWorker::start(p, "whisper", &enc_dir))
            .transpose()?;
        if let Some(t) = &torch {
            println!(
                "PyTorch {} (ATen CPU capability {})",
                t.info["torch"], t.info["cpu_capability"]
            );
        }
        let x = noise(48000);
        // candle's time includes the log-mel front end (~0.1 ms); PyTorch starts from a mel.
        for (name, quantized) in [
            ("Whisper base encoder f32 (3 s window)", false),
            ("  same, int8 projections", true),
        ] {
            if quantized {
                enc.quantize(int8)?;
            }
            let p = paired(
                30,
                || enc.encode(&x).map(|_| ()),
                torch.as_mut().map(|w| (w, "3s")),
            )?;
            row(name, 3.0, &p);
        }
        drop(torch);
        // The whole default model per window (mel + encoder + pooling + head): what
        // `valence classify` pays for every hop.
        let dir = registry::resolve_model("default")?;
        let m = registry::shared_model(&dir, &Device::Cpu)?;
        let upto = m.layers_needed().unwrap_or(m.encoder.num_layers());
        let mut torch = python
            .map(|p| TorchWorker::start(p, &format!("whisper-upto-{upto}"), &enc_dir))
            .transpose()?;
        let p = paired(
            30,
            || m.classify(&x).map(|_| ()),
            torch.as_mut().map(|w| (w, "3s")),
        )?;
        drop(torch);
        row(
            &format!("default model (layers ..{upto}, 3 s window)"),
            3.0,
            &p,
        );
        println!("default model encoder weights: {}", m.encoder_weights);
        println!(
            "default model, one 3 s window: {:.4} s -> at 1 s hop {:.1}x real time",
            p.candle,
            1.0 / p.candle
        );
        // Where a window's time goes (each step timed on its own, so the sum exceeds the row).
        print!(
            "{}",
            batch_breakdown("default model,", &m, &Device::Cpu, upto, 1, 31)?
        );
        // What the inference service's batches cost per window (windows of one length).
        for batch in [1usize, 4, 8] {
            let xs: Vec<Vec<f32>> = (0..batch).map(|i| noise(48000 + i)).collect();
            let xs: Vec<&[f32]> = xs.iter().map(|x| &x[..48000]).collect();
            let mut times = Vec::new();
            for _ in 0..10 {
                let t0 = Instant::now();
                for r in m.classify_batch(&xs) {
                    r?;
                }
                times.push(t0.elapsed().as_secs_f64() / batch as f64);
            }
            let t = median(times);
            println!(
                "default model, batch of {batch} 3 s windows: {t:.4} s per window -> {:.1} windows/s",
                1.0 / t
            );
        }
        // A lone live stream: one window a second, each after the CPU sat idle (the pool's
        // workers parked, the cores maybe halted), unlike the back-to-back rows above.
        let mut times = Vec::new();
        for _ in 0..7 {
            std::thread::sleep(std::time::Duration::from_secs(1));
            let t0 = Instant::now();
            m.classify(&x)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        println!(
            "default model, one 3 s window after 1 s idle (a lone live stream), median of 7: {:.4} s",
            median(times)
        );
        // End to end, as `valence classify` runs: decodebin, resampling, windows, messages.
        std::fs::create_dir_all(work)?;
        let wav = work.join("bench-60s-48k.wav");
        write_wav_f32(&wav, &noise(60 * 48000), 48000)?;
        let opts = crate::classify::Options {
            model: "default".into(),
            device: "cpu".into(),
            window_s: 3.0,
            hop_s: 1.0,
            silence_threshold: -60.0,
            // The input is noise: with the speech gate on, no window would reach the model.
            vad: false,
            min_speech: None,
            min_confidence: 0.0,
        };
        let mut windows = 0;
        let t0 = Instant::now();
        crate::classify::classify_file(&wav, &opts, |_| windows += 1)?;
        let t = t0.elapsed().as_secs_f64();
        println!(
            "valence classify, 60 s of 48 kHz audio, 3 s window / 1 s hop: {windows} windows in {t:.2} s -> {:.1}x real time",
            60.0 / t
        );
    }
    if what == "all" || what == "xlsr" {
        std::fs::create_dir_all(work)?;
        let Some(python) = python else {
            bail!(
                "the xlsr benchmark needs --python (PyTorch makes the random 315M-parameter checkpoint)"
            );
        };
        // PyTorch saves its random model first; candle then loads those same weights.
        let mut torch = TorchWorker::start(python, "xlsr", work)?;
        let mut m = Wav2Vec2Model::load_dir(work, DType::F32, &Device::Cpu)?;
        println!(
            "xlsr-53-sized Wav2Vec2: {} parameters",
            torch.info["params"]
        );
        for quantized in [false, true] {
            if quantized {
                m.quantize(int8)?;
            }
            for secs in [10usize, 3] {
                let p = xlsr_paired(&m, &mut torch, secs)?;
                let name = if quantized {
                    format!("  same, int8 projections ({secs} s)")
                } else {
                    format!("xlsr-53-sized Wav2Vec2 ({secs} s)")
                };
                row(&name, secs as f64, &p);
            }
        }
        drop(torch);
        // The other yardstick for the 8-bit path: ONNX Runtime's dynamic int8 MatMuls
        // on the same weights (the first run exports and quantizes them, ~2 min).
        match TorchWorker::start(python, "xlsr-onnx-int8", work) {
            Ok(mut ort) => {
                println!("ONNX Runtime {} (CPU provider)", ort.info["onnxruntime"]);
                if std::env::var(AVX2_ONLY_MARK).is_ok() {
                    println!(
                        "  (ONNX Runtime picks its kernels from the CPU itself: the AVX2 cap does \
                         not reach it)"
                    );
                }
                for secs in [10usize, 3] {
                    let p = xlsr_paired(&m, &mut ort, secs)?;
                    row_beside(
                        &format!("  int8 beside ONNX Runtime int8 ({secs} s)"),
                        secs as f64,
                        &p,
                        "ONNX RT",
                    );
                }
            }
            Err(e) => println!("ONNX Runtime rows skipped: {e:#}"),
        }
    }
    Ok(())
}

/// candle's xlsr-sized encoder beside a worker's run of the same length of audio (5 rounds of
/// 10 s, 9 of 3 s).
fn xlsr_paired(m: &Wav2Vec2Model, worker: &mut TorchWorker, secs: usize) -> Result<Paired> {
    let x = noise(16000 * secs);
    let rounds = if secs == 10 { 5 } else { 9 };
    paired(
        rounds,
        || m.encode(&x).map(|_| ()),
        Some((worker, &format!("{secs}s"))),
    )
}

/// The encoders' projections one by one: candle's f32 product (the model's fused dense op) and
/// every 8-bit kernel this CPU runs (activation quantization included), beside PyTorch's f32
/// `Linear` and its dynamic-quantized int8 `Linear` (fbgemm, the scheme of ONNX Runtime's
/// int8 MatMul) on the same sizes. The AVX2 kernel's row also says what share it reaches of
/// its bare instruction sequence on this machine (a ceiling no layout of the same instructions
/// passes), measured alternately with it.
fn products(python: Option<&str>, best: Int8Kernel) -> Result<()> {
    use valence_model::kernels::int8::{self, PackedWeights};
    let mut torch = python
        .map(|p| TorchWorker::start(p, "products", Path::new("-")))
        .transpose()?;
    if let Some(t) = &torch {
        println!("PyTorch quantized engine: {}", t.info["engine"]);
        // Measured on an AVX-512 VNNI CPU: with the cap, fbgemm's xlsr qkv ran at 221 GMAC/s on two
        // cores, above what any AVX2 sequence reaches there.
        if best == Int8Kernel::Avx2 && Int8Kernel::Avx512Vnni.runs_here() {
            println!(
                "  (fbgemm picks its kernels from the CPU itself: the AVX2 cap does not reach \
                 PyTorch's int8 rows, which run VNNI on this CPU)"
            );
        }
    }
    let kernels: Vec<Int8Kernel> = [
        Int8Kernel::Avx2,
        Int8Kernel::AvxVnni,
        Int8Kernel::Avx512Vnni,
    ]
    .into_iter()
    .filter(|k| k.runs_here() && k.rank_at_most(best))
    .collect();
    if kernels.contains(&Int8Kernel::Avx2) {
        avx2_sequence_rate(); // warm-up
        println!(
            "bare AVX2 8-bit sequence on {} threads: {:.0} GMAC/s now (the AVX2 rows' ceiling)",
            candle_core::utils::get_num_threads(),
            avx2_sequence_rate() / 1e9
        );
    }
    // Whisper base at 3 s (150 frames), then xlsr-53 at 10 s (499 frames).
    for (label, m, k, n) in [
        ("Whisper qkv", 150usize, 512usize, 1536usize),
        ("Whisper out", 150, 512, 512),
        ("Whisper fc1", 150, 512, 2048),
        ("Whisper fc2", 150, 2048, 512),
        ("Whisper conv2", 150, 1536, 512),
        ("xlsr qkv", 499, 1024, 3072),
        ("xlsr fc1", 499, 1024, 4096),
        ("xlsr fc2", 499, 4096, 1024),
    ] {
        let w = noise(n * k);
        let x = noise(m * k);
        let wt = candle_core::Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)?;
        let proj = valence_model::nn::Projection::dense(wt, None)?;
        let xt = candle_core::Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?;
        let rounds = 15;
        let key = format!("f32:{m}:{k}:{n}");
        let f32p = paired(
            rounds,
            || {
                candle_core::Module::forward(&proj, &xt)?;
                Ok(())
            },
            torch.as_mut().map(|w| (w, key.as_str())),
        )?;
        let key = format!("int8:{m}:{k}:{n}");
        let torch_int8 = match torch.as_mut() {
            Some(w) => Some(paired(rounds, || Ok(()), Some((w, key.as_str())))?.torch),
            None => None,
        }
        .flatten();
        let packed = PackedWeights::pack(&w, n, k)?;
        let mut dst = vec![0f32; m * n];
        let mut line = format!(
            "{label:<14} {m:>3}x{k:>4}x{n:>4}  f32 {:>6.2} ms",
            f32p.candle * 1e3
        );
        for kernel in &kernels {
            let mut product = || {
                let q = int8::quantize_rows(&x, m, k);
                int8::matmul(&q, &packed, &mut dst, *kernel);
            };
            let p = paired(
                rounds,
                || {
                    product();
                    Ok(())
                },
                None,
            )?;
            line += &format!(
                "  {} {:>6.2} ms ({:.2}x f32{})",
                kernel.short_name(),
                p.candle * 1e3,
                f32p.candle / p.candle,
                if *kernel == Int8Kernel::Avx2 {
                    let share = avx2_share(rounds, (m * k * n) as f64, &mut product);
                    format!(", {:.0} % of the bare AVX2 sequence", share * 100.0)
                } else {
                    String::new()
                }
            );
        }
        if let (Some(tf), Some(ti)) = (f32p.torch, torch_int8) {
            line += &format!(
                "  | PyTorch f32 {:>6.2} ms, int8 {:>6.2} ms",
                tf * 1e3,
                ti * 1e3
            );
        }
        println!("{line}");
    }
    Ok(())
}

/// The AVX2 kernel's own instruction sequence with nothing else around it: a 4-row x 16-column
/// tile over pairs of quads (two `vpbroadcastd`, two `vpmaddubsw` added with `vpaddw`, one
/// `vpmaddwd` with ones, `vpaddd`; the weights of 512 inputs and the activations in L1), on every
/// candle thread at once. Multiply-adds per second: what an AVX2 8-bit product could reach on
/// this machine at this moment.
#[cfg(target_arch = "x86_64")]
fn avx2_sequence_rate() -> f64 {
    /// Quads of inputs per pass (512 inputs), rows and columns of the tile.
    const QUADS: usize = 128;
    const MACS_PER_PASS: usize = QUADS * 4 * 4 * 16;
    #[target_feature(enable = "avx2")]
    fn run(iters: usize) -> i32 {
        use std::arch::x86_64::*;
        // Opaque to the optimizer, so the products are computed, not folded.
        let w_store = vec![1i8; QUADS * 64];
        let x_store = [3u8; 4 * QUADS * 4];
        let (w, x) = (
            std::hint::black_box(w_store.as_slice()),
            std::hint::black_box(&x_store),
        );
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; 4];
        // SAFETY: both loads lie within `w`.
        let weights = |q: usize| unsafe {
            let p = w.as_ptr().add(q * 64) as *const __m256i;
            [_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))]
        };
        let quad = |i: usize, q: usize| {
            let off = (i * QUADS + q) * 4;
            _mm256_set1_epi32(i32::from_le_bytes([
                x[off],
                x[off + 1],
                x[off + 2],
                x[off + 3],
            ]))
        };
        for _ in 0..iters {
            for q in (0..QUADS).step_by(2) {
                let (wa, wb) = (weights(q), weights(q + 1));
                for (i, a) in acc.iter_mut().enumerate() {
                    let (xa, xb) = (quad(i, q), quad(i, q + 1));
                    for h in 0..2 {
                        let pair = _mm256_add_epi16(
                            _mm256_maddubs_epi16(xa, wa[h]),
                            _mm256_maddubs_epi16(xb, wb[h]),
                        );
                        a[h] = _mm256_add_epi32(a[h], _mm256_madd_epi16(pair, ones));
                    }
                }
            }
        }
        let mut sum = _mm256_setzero_si256();
        for a in acc.iter().flatten() {
            sum = _mm256_add_epi32(sum, *a);
        }
        _mm256_extract_epi32::<0>(sum)
    }
    if !std::is_x86_feature_detected!("avx2") {
        return f64::NAN;
    }
    let threads = candle_core::utils::get_num_threads().max(1);
    let iters = 4000;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            // SAFETY: AVX2 was detected above.
            s.spawn(|| std::hint::black_box(unsafe { run(iters) }));
        }
    });
    (threads * iters * MACS_PER_PASS) as f64 / t0.elapsed().as_secs_f64()
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_sequence_rate() -> f64 {
    f64::NAN
}

/// The AVX2 product's share of [`avx2_sequence_rate`], measured alternately (median of the
/// per-round ratios: the machine's speed drifts between rounds, not within one).
fn avx2_share(rounds: usize, macs: f64, mut product: impl FnMut()) -> f64 {
    product();
    let mut ratios = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t0 = Instant::now();
        product();
        let rate = macs / t0.elapsed().as_secs_f64();
        ratios.push(rate / avx2_sequence_rate());
    }
    median(ratios)
}

pub fn default_work_dir() -> PathBuf {
    registry::cache_dir().join("bench")
}

/// Speech-like windows for comparing devices: harmonic sounds with a syllable-rate envelope at
/// several pitches and levels (voiced, so voiced-frame pooling has frames to read), some under
/// noise, and plain noise.
fn device_check_windows(count: usize, samples: usize) -> Vec<Vec<f32>> {
    let mut r = valence_model::rng::SeededNormal::new(7);
    (0..count)
        .map(|i| {
            let f0 = 90.0 + 23.0 * i as f32;
            let level = 0.05 + 0.4 * ((i * 7) % 11) as f32 / 10.0;
            let snr_noise = if i % 4 == 3 { 1.0 } else { 0.02 };
            (0..samples)
                .map(|n| {
                    let t = n as f32 / 16_000.0;
                    let envelope = 0.5 - 0.5 * (std::f32::consts::TAU * 4.0 * t).cos();
                    let voiced: f32 = (1..=20)
                        .map(|k| (std::f32::consts::TAU * f0 * k as f32 * t).sin() / k as f32)
                        .sum();
                    let speech = if i % 4 == 3 { 0.0 } else { voiced * envelope };
                    level * (0.3 * speech + snr_noise * 0.1 * r.sample())
                })
                .collect()
        })
        .collect()
}

/// Largest probability difference and class agreement between two runs on the same windows.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, usize) {
    let max_diff = a
        .iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max);
    let same = a
        .iter()
        .zip(b)
        .filter(|(x, y)| valence_model::argmax(x).0 == valence_model::argmax(y).0)
        .count();
    (max_diff, same)
}

/// `--what gpu --device cuda`: the default model on the GPU beside the CPU (same windows: the
/// CUDA path must give the CPU's answers) and beside PyTorch on the same GPU (speed, per batch
/// size), then an xlsr-53-sized Wav2Vec2. Half precision rows use the manifest's `dtype`.
fn gpu(python: Option<&str>, work: &Path, device_spec: &str) -> Result<()> {
    use valence_model::{Manifest, ValenceModel};
    let device = valence_model::parse_device(device_spec)?;
    if device.is_cpu() {
        bail!(
            "--what gpu needs --device cuda (or cuda:N) and a build with the `cuda` feature; \
             device `{device_spec}` is the CPU"
        );
    }
    let dir = registry::resolve_model("default")?;
    let load = |dtype: &str, int8: bool, on: &Device| -> Result<ValenceModel> {
        let mut m = Manifest::read(&dir)?;
        m.dtype = dtype.into();
        if !int8 {
            m.encoder.quantize = None;
        }
        m.load(&dir, on)
    };
    println!(
        "GPU check: default model {} on {}; CPU features here: {}",
        dir.display(),
        valence_model::device_name(&device),
        valence_model::serving::runtime::CpuFeatures::detect().describe()
    );

    // 1. Same windows on every path; batched and one by one on the GPU.
    let windows = device_check_windows(16, 48_000);
    let refs: Vec<&[f32]> = windows.iter().map(|w| w.as_slice()).collect();
    let probs = |m: &ValenceModel| -> Result<Vec<Vec<f32>>> {
        m.classify_batch(&refs)
            .into_iter()
            .map(|r| r.map(|p| p.probabilities))
            .collect()
    };
    let cpu_f32 = load("f32", false, &Device::Cpu)?;
    let cpu_shipped = load("f32", true, &Device::Cpu)?;
    let reference = probs(&cpu_f32)?;
    let shipped = probs(&cpu_shipped)?;
    drop((cpu_f32, cpu_shipped));
    let gpu_f32 = load("f32", false, &device)?;
    let one_by_one: Vec<Vec<f32>> = refs
        .iter()
        .map(|w| gpu_f32.classify(w).map(|p| p.probabilities))
        .collect::<Result<_>>()?;
    let mut rows = vec![
        ("GPU f32, batch of 16".to_string(), Ok(probs(&gpu_f32)?)),
        ("GPU f32, one window at a time".to_string(), Ok(one_by_one)),
    ];
    // Half precision is optional: a failure is reported and the rest still runs.
    let mut half = Vec::new();
    for dtype in ["f16", "bf16"] {
        let outcome = load(dtype, false, &device).and_then(|m| {
            let p = probs(&m)?;
            half.push((dtype, m));
            Ok(p)
        });
        rows.push((format!("GPU {dtype}, batch of 16"), outcome));
    }
    rows.push(("CPU, shipped format".to_string(), Ok(shipped)));
    println!(
        "{} windows of 3 s (speech-like and noise); reference: CPU f32 encoder",
        windows.len()
    );
    for (name, outcome) in &rows {
        match outcome {
            Ok(p) => {
                let (diff, same) = compare(&reference, p);
                println!(
                    "  {name:<32} max |probability difference| {diff:.2e}, same class {same}/{}",
                    windows.len()
                );
            }
            Err(e) => println!("  {name:<32} FAILED: {e:#}"),
        }
    }

    // 2. Speed per batch size beside PyTorch on the same GPU (the layers the head reads).
    let upto = gpu_f32
        .layers_needed()
        .unwrap_or(gpu_f32.encoder.num_layers());
    // Every GPU precision that loaded: f32, then the half ones.
    let models: Vec<(&str, &ValenceModel)> = std::iter::once(("f32", &gpu_f32))
        .chain(half.iter().map(|(d, m)| (*d, m)))
        .collect();
    let enc_dir = gpu_f32.manifest.encoder_dir(&dir);
    let cuda = format!("cuda:{}", device_spec.strip_prefix("cuda:").unwrap_or("0"));
    println!(
        "default model from samples (log-mel on the CPU, encoder layers ..{upto}, pooling, head), \
         3 s windows; PyTorch: the same encoder layers from a log-mel"
    );
    for &(dtype, model) in &models {
        let mut torch = python
            .map(|p| {
                TorchWorker::start_with(
                    p,
                    &format!("whisper-upto-{upto}"),
                    &enc_dir,
                    &[("BENCH_DEVICE", cuda.as_str()), ("BENCH_DTYPE", dtype)],
                )
            })
            .transpose()?;
        if let Some(t) = &torch {
            println!("  PyTorch {} on {}", t.info["torch"], t.info["device_name"]);
        }
        for batch in [1usize, 8, 32, 64, 128, 256] {
            let xs = device_check_windows(batch, 48_000);
            let xs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let key = format!("3s@{batch}");
            let p = paired(
                10,
                || {
                    for r in model.classify_batch(&xs) {
                        r?;
                    }
                    Ok(())
                },
                torch.as_mut().map(|w| (w, key.as_str())),
            )?;
            let per_window = p.candle / batch as f64;
            print!(
                "  {dtype} batch {batch:>3}: {:.2} ms per batch, {:>7.0} windows/s",
                p.candle * 1e3,
                1.0 / per_window
            );
            match (p.torch, p.ratio) {
                (Some(t), Some(r)) => println!(
                    "  PyTorch {:.2} ms ({:.0} windows/s)  candle/PyTorch {r:.2}",
                    t * 1e3,
                    batch as f64 / t
                ),
                _ => println!(),
            }
        }
    }
    // Where a large batch's time goes.
    for &(dtype, model) in &models {
        print!("{}", batch_breakdown(dtype, model, &device, upto, 256, 6)?);
    }
    drop((gpu_f32, half));

    // 3. The reference model's size class: a random xlsr-53-sized Wav2Vec2.
    if let Some(python) = python {
        std::fs::create_dir_all(work)?;
        for dtype in ["f32", "f16"] {
            if let Err(e) = xlsr_on_gpu(python, work, &device, &cuda, dtype) {
                println!("xlsr-sized {dtype}: FAILED: {e:#}");
            }
        }
    }
    Ok(())
}

/// Where a batch's time goes on `device`: log-mels on the CPU (and their copy) against the
/// encoder's own (on the GPU there), each step of the front end and layers ..`upto` (the device
/// is synchronised after every step, so their sum exceeds an unsynchronised run), then the
/// whole `classify_batch`. Medians of `runs`.
fn batch_breakdown(
    dtype: &str,
    model: &valence_model::ValenceModel,
    device: &Device,
    upto: usize,
    batch: usize,
    runs: usize,
) -> Result<String> {
    use std::fmt::Write as _;
    let valence_model::Encoder::Whisper(w) = &model.encoder else {
        bail!("the batch breakdown is for Whisper encoders");
    };
    let xs = device_check_windows(batch, 48_000);
    let xs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
    let frames = valence_model::encoders::whisper::LogMel::frames(48_000);
    let n_mels = w.config.num_mel_bins;
    let (mut cpu_mel, mut device_mel, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    let mut steps: Vec<(&'static str, Vec<f64>)> = Vec::new();
    let mut mel_diff = 0f32;
    for run in 0..runs {
        let t0 = Instant::now();
        let host = w.log_mels(&xs);
        let host = Tensor::from_vec(host, (batch, n_mels, frames), device)?;
        device.synchronize()?;
        cpu_mel.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let mel = w.log_mel_tensor(&xs)?;
        device.synchronize()?;
        device_mel.push(t0.elapsed().as_secs_f64());
        if run == 0 {
            mel_diff = (mel.to_dtype(DType::F32)? - &host)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
        }
        let mut times: Vec<(&'static str, f64)> = Vec::new();
        let mut last = Instant::now();
        let mut mark = |step: &'static str| -> candle_core::Result<()> {
            device.synchronize()?;
            let now = Instant::now();
            match times.iter_mut().find(|(s, _)| *s == step) {
                Some((_, t)) => *t += (now - last).as_secs_f64(),
                None => times.push((step, (now - last).as_secs_f64())),
            }
            last = now;
            Ok(())
        };
        w.forward_mel_marked(&mel, Some(upto), &mut mark)?;
        for (step, t) in times {
            match steps.iter_mut().find(|(s, _)| *s == step) {
                Some((_, ts)) => ts.push(t),
                None => steps.push((step, vec![t])),
            }
        }
        let t0 = Instant::now();
        for r in model.classify_batch(&xs) {
            r?;
        }
        whole.push(t0.elapsed().as_secs_f64());
    }
    let mut out = format!(
        "  {dtype} batch {batch}, medians of {runs}: log-mels on the CPU + copy {:.1} ms, the \
         encoder's own {:.1} ms (largest difference {mel_diff:.1e}); whole classify_batch \
         {:.1} ms\n",
        median(cpu_mel) * 1e3,
        median(device_mel) * 1e3,
        median(whole) * 1e3
    );
    let steps: Vec<(&str, f64)> = steps.into_iter().map(|(s, t)| (s, median(t))).collect();
    let total: f64 = steps.iter().map(|(_, t)| t).sum();
    for (step, t) in &steps {
        writeln!(
            out,
            "    {step:<38} {:>8.2} ms {:>5.1} %",
            t * 1e3,
            100.0 * t / total
        )?;
    }
    let label = format!("encoder layers ..{upto}");
    writeln!(out, "    {label:<38} {:>8.2} ms in all", total * 1e3)?;
    Ok(out)
}

/// A random xlsr-53-sized Wav2Vec2 (PyTorch makes and saves it) on the GPU beside PyTorch.
fn xlsr_on_gpu(python: &str, work: &Path, device: &Device, cuda: &str, dtype: &str) -> Result<()> {
    let mut torch = TorchWorker::start_with(
        python,
        "xlsr",
        work,
        &[("BENCH_DEVICE", cuda), ("BENCH_DTYPE", dtype)],
    )?;
    let m = Wav2Vec2Model::load_dir(work, valence_model::manifest::parse_dtype(dtype)?, device)?;
    for (secs, batch) in [(10usize, 1usize), (3, 1), (3, 16)] {
        let xs = device_check_windows(batch, 16_000 * secs);
        let xs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let key = format!("{secs}s@{batch}");
        let p = paired(
            5,
            || {
                m.encode_batch_upto(&xs, None)?;
                device.synchronize()?;
                Ok(())
            },
            Some((&mut torch, &key)),
        )?;
        row(
            &format!("xlsr-sized {dtype}, {secs} s x {batch}"),
            (secs * batch) as f64,
            &p,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU bench's breakdown runs on any device: on the CPU (where the encoder's log-mel is
    /// the FFT one, so the two agree exactly) with a tiny model it names every step.
    #[test]
    fn batch_breakdown_names_every_step() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("valence-breakdown-{}", std::process::id()));
        valence_model::synthetic::write_tiny_model(&dir, 7)?;
        let model = valence_model::Manifest::read(&dir)?.load(&dir, &Device::Cpu);
        std::fs::remove_dir_all(&dir)?;
        let report = batch_breakdown("f32", &model?, &Device::Cpu, 2, 3, 2)?;
        eprintln!("{report}");
        for step in [
            "conv1 + GELU",
            "conv2 + GELU",
            "positions",
            "layer norms",
            "q/k/v projection",
            "attention (scores, softmax, context)",
            "output projection",
            "fc1 + GELU",
            "fc2",
            "residual adds",
            "encoder layers ..2",
        ] {
            assert!(report.contains(step), "no `{step}` in\n{report}");
        }
        let diff: f32 = report
            .split("largest difference ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|d| d.parse().ok())
            .expect("a log-mel difference");
        assert!(diff < 2e-4, "log-mels differ by {diff}\n{report}");
        Ok(())
    }
}
