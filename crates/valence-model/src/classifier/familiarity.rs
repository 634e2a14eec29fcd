//! Confidence that follows how familiar the speech is: a temperature that grows with the
//! distance of a window's features from the training corpora.
//!
//! A head is over-confident on speech unlike anything it was trained on (an unheard language,
//! room or microphone) and about right on new speakers of its training corpora. One fixed
//! temperature cannot serve both, so the temperature is a function of the input:
//!
//! ```text
//! d = min over training corpora c of mean_j (x_j - centroid_c,j)^2      (x: the scaled features)
//! T = clamp(exp(intercept + slope * d), MIN_TEMPERATURE, MAX_TEMPERATURE)
//! probabilities = softmax(logits / T)
//! ```
//!
//! The centroids are the means of the training clips' scaled features per corpus (written by
//! `valence train`); intercept and slope are fitted by `valence calibrate --familiarity` on
//! out-of-fold predictions of held-out speakers and held-out corpora, each with the distance
//! its own fold's training clips give. Dividing by a positive temperature never changes
//! which label wins.
//!
//! In `valence.json`:
//! ```json
//! "familiarity": {"centroids": "familiarity.safetensors",
//!                 "temperature": {"intercept": -0.5, "slope": 0.85}}
//! ```
//! Without `temperature` the centroids are only carried (the distance is still computed for
//! whoever asks, the probabilities are the head's).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The smallest and largest temperature the fitted line may give: a far-off input may not
/// flatten the probabilities to uniform, nor a near one sharpen them without bound.
pub const MIN_TEMPERATURE: f32 = 0.5;
pub const MAX_TEMPERATURE: f32 = 8.0;

/// The name of the centroid tensor ([corpora, dim] f32) in the safetensors file; its metadata
/// key `corpora` lists the corpus names, comma separated, in row order.
pub const CENTROIDS_TENSOR: &str = "centroids";

/// `valence.json`'s `familiarity` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FamiliaritySpec {
    /// The centroid file, relative to the model directory.
    pub centroids: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<FamiliarityTemperature>,
}

/// `T = exp(intercept + slope * d)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FamiliarityTemperature {
    pub intercept: f64,
    pub slope: f64,
}

impl FamiliarityTemperature {
    pub fn at(&self, distance: f32) -> f32 {
        let t = (self.intercept + self.slope * distance as f64).exp() as f32;
        if t.is_finite() {
            t.clamp(MIN_TEMPERATURE, MAX_TEMPERATURE)
        } else {
            MAX_TEMPERATURE
        }
    }
}

/// Training corpora's centroids in the head's input space, and the fitted temperature line.
#[derive(Debug, Clone, PartialEq)]
pub struct Familiarity {
    pub corpora: Vec<String>,
    /// Row-major [corpora, dim].
    pub centroids: Vec<f32>,
    pub temperature: Option<FamiliarityTemperature>,
}

impl Familiarity {
    /// Centroids of `rows` (already scaled) per group, groups in name order.
    pub fn fit(rows: &[Vec<f32>], groups: &[String]) -> Result<Self> {
        if rows.is_empty() || rows.len() != groups.len() {
            bail!("familiarity centroids need one group name per row (and at least one row)");
        }
        let dim = rows[0].len();
        if rows.iter().any(|r| r.len() != dim) {
            bail!("familiarity centroids: rows of different lengths");
        }
        let mut names: Vec<String> = groups.to_vec();
        names.sort();
        names.dedup();
        let mut sums = vec![0f64; names.len() * dim];
        let mut counts = vec![0usize; names.len()];
        for (r, g) in rows.iter().zip(groups) {
            let k = names.binary_search(g).unwrap_or(0);
            counts[k] += 1;
            for (s, v) in sums[k * dim..(k + 1) * dim].iter_mut().zip(r) {
                *s += *v as f64;
            }
        }
        let centroids = sums
            .chunks(dim)
            .zip(&counts)
            .flat_map(|(s, &n)| s.iter().map(move |v| (v / n as f64) as f32))
            .collect();
        Self::new(names, centroids, dim, None)
    }

    pub fn new(
        corpora: Vec<String>,
        centroids: Vec<f32>,
        dim: usize,
        temperature: Option<FamiliarityTemperature>,
    ) -> Result<Self> {
        if corpora.is_empty() || dim == 0 || centroids.len() != corpora.len() * dim {
            bail!(
                "familiarity: {} centroid values for {} corpora of {dim} features",
                centroids.len(),
                corpora.len()
            );
        }
        if centroids.iter().any(|v| !v.is_finite()) {
            bail!("familiarity: a centroid value is not finite");
        }
        if let Some(t) = temperature
            && !(t.intercept.is_finite() && t.slope.is_finite())
        {
            bail!("familiarity: the temperature's intercept and slope must be finite");
        }
        Ok(Self {
            corpora,
            centroids,
            temperature,
        })
    }

    /// Features per centroid.
    pub fn dim(&self) -> usize {
        self.centroids.len() / self.corpora.len()
    }

    /// The mean squared difference from the nearest centroid (0 at a centroid).
    pub fn distance(&self, x: &[f32]) -> f32 {
        self.centroids
            .chunks(self.dim())
            .map(|c| {
                let s: f32 = c.iter().zip(x).map(|(a, b)| (b - a) * (b - a)).sum();
                s / self.dim() as f32
            })
            .fold(f32::INFINITY, f32::min)
    }

