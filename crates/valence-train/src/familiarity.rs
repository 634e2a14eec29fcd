//! The training side of [`valence_model::classifier::familiarity`]: the training corpora's
//! centroids a model carries, and each held-out clip's distance from its own fold's training
//! corpora, so that `valence calibrate --familiarity` fits the temperature line on distances
//! measured as the shipped model will measure them.

use anyhow::{Result, bail};
use valence_model::classifier::familiarity::Familiarity;
use valence_model::classifier::scaler::StandardScaler;

use crate::training::ExtraRows;

/// Centroids per corpus of the clips' features, scaled as the head reads them.
pub fn centroids(
    x: &[Vec<f32>],
    scaler: &StandardScaler,
    corpora: &[String],
) -> Result<Familiarity> {
    let scaled: Vec<Vec<f32>> = x
        .iter()
        .map(|r| {
            let mut r = r.clone();
            scaler.transform_vec(&mut r);
            r
        })
        .collect();
    Familiarity::fit(&scaled, corpora)
}

/// Each clip's distance from the training corpora of the fold that holds it out: the scaler
/// fitted, as the trainer fits it, on the fold's training clips and their extra rows (views),
/// the centroids on its training clips.
pub fn fold_distances(
    x: &[Vec<f32>],
    extra: &ExtraRows,
    fold: &[usize],
    corpora: &[String],
) -> Result<Vec<f32>> {
    if fold.len() != x.len() || corpora.len() != x.len() {
        bail!("one fold and one corpus per clip");
    }
    let n_folds = fold.iter().max().map_or(0, |m| m + 1);
    let mut out = vec![f32::NAN; x.len()];
    for f in 0..n_folds {
        let train: Vec<usize> = (0..x.len()).filter(|&i| fold[i] != f).collect();
        if train.is_empty() || train.len() == x.len() {
            continue;
        }
        let mut rows: Vec<Vec<f32>> = train.iter().map(|&i| x[i].clone()).collect();
        rows.extend(
            (0..extra.x.len())
                .filter(|&e| fold[extra.clip[e]] != f)
                .map(|e| extra.x[e].clone()),
        );
        let scaler = StandardScaler::fit(&rows)?;
        drop(rows);
        let train_x: Vec<Vec<f32>> = train.iter().map(|&i| x[i].clone()).collect();
        let train_c: Vec<String> = train.iter().map(|&i| corpora[i].clone()).collect();
        let fam = centroids(&train_x, &scaler, &train_c)?;
        for i in (0..x.len()).filter(|&i| fold[i] == f) {
            let mut r = x[i].clone();
            scaler.transform_vec(&mut r);
            out[i] = fam.distance(&r);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_out_corpus_is_further_than_held_out_speakers_of_known_ones() {
        // Two corpora far apart in the first feature; clips of one corpus spread in the second.
        let mut rng = valence_model::rng::SeededNormal::new(3);
        let (mut x, mut corpora) = (Vec::new(), Vec::new());
        for c in 0..3 {
            for _ in 0..40 {
                x.push(vec![
                    4.0 * c as f32 + 0.3 * rng.sample(),
                    rng.sample(),
                    rng.sample(),
                ]);
                corpora.push(format!("c{c}"));
            }
        }
        let speakers_fold: Vec<usize> = (0..x.len()).map(|i| i % 4).collect();
        let corpus_fold: Vec<usize> = (0..x.len()).map(|i| i / 40).collect();
        let none = ExtraRows::default();
        let g = fold_distances(&x, &none, &speakers_fold, &corpora).unwrap();
        let l = fold_distances(&x, &none, &corpus_fold, &corpora).unwrap();
        assert!(g.iter().chain(&l).all(|d| d.is_finite() && *d >= 0.0));
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        // An outer corpus held out lies beyond the others.
        assert!(
            mean(&l[..40]) > 2.0 * mean(&g[..40]),
            "{} {}",
            mean(&l[..40]),
            mean(&g[..40])
        );
        assert!(mean(&l[80..]) > 2.0 * mean(&g[80..]));
        assert!(fold_distances(&x, &none, &speakers_fold[1..], &corpora).is_err());
    }
}
