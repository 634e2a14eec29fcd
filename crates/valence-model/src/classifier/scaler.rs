//! StandardScaler: `(x - mean) / scale`, read from JSON, safetensors or a scikit-learn pickle.
//!
//! The pickle reader interprets data opcodes only. `GLOBAL`/`REDUCE`/`BUILD` are recorded as
//! inert values (a class name and its arguments) and never resolved or called, and an allow-list
//! of class names keeps anything but NumPy arrays and the scaler itself out.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandardScaler {
    pub mean: Vec<f32>,
    pub scale: Vec<f32>,
}

impl StandardScaler {
    pub fn new(mean: Vec<f32>, scale: Vec<f32>) -> Result<Self> {
        if mean.len() != scale.len() || mean.is_empty() {
            bail!(
                "scaler mean ({}) and scale ({}) must have the same non-zero length",
                mean.len(),
                scale.len()
            );
        }
        // A NaN or infinite value would turn every feature row into NaN and every window
        // into constant thirds: refuse the file instead.
        if let Some(i) = mean.iter().position(|v| !v.is_finite()) {
            bail!("scaler mean[{i}] is {} (must be finite)", mean[i]);
        }
        if let Some(i) = scale.iter().position(|v| !v.is_finite()) {
            bail!("scaler scale[{i}] is {} (must be finite)", scale[i]);
        }
        // scikit-learn replaces zero scales by 1; do the same for hand-made files.
        let scale = scale
            .into_iter()
            .map(|s| if s == 0.0 { 1.0 } else { s })
            .collect();
        Ok(Self { mean, scale })
    }