    /// The temperature for `x`: 1 without a fitted line.
    pub fn temperature_for(&self, x: &[f32]) -> f32 {
        self.temperature.map_or(1.0, |t| t.at(self.distance(x)))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes: Vec<u8> = self
            .centroids
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let shape = vec![self.corpora.len(), self.dim()];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)?;
        let meta = HashMap::from([("corpora".to_string(), self.corpora.join(","))]);
        let data = safetensors::tensor::serialize([(CENTROIDS_TENSOR, view)], Some(meta))
            .with_context(|| format!("cannot serialise {}", path.display()))?;
        std::fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Reads the centroids of `spec` from `dir` and checks them against the head's input width.
    pub fn load(dir: &Path, spec: &FamiliaritySpec, dim: usize) -> Result<Self> {
        let path = dir.join(&spec.centroids);
        let what = || format!("familiarity centroids {}", path.display());
        let bytes = crate::files::read_metadata(&path).with_context(what)?;
        let st = safetensors::SafeTensors::deserialize(&bytes).with_context(what)?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).with_context(what)?;
        let view = st
            .tensor(CENTROIDS_TENSOR)
            .with_context(|| format!("{}: no `{CENTROIDS_TENSOR}` tensor", what()))?;
        let (rows, cols) = match (view.dtype(), view.shape()) {
            (safetensors::Dtype::F32, &[r, c]) => (r, c),
            (d, shape) => bail!("{}: centroids are {d:?} {shape:?}, not 2-d f32", what()),
        };
        if cols != dim {
            bail!(
                "{}: centroids of {cols} features, the head reads {dim}",
                what()
            );
        }
        let corpora: Vec<String> = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("corpora"))
            .map(|s| s.split(',').map(str::to_string).collect())
            .unwrap_or_else(|| (0..rows).map(|i| format!("corpus {i}")).collect());
        if corpora.len() != rows {
            bail!(
                "{}: {} corpus names for {rows} centroids",
                what(),
                corpora.len()
            );
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Self::new(corpora, values, dim, spec.temperature).with_context(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(std::path::PathBuf);
    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn two_corpora() -> Familiarity {
        let rows = vec![
            vec![0.0, 0.0],
            vec![2.0, 0.0],
            vec![10.0, 10.0],
            vec![10.0, 12.0],
        ];
        let groups: Vec<String> = ["b", "b", "a", "a"].iter().map(|s| s.to_string()).collect();
        Familiarity::fit(&rows, &groups).unwrap()
    }

    #[test]
    fn centroids_are_group_means_in_name_order() {
        let f = two_corpora();
        assert_eq!(f.corpora, ["a", "b"]);
        assert_eq!(f.centroids, [10.0, 11.0, 1.0, 0.0]);
        // Nearest centroid (1, 0): ((3-1)^2 + (0-0)^2) / 2.
        assert_eq!(f.distance(&[3.0, 0.0]), 2.0);
        assert_eq!(f.distance(&[10.0, 11.0]), 0.0);
    }

    #[test]
    fn temperature_grows_with_distance_and_is_bounded() {
        let mut f = two_corpora();
        assert_eq!(f.temperature_for(&[50.0, 50.0]), 1.0, "no line fitted: T 1");
        f.temperature = Some(FamiliarityTemperature {
            intercept: -0.5,
            slope: 0.5,
        });
        let near = f.temperature_for(&[1.0, 0.0]);
        let mid = f.temperature_for(&[3.0, 0.0]);
        assert!((near - (-0.5f32).exp()).abs() < 1e-6, "{near}");
        assert!((mid - 0.5f32.exp()).abs() < 1e-6, "{mid}");
        assert_eq!(f.temperature_for(&[1e3, 1e3]), MAX_TEMPERATURE);
        f.temperature = Some(FamiliarityTemperature {
            intercept: -10.0,
            slope: 0.0,
        });
        assert_eq!(f.temperature_for(&[1.0, 0.0]), MIN_TEMPERATURE);
    }

    #[test]
    fn saved_centroids_load_and_bad_files_are_refused() {
        let dir = TempDir(
            std::env::temp_dir().join(format!("valence-familiarity-{}", std::process::id())),
        );
        std::fs::create_dir_all(dir.path()).unwrap();
        let f = two_corpora();
        f.save(&dir.path().join("familiarity.safetensors")).unwrap();
        let spec = FamiliaritySpec {
            centroids: "familiarity.safetensors".into(),
            temperature: Some(FamiliarityTemperature {
                intercept: 0.1,
                slope: 0.2,
            }),
        };
        let back = Familiarity::load(dir.path(), &spec, 2).unwrap();
        assert_eq!(back.corpora, f.corpora);
        assert_eq!(back.centroids, f.centroids);
        assert_eq!(back.temperature, spec.temperature);

        let e = Familiarity::load(dir.path(), &spec, 3).unwrap_err();
        assert!(format!("{e:#}").contains("the head reads 3"), "{e:#}");
        let missing = FamiliaritySpec {
            centroids: "nope.safetensors".into(),
            temperature: None,
        };
        let e = Familiarity::load(dir.path(), &missing, 2).unwrap_err();
        assert!(format!("{e:#}").contains("nope.safetensors"), "{e:#}");
        std::fs::write(
            dir.path().join("bad.safetensors"),
            b"not a safetensors file",
        )
        .unwrap();
        let bad = FamiliaritySpec {
            centroids: "bad.safetensors".into(),
            temperature: None,
        };
        assert!(Familiarity::load(dir.path(), &bad, 2).is_err());
        let nan = Familiarity::new(vec!["a".into()], vec![f32::NAN, 0.0], 2, None);
        assert!(nan.is_err());
    }
}
