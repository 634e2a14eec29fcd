//! A small seeded random generator: initialisation, dropout, shuffling and synthetic models
//! give the same numbers for the same seed on every machine.

use anyhow::Result;
use candle_core::{Device, Tensor};

/// A seeded normal generator (xorshift + Box-Muller): the same seed gives the same model.
pub struct SeededNormal(u64);

impl SeededNormal {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn uniform(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn sample(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub fn tensor(&mut self, shape: &[usize], std: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.sample() * std).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
}
