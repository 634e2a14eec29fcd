//! Seeded fuzzing of the model-directory loaders: `valence.json`, head and encoder configs,
//! safetensors files (header and data), sklearn scaler pickles and the card's files, mutated
//! structurally (JSON values swapped for hostile ones, keys dropped) and byte-wise (flips,
//! truncation, forged header lengths). Every case must end in `Ok` or `Err`: never a panic, a
//! hang or a giant allocation; a model that loads must classify without a panic.
//!
//! CI runs `VALENCE_FUZZ_CASES` cases (default 1500, about 5 s in a release-optimised test build); many more are a command:
//! `VALENCE_FUZZ_CASES=20000 cargo test --release -p valence-model --test fuzz_loaders`.
//! A failure prints the case's seed; `VALENCE_FUZZ_SEED=N` reruns from that seed.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use candle_core::Device;
use common::fixtures;
use serde_json::Value;
use valence_model::ValenceModel;
use valence_model::rng::SeededNormal;

struct Rng(SeededNormal);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        ((self.0.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }
}

fn hostile_value(rng: &mut Rng) -> Value {
    let pool = [
        "0",
        "-1",
        "1",
        "2",
        "3",
        "7",
        "1000000000",
        "4294967297",
        "18446744073709551615",
        "-1e300",
        "1e300",
        "0.5",
        "\"\"",
        "\"x\"",
        "\"../../../../dev/zero\"",
        "null",
        "true",
        "[]",
        "{}",
        "[0, -1]",
    ];
    serde_json::from_str(pool[rng.below(pool.len())]).unwrap()
}