    /// Fits on rows of features (population variance, as scikit-learn).
    pub fn fit(rows: &[Vec<f32>]) -> Result<Self> {
        let n = rows.len();
        if n == 0 {
            bail!("cannot fit a scaler on no rows");
        }
        let dim = rows[0].len();
        let mut mean = vec![0f64; dim];
        for r in rows {
            for (m, &x) in mean.iter_mut().zip(r) {
                *m += x as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut var = vec![0f64; dim];
        for r in rows {
            for ((v, &x), m) in var.iter_mut().zip(r).zip(&mean) {
                *v += (x as f64 - m).powi(2);
            }
        }
        let scale = var.iter().map(|v| (v / n as f64).sqrt() as f32).collect();
        Self::new(mean.iter().map(|&m| m as f32).collect(), scale)
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    pub fn transform_vec(&self, x: &mut [f32]) {
        for ((v, m), s) in x.iter_mut().zip(&self.mean).zip(&self.scale) {
            *v = (*v - m) / s;
        }
    }

    /// Applies the scaler to [batch, dim] on the tensor's device.
    pub fn transform(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dev = x.device();
        let m = Tensor::new(self.mean.as_slice(), dev)?.to_dtype(x.dtype())?;
        let s = Tensor::new(self.scale.as_slice(), dev)?.to_dtype(x.dtype())?;
        x.broadcast_sub(&m)?.broadcast_div(&s)
    }

    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let mut m = HashMap::new();
        m.insert(
            "mean".to_string(),
            Tensor::new(self.mean.as_slice(), &Device::Cpu)?,
        );
        m.insert(
            "scale".to_string(),
            Tensor::new(self.scale.as_slice(), &Device::Cpu)?,
        );
        candle_core::safetensors::save(&m, path)?;
        Ok(())
    }

    /// Loads by extension: `.json` ({"mean": [...], "scale": [...]}), `.safetensors` (tensors
    /// `mean` and `scale`), `.pkl` (a pickled scikit-learn StandardScaler).
    pub fn load(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let r = match ext {
            "json" => {
                let s: StandardScaler =
                    serde_json::from_str(&crate::files::read_metadata_string(path)?)?;
                Self::new(s.mean, s.scale)
            }
            "safetensors" => {
                let t = candle_core::safetensors::load(path, &Device::Cpu)?;
                let v = |k: &str| -> Result<Vec<f32>> {
                    Ok(t.get(k)
                        .with_context(|| format!("no `{k}` tensor"))?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1()?)
                };
                Self::new(v("mean")?, v("scale")?)
            }
            "pkl" | "pickle" | "joblib" => {
                let bytes = crate::files::read_metadata(path)?;
                from_sklearn_pickle(&bytes)
            }
            _ => bail!("unknown scaler format (expected .json, .safetensors or .pkl)"),
        };
        r.with_context(|| format!("scaler {}", path.display()))
    }
}

/// Values a pickle stream can build without running code.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A class reference by name, never imported.
    Global(String),
    /// `callable(*args)`, recorded but never called.
    Call(Box<Value>, Vec<Value>),
    /// `obj.__setstate__(state)`, recorded.
    Built(Box<Value>, Box<Value>),
    Mark,
}

const ALLOWED_GLOBALS: &[&str] = &[
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing.data.StandardScaler",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.numeric._frombuffer",
    "numpy._core.numeric._frombuffer",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "copy_reg._reconstructor",
    "copyreg._reconstructor",
    "builtins.object",
    "__builtin__.object",
    "_codecs.encode",
];

fn parse_pickle(data: &[u8]) -> Result<Value> {
    let mut pos = 0usize;
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u64, Value> = HashMap::new();
    let take = |pos: &mut usize, n: usize| -> Result<&[u8]> {
        let s = data.get(*pos..*pos + n).context("pickle ends early")?;
        *pos += n;
        Ok(s)
    };
    fn pop_mark(stack: &mut Vec<Value>) -> Result<Vec<Value>> {
        let at = stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .context("pickle MARK missing")?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    }
    let pop = |stack: &mut Vec<Value>| stack.pop().context("pickle stack underflow");
    loop {
        let op = *take(&mut pos, 1)?.first().unwrap();
        match op {
            0x80 => {
                take(&mut pos, 1)?;
            } // PROTO
            0x95 => {
                take(&mut pos, 8)?;
            } // FRAME
            b'.' => return pop(&mut stack), // STOP
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => stack.push(Value::Int(take(&mut pos, 1)?[0] as i64)),
            b'M' => {
                let b = take(&mut pos, 2)?;
                stack.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64))
            }
            b'J' => {
                let b = take(&mut pos, 4)?;
                stack.push(Value::Int(i32::from_le_bytes(b.try_into()?) as i64))
            }
            0x8a => {
                // LONG1
                let n = take(&mut pos, 1)?[0] as usize;
                let b = take(&mut pos, n)?;
                if n > 8 {
                    bail!("pickle integer too large");
                }
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v))
            }
            b'G' => {
                let b = take(&mut pos, 8)?;
                stack.push(Value::Float(f64::from_be_bytes(b.try_into()?)))
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => u32::from_le_bytes(take(&mut pos, 4)?.try_into()?) as usize,
                    0x8c => take(&mut pos, 1)?[0] as usize,
                    _ => u64::from_le_bytes(take(&mut pos, 8)?.try_into()?) as usize,
                };
                let s = std::str::from_utf8(take(&mut pos, n)?)?.to_string();
                stack.push(Value::Str(s))
            }
            b'C' | b'B' | 0x8e | 0x96 => {
                // SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
                let n = match op {
                    b'C' => take(&mut pos, 1)?[0] as usize,
                    b'B' => u32::from_le_bytes(take(&mut pos, 4)?.try_into()?) as usize,
                    _ => u64::from_le_bytes(take(&mut pos, 8)?.try_into()?) as usize,
                };
                stack.push(Value::Bytes(take(&mut pos, n)?.to_vec()))
            }
            b')' => stack.push(Value::Tuple(vec![])),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    bail!("pickle stack underflow");
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items))
            }
            b']' => stack.push(Value::List(vec![])),
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::List(items))
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => bail!("pickle APPEND without a list"),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => bail!("pickle APPENDS without a list"),
                }
            }
            b'}' => stack.push(Value::Dict(vec![])),
            b'd' => {
                let items = pop_mark(&mut stack)?;
                let pairs = items
                    .chunks(2)
                    .filter(|c| c.len() == 2)
                    .map(|c| (c[0].clone(), c[1].clone()))
                    .collect();
                stack.push(Value::Dict(pairs))
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    _ => bail!("pickle SETITEM without a dict"),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => {
                        for c in items.chunks(2).filter(|c| c.len() == 2) {
                            d.push((c[0].clone(), c[1].clone()))
                        }
                    }
                    _ => bail!("pickle SETITEMS without a dict"),
                }
            }
            b'c' => {
                // GLOBAL "module\nname\n"
                let rest = &data[pos..];
                let mut lines = rest.splitn(3, |&b| b == b'\n');
                let m = std::str::from_utf8(lines.next().unwrap_or(&[]))?.to_string();
                let n = std::str::from_utf8(lines.next().unwrap_or(&[]))?.to_string();
                pos += m.len() + n.len() + 2;
                stack.push(global(format!("{m}.{n}"))?)
            }
            0x93 => {
                // STACK_GLOBAL
                let n = pop(&mut stack)?;
                let m = pop(&mut stack)?;
                match (m, n) {
                    (Value::Str(m), Value::Str(n)) => stack.push(global(format!("{m}.{n}"))?),
                    _ => bail!("pickle STACK_GLOBAL needs two strings"),
                }
            }
            b'R' | 0x81 => {
                // REDUCE, NEWOBJ: recorded, not called
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                let args = match args {
                    Value::Tuple(a) => a,
                    other => vec![other],
                };
                stack.push(Value::Call(Box::new(f), args))
            }
            b'b' => {
                let state = pop(&mut stack)?;
                let obj = pop(&mut stack)?;
                stack.push(Value::Built(Box::new(obj), Box::new(state)))
            }
            b'q' => {
                let k = take(&mut pos, 1)?[0] as u64;
                memo.insert(k, stack.last().context("pickle stack empty")?.clone());
            }
            b'r' => {
                let k = u32::from_le_bytes(take(&mut pos, 4)?.try_into()?) as u64;
                memo.insert(k, stack.last().context("pickle stack empty")?.clone());
            }
            0x94 => {
                // MEMOIZE
                let k = memo.len() as u64;
                memo.insert(k, stack.last().context("pickle stack empty")?.clone());
            }
            b'h' => {
                let k = take(&mut pos, 1)?[0] as u64;
                stack.push(memo.get(&k).context("pickle memo miss")?.clone())
            }
            b'j' => {
                let k = u32::from_le_bytes(take(&mut pos, 4)?.try_into()?) as u64;
                stack.push(memo.get(&k).context("pickle memo miss")?.clone())
            }
            b'0' => {
                pop(&mut stack)?;
            }
            other => bail!(
                "pickle opcode 0x{other:02x} is not supported by this data-only reader \
                 (convert the scaler to JSON: see README)"
            ),
        }
    }
}