/// Paths (as key/index lists) to every value in a JSON document.
fn value_paths(v: &Value, at: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                at.push(Value::String(k.clone()));
                value_paths(child, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate().take(8) {
                at.push(Value::from(i));
                value_paths(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn at_path<'a>(v: &'a mut Value, path: &[Value]) -> Option<&'a mut Value> {
    let mut cur = v;
    for p in path {
        cur = match p {
            Value::String(k) => cur.get_mut(k.as_str())?,
            Value::Number(i) => cur.get_mut(i.as_u64()? as usize)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// One structural mutation of a JSON document (or, rarely, a byte mutation of its text).
fn mutate_json(text: &[u8], rng: &mut Rng) -> Vec<u8> {
    let Ok(mut doc) = serde_json::from_slice::<Value>(text) else {
        return mutate_bytes(text, rng);
    };
    if rng.below(10) == 0 {
        return mutate_bytes(text, rng);
    }
    let mut paths = Vec::new();
    value_paths(&doc, &mut Vec::new(), &mut paths);
    for _ in 0..=rng.below(3) {
        let path = paths[rng.below(paths.len())].clone();
        if path.is_empty() {
            continue;
        }
        let (parent_path, last) = path.split_at(path.len() - 1);
        let remove = rng.below(4) == 0;
        if remove
            && let (Some(Value::Object(m)), Value::String(k)) =
                (at_path(&mut doc, parent_path), &last[0])
        {
            m.remove(k);
            continue;
        }
        if let Some(v) = at_path(&mut doc, &path) {
            *v = hostile_value(rng);
        }
    }
    serde_json::to_vec(&doc).unwrap()
}

/// Byte flips, a truncation, or a forged safetensors header length.
fn mutate_bytes(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if b.is_empty() {
        return vec![0xff; rng.below(16)];
    }
    match rng.below(4) {
        0 => b.truncate(rng.below(b.len())),
        1 if b.len() >= 8 => {
            let forged: u64 = match rng.below(4) {
                0 => u64::MAX,
                1 => 1 << 40,
                2 => b.len() as u64,
                _ => rng.below(b.len()) as u64,
            };
            b[..8].copy_from_slice(&forged.to_le_bytes());
        }
        _ => {
            // Flips concentrated at the start, where headers and pickle opcodes are.
            let span = b
                .len()
                .min(if rng.below(2) == 0 { 512 } else { usize::MAX });
            for _ in 0..=rng.below(8) {
                let i = rng.below(span);
                b[i] ^= 1 << rng.below(8);
            }
        }
    }
    b
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn signal(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 * 0.05).sin() * 0.3 + ((i * 7919) % 13) as f32 * 0.01)
        .collect()
}

/// The files a case may mutate, per kind of directory.
const TINY_FILES: [&str; 6] = [
    "valence.json",
    "head_config.json",
    "encoder/config.json",
    "head.safetensors",
    "scaler.safetensors",
    "encoder/model.safetensors",
];
const CARD_FILES: [&str; 3] = [
    "config.json",
    "emotion_classifier_complete.safetensors",
    "emotion_classifier_scaler.pkl",
];
const W2V2_FILES: [&str; 3] = [
    "config.json",
    "preprocessor_config.json",
    "pytorch_model.bin",
];

fn mutate_file(path: &Path, rng: &mut Rng) {
    let bytes = std::fs::read(path).unwrap();
    let out = if path.extension().is_some_and(|e| e == "json") {
        mutate_json(&bytes, rng)
    } else {
        mutate_bytes(&bytes, rng)
    };
    std::fs::write(path, out).unwrap();
}

/// Runs one case; returns what it did when it panicked (else empty), and whether the mutated
/// files still loaded (the fuzzer must reach the code behind the parsers too).
fn run_case(seed: u64, pristine: &[(PathBuf, &[&str])], work: &Path) -> (String, bool) {
    let mut rng = Rng(SeededNormal::new(seed));
    let (src, files) = &pristine[rng.below(pristine.len())];
    let dir = work.join(format!("case-{seed}"));
    copy_dir(src, &dir);
    let mut touched = Vec::new();
    for _ in 0..=rng.below(2) {
        let f = files[rng.below(files.len())];
        mutate_file(&dir.join(f), &mut rng);
        touched.push(f);
    }
    let what = format!("{} with {touched:?} mutated", src.display());
    if std::env::var_os("VALENCE_FUZZ_VERBOSE").is_some() {
        eprintln!("case {seed}: {what}");
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        let name = src.file_name().unwrap().to_string_lossy();
        if name == "head_card" {
            valence_model::manifest::load_card_head(&dir).is_ok()
        } else if name == "w2v2_stable" {
            match valence_model::encoders::wav2vec2::Wav2Vec2Model::load_dir(
                &dir,
                candle_core::DType::F32,
                &Device::Cpu,
            ) {
                Ok(m) => {
                    let _ = m.encode(&signal(8000));
                    true
                }
                Err(_) => false,
            }
        } else {
            match ValenceModel::load(&dir, &Device::Cpu) {
                Ok(m) => {
                    let _ = m.classify(&signal(16000));
                    let (a, b) = (signal(16000), signal(24000));
                    let _ = m.classify_batch(&[&a, &a, &b]);
                    true
                }
                Err(_) => false,
            }
        }
    }));
    std::fs::remove_dir_all(&dir).ok();
    match result {
        Ok(loaded) => (String::new(), loaded),
        Err(_) => (what, false),
    }
}

#[test]
fn model_loaders_survive_mutated_files() {
    let cases: u64 = std::env::var("VALENCE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let first: u64 = std::env::var("VALENCE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let work = std::env::temp_dir().join(format!("valence-fuzz-{}", std::process::id()));
    let tiny = work.join("tiny");
    valence_model::synthetic::write_tiny_model(&tiny, 5).unwrap();
    let pristine: Vec<(PathBuf, &[&str])> = vec![
        (tiny, &TINY_FILES),
        (fixtures().join("head_card"), &CARD_FILES),
        (fixtures().join("w2v2_stable"), &W2V2_FILES),
    ];
    let mut failures = Vec::new();
    let mut loaded = 0;
    for seed in first..first + cases {
        let (what, ok) = run_case(seed, &pristine, &work);
        loaded += ok as u64;
        if !what.is_empty() {
            failures.push(format!("seed {seed}: {what}"));
        }
    }
    std::fs::remove_dir_all(&work).ok();
    eprintln!("{cases} cases, {loaded} still loaded after mutation");
    assert!(
        loaded * 20 >= cases && loaded < cases,
        "{loaded} of {cases} mutated models loaded: the mutations are too weak or too strong"
    );
    assert!(
        failures.is_empty(),
        "{} of {cases} cases panicked:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The sklearn pickles alone, byte-mutated many times (cheap, so more cases).
#[test]
fn scaler_pickles_survive_mutation() {
    let mut rng = Rng(SeededNormal::new(77));
    let mut failures = 0;
    for name in ["scaler_p2.pkl", "scaler_p4.pkl", "scaler_p5.pkl"] {
        let bytes = std::fs::read(fixtures().join("scaler").join(name)).unwrap();
        for _ in 0..400 {
            let m = mutate_bytes(&bytes, &mut rng);
            let r = catch_unwind(|| {
                let _ = valence_model::classifier::scaler::from_sklearn_pickle(&m);
            });
            failures += r.is_err() as usize;
        }
    }
    assert_eq!(failures, 0, "mutated pickles panicked the scaler reader");
}

/// The cases the fuzzer found first (a capacity overflow, a 700 GB allocation, a multiply
/// overflow in the convolution), kept as plain regression tests.
#[test]
fn absurd_config_sizes_are_errors_not_allocations() {
    let work = std::env::temp_dir().join(format!("valence-sizes-{}", std::process::id()));
    let tiny = work.join("tiny");
    valence_model::synthetic::write_tiny_model(&tiny, 6).unwrap();
    let cfg_path = tiny.join("encoder/config.json");
    let pristine = std::fs::read_to_string(&cfg_path).unwrap();
    for (key, value) in [
        ("encoder_layers", "4294967297"),
        ("encoder_layers", "18446744073709551615"),
        ("max_source_positions", "1000000000000"),
        ("encoder_attention_heads", "0"),
    ] {
        let mut v: Value = serde_json::from_str(&pristine).unwrap();
        v[key] = serde_json::from_str(value).unwrap();
        std::fs::write(&cfg_path, v.to_string()).unwrap();
        let err = ValenceModel::load(&tiny, &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{key} = {value} loaded"));
        assert!(format!("{err:#}").contains(key), "{key}: {err:#}");
    }
    let w2v2 = work.join("w2v2");
    copy_dir(&fixtures().join("w2v2_stable"), &w2v2);
    let cfg_path = w2v2.join("config.json");
    let pristine = std::fs::read_to_string(&cfg_path).unwrap();
    for (key, value) in [
        ("conv_stride", "[5, 2, 18446744073709551615]"),
        ("num_hidden_layers", "4294967297"),
        ("num_conv_pos_embedding_groups", "0"),
    ] {
        let mut v: Value = serde_json::from_str(&pristine).unwrap();
        v[key] = serde_json::from_str(value).unwrap();
        std::fs::write(&cfg_path, v.to_string()).unwrap();
        let r = valence_model::encoders::wav2vec2::Wav2Vec2Model::load_dir(
            &w2v2,
            candle_core::DType::F32,
            &Device::Cpu,
        );
        assert!(r.is_err(), "{key} = {value} loaded");
    }
    std::fs::remove_dir_all(&work).ok();
}