fn global(name: String) -> Result<Value> {
    if !ALLOWED_GLOBALS.contains(&name.as_str()) {
        bail!("pickle refers to `{name}`, which a scaler file has no business naming; refusing");
    }
    Ok(Value::Global(name))
}

/// Bytes as pickled: plain bytes (protocol 3+), or protocol 2's `_codecs.encode(text, "latin1")`.
fn raw_bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::Bytes(b) => Some(b.clone()),
        Value::Call(f, args) if matches!(&**f, Value::Global(n) if n == "_codecs.encode") => {
            match (args.first(), args.get(1)) {
                (Some(Value::Str(t)), Some(Value::Str(enc)))
                    if enc == "latin1" || enc == "latin-1" =>
                {
                    t.chars().map(|c| u8::try_from(c as u32).ok()).collect()
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Turns a recorded NumPy array construction into f64 values.
fn ndarray_values(v: &Value) -> Result<Vec<f64>> {
    fn dtype_code(d: &Value) -> Option<(String, char)> {
        // numpy.dtype('f8', False, True) with BUILD state (3, '<', ...)
        match d {
            Value::Built(obj, state) => {
                let (code, _) = dtype_code(obj)?;
                let order = match &**state {
                    Value::Tuple(s) => match s.get(1) {
                        Some(Value::Str(o)) => o.chars().next().unwrap_or('<'),
                        _ => '<',
                    },
                    _ => '<',
                };
                Some((code, order))
            }
            Value::Call(_, args) => match args.first() {
                Some(Value::Str(c)) => Some((c.clone(), '<')),
                _ => None,
            },
            _ => None,
        }
    }
    let (dtype, raw) = match v {
        // _reconstruct(ndarray, (0,), b'b') + BUILD (version, shape, dtype, fortran, bytes)
        Value::Built(_, state) => match &**state {
            Value::Tuple(s) if s.len() >= 5 => (
                dtype_code(&s[2]).context("array dtype unreadable")?,
                raw_bytes(&s[4]).context("array data is not raw bytes")?,
            ),
            _ => bail!("unexpected array state"),
        },
        // _frombuffer(bytes, dtype, shape, order)
        Value::Call(_, args) if args.len() >= 2 => (
            dtype_code(&args[1]).context("array dtype unreadable")?,
            raw_bytes(&args[0]).context("array buffer is not bytes")?,
        ),
        _ => bail!("not a NumPy array"),
    };
    let (code, order) = dtype;
    let big = order == '>';
    let out = match code.as_str() {
        "f8" => raw
            .chunks_exact(8)
            .map(|c| {
                let a: [u8; 8] = c.try_into().unwrap();
                if big {
                    f64::from_be_bytes(a)
                } else {
                    f64::from_le_bytes(a)
                }
            })
            .collect(),
        "f4" => raw
            .chunks_exact(4)
            .map(|c| {
                let a: [u8; 4] = c.try_into().unwrap();
                (if big {
                    f32::from_be_bytes(a)
                } else {
                    f32::from_le_bytes(a)
                }) as f64
            })
            .collect(),
        other => bail!("unsupported array dtype {other}"),
    };
    Ok(out)
}

/// Reads `mean_` and `scale_` from a pickled `sklearn.preprocessing.StandardScaler`.
pub fn from_sklearn_pickle(bytes: &[u8]) -> Result<StandardScaler> {
    if bytes.starts_with(b"PK") {
        bail!("this is a zip archive, not a pickled scaler");
    }
    let root = parse_pickle(bytes)?;
    let state = match &root {
        Value::Built(obj, state) => {
            let is_scaler = matches!(&**obj, Value::Call(f, _)
                if matches!(&**f, Value::Global(n) if n.ends_with("StandardScaler"))
                    || matches!(&**f, Value::Global(n) if n.ends_with("_reconstructor")));
            if !is_scaler {
                bail!("the pickle does not hold a StandardScaler");
            }
            state
        }
        _ => bail!("the pickle does not hold a StandardScaler object"),
    };
    let Value::Dict(items) = &**state else {
        bail!("StandardScaler state is not a dict");
    };
    let field = |name: &str| -> Result<Option<Vec<f64>>> {
        match items.iter().find(|(k, _)| *k == Value::Str(name.into())) {
            None | Some((_, Value::None)) => Ok(None),
            Some((_, v)) => Ok(Some(ndarray_values(v).with_context(|| name.to_string())?)),
        }
    };
    let mean = field("mean_")?;
    let scale = field("scale_")?;
    let n = mean
        .as_ref()
        .or(scale.as_ref())
        .map(|v| v.len())
        .context("scaler has neither mean_ nor scale_ (not fitted?)")?;
    let mean = mean.unwrap_or_else(|| vec![0.0; n]);
    let scale = scale.unwrap_or_else(|| vec![1.0; n]);
    StandardScaler::new(
        mean.iter().map(|&x| x as f32).collect(),
        scale.iter().map(|&x| x as f32).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_refused() {
        for (m, sc) in [
            (vec![0.0, f32::NAN], vec![1.0, 1.0]),
            (vec![0.0, 1.0], vec![f32::INFINITY, 1.0]),
            (vec![f32::NEG_INFINITY], vec![1.0]),
        ] {
            let e = StandardScaler::new(m, sc).unwrap_err().to_string();
            assert!(e.contains("must be finite"), "{e}");
        }
        let ok = StandardScaler::new(vec![1.0, 2.0], vec![0.0, 2.0]).unwrap();
        assert_eq!(ok.scale, vec![1.0, 2.0]);
    }

    #[test]
    fn fit_matches_population_statistics() {
        let s = StandardScaler::fit(&[vec![1.0, 5.0], vec![3.0, 5.0]]).unwrap();
        assert_eq!(s.mean, vec![2.0, 5.0]);
        assert_eq!(s.scale, vec![1.0, 1.0]); // 2nd column has zero variance -> 1
        let mut x = vec![3.0, 6.0];
        s.transform_vec(&mut x);
        assert_eq!(x, vec![1.0, 1.0]);
    }

    #[test]
    fn refuses_code_in_pickles() {
        // cos.system('echo hi') via GLOBAL + REDUCE
        let evil = b"cos\nsystem\n(S'echo hi'\ntR.";
        let err = from_sklearn_pickle(evil).unwrap_err().to_string();
        assert!(err.contains("os.system"), "{err}");
    }

    #[test]
    fn reads_committed_sklearn_pickles() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scaler");
        for name in ["scaler_p2.pkl", "scaler_p4.pkl", "scaler_p5.pkl"] {
            let s = StandardScaler::load(&dir.join(name)).unwrap();
            let expect: StandardScaler =
                serde_json::from_str(&std::fs::read_to_string(dir.join("scaler.json")).unwrap())
                    .unwrap();
            assert_eq!(s.mean.len(), expect.mean.len(), "{name}");
            for (a, b) in s
                .mean
                .iter()
                .zip(&expect.mean)
                .chain(s.scale.iter().zip(&expect.scale))
            {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{name}: {a} vs {b}"
                );
            }
        }
    }
}
