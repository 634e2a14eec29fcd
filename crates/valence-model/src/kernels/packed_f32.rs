//! f32 products `x W^T` with the weights packed once at load into 16-column panels (for every
//! input, the panel's 16 weights side by side), so no product repacks them: the `gemm` crate
//! packs its operands on every call (~11 % of an f32 Whisper pass under perf), which weighs
//! most on small products like Whisper's 150-row windows. AVX2 + FMA tiles of up to 6 rows;
//! each output accumulates its inputs in order with fused multiply-adds, so the scalar twin
//! ([`product_plain`]) gives the same bits.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

use super::SyncPtr;
use super::dense::{projection_input, projection_output};

const PANEL: usize = 16;
/// The most weights a packed projection has: larger ones (xlsr's 1024 x 3072 and 4096 x 1024)
/// outgrow the L2 cache, where the `gemm` crate's blocking beats these tiles (6-9 % on a
/// 499 x 1024 x 3072 product; Whisper's 150-row products run 25-55 % faster packed).
pub const PACK_LIMIT: usize = 1 << 21;
/// Rows per task: tasks are (row chunk, panel) pairs on candle's pool.
const ROW_CHUNK: usize = 120;
const TILE_ROWS: usize = 6;
/// Inputs per block: 512 x 16 weights (32 KiB) stay in L1 across the row tiles.
const K_BLOCK: usize = 512;

/// `W` [n, k] as panels of 16 output columns: panel p holds, for each input kk, the weights
/// `W[p * 16 + j][kk]` for j in 0..16 (zero past n).
#[derive(Debug, Clone)]
pub struct PackedF32 {
    pub n: usize,
    pub k: usize,
    panels: usize,
    data: Vec<f32>,
}

impl PackedF32 {
    /// From `weight` [n, k] row-major (PyTorch's `Linear.weight`).
    pub fn pack(weight: &[f32], n: usize, k: usize) -> candle_core::Result<Self> {
        if weight.len() != n * k || n == 0 || k == 0 {
            candle_core::bail!("packing {} weights as {n} x {k}", weight.len());
        }
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0f32; panels * k * PANEL];
        for (j, row) in weight.chunks(k).enumerate() {
            let (p, lane) = (j / PANEL, j % PANEL);
            for (kk, &v) in row.iter().enumerate() {
                data[(p * k + kk) * PANEL + lane] = v;
            }
        }
        Ok(Self { n, k, panels, data })
    }

    /// The weights back as [n, k] row-major (to quantize them).
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        for (j, row) in w.chunks_mut(self.k).enumerate() {
            let (p, lane) = (j / PANEL, j % PANEL);
            for (kk, v) in row.iter_mut().enumerate() {
                *v = self.data[(p * self.k + kk) * PANEL + lane];
            }
        }
        w
    }

    /// Whether a projection of `n` outputs from `k` inputs runs packed on this CPU.
    pub fn worth_packing(n: usize, k: usize) -> bool {
        Self::runs_here() && n * k <= PACK_LIMIT
    }

    /// Whether this CPU runs the packed kernel (AVX2 and FMA).
    pub fn runs_here() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// `x [m, k] W^T` as a new [m, n] vector, on candle's pool. Panics unless [`PackedF32::runs_here`].
pub fn product(x: &[f32], m: usize, w: &PackedF32) -> Vec<f32> {
    assert!(
        PackedF32::runs_here(),
        "the packed f32 kernel needs AVX2 and FMA"
    );
    assert_eq!(x.len(), m * w.k, "activations of {m} rows of {}", w.k);
    let len = m * w.n;
    let mut dst: Vec<f32> = Vec::with_capacity(len);
    let out = SyncPtr(dst.as_mut_ptr());
    let chunks = m.div_ceil(ROW_CHUNK);
    let run = |tasks: std::ops::Range<usize>| {
        for task in tasks {
            let (chunk, panel) = (task / w.panels, task % w.panels);
            let rows = chunk * ROW_CHUNK..((chunk + 1) * ROW_CHUNK).min(m);
            // SAFETY: each task writes its own rows' cells of its own panel's columns of the
            // m x n buffer, which outlives the pool call; AVX2 and FMA are present (asserted).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                panel_rows(x, w, panel, rows, out)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (rows, panel, out);
        }
    };
    let tasks = chunks * w.panels;
    if tasks <= 1 {
        run(0..tasks);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(tasks, run);
    }
    // SAFETY: the tasks wrote every cell: all row chunks times all panels, each tile row's
    // columns of its panel.
    unsafe { dst.set_len(len) };
    dst
}

/// One panel's columns for `rows`: inputs in blocks of [`K_BLOCK`] (the block's slice of the
/// panel stays in L1 while every row tile passes over it), each row tile carrying its sums
/// from block to block, so every output still adds its inputs in order.
///
/// # Safety
/// AVX2 and FMA are present; `out` is a live [x rows, w.n] buffer whose cells (rows, this
/// panel's columns) no one else touches.
#[cfg(target_arch = "x86_64")]
unsafe fn panel_rows(
    x: &[f32],
    w: &PackedF32,
    panel: usize,
    rows: std::ops::Range<usize>,
    out: SyncPtr,
) {
    let cols = PANEL.min(w.n - panel * PANEL);
    let mut tile = [[0f32; PANEL]; TILE_ROWS];
    for k0 in (0..w.k).step_by(K_BLOCK) {
        let kc = K_BLOCK.min(w.k - k0);
        let mut row = rows.start;
        while row < rows.end {
            let r = TILE_ROWS.min(rows.end - row);
            // SAFETY: rows row..row + r and this panel's columns are this task's cells; the
            // block's inputs lie within each row and the panel.
            unsafe {
                let dst = |i: usize| out.get().add((row + i) * w.n + panel * PANEL);
                if k0 > 0 {
                    for (i, t) in tile[..r].iter_mut().enumerate() {
                        std::ptr::copy_nonoverlapping(dst(i), t.as_mut_ptr(), cols);
                    }
                }
                let xs = x.as_ptr().add(row * w.k + k0);
                let p = w.data.as_ptr().add((panel * w.k + k0) * PANEL);
                let first = k0 == 0;
                match r {
                    1 => tile_fma::<1>(xs, w.k, kc, p, &mut tile, first),
                    2 => tile_fma::<2>(xs, w.k, kc, p, &mut tile, first),
                    3 => tile_fma::<3>(xs, w.k, kc, p, &mut tile, first),
                    4 => tile_fma::<4>(xs, w.k, kc, p, &mut tile, first),
                    5 => tile_fma::<5>(xs, w.k, kc, p, &mut tile, first),
                    6 => tile_fma::<6>(xs, w.k, kc, p, &mut tile, first),
                    _ => unreachable!("tile of {r} rows"),
                }
                for (i, t) in tile[..r].iter().enumerate() {
                    if cols == PANEL {
                        std::ptr::write_unaligned(dst(i) as *mut [f32; PANEL], *t);
                    } else {
                        std::ptr::copy_nonoverlapping(t.as_ptr(), dst(i), cols);
                    }
                }
            }
            row += r;
        }
    }
}

/// `x [.., k] W^T + bias` (then the erf GELU when `gelu`) as a candle op on f32 CPU tensors.
pub struct PackedF32Product<'a> {
    pub weights: &'a PackedF32,
    pub bias: &'a [f32],
    pub gelu: bool,
}

impl CustomOp1 for PackedF32Product<'_> {
    fn name(&self) -> &'static str {
        "packed-f32-product"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (k, n) = (self.weights.k, self.weights.n);
        let x = projection_input(self.name(), storage, layout, (k, n), Some(self.bias))?;
        let dst = product(x, x.len() / k, self.weights);
        Ok(projection_output(
            dst,
            layout.dims(),
            n,
            Some(self.bias),
            self.gelu,
        ))
    }
}

/// The twin: each output is its inputs' fused multiply-adds in order, as the kernel's lanes do.
pub fn product_plain(x: &[f32], m: usize, w: &PackedF32) -> Vec<f32> {
    let mut dst = vec![0f32; m * w.n];
    for i in 0..m {
        for j in 0..w.n {
            let (p, lane) = (j / PANEL, j % PANEL);
            let mut acc = 0f32;
            for kk in 0..w.k {
                acc = x[i * w.k + kk].mul_add(w.data[(p * w.k + kk) * PANEL + lane], acc);
            }
            dst[i * w.n + j] = acc;
        }
    }
    dst
}

/// `R` rows of `x` (rows `stride` apart) times `kc` inputs of one panel, into `tile`'s first
/// `R` rows, starting from zero when `first` and from the tile's sums otherwise.
///
/// # Safety
/// AVX2 and FMA are present; `x` holds `R` rows with `kc` values each, `panel` `kc * 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_fma<const R: usize>(
    x: *const f32,
    stride: usize,
    kc: usize,
    panel: *const f32,
    tile: &mut [[f32; PANEL]; TILE_ROWS],
    first: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    if !first {
        for (a, t) in acc.iter_mut().zip(tile.iter()) {
            // SAFETY: each tile row holds 16 floats.
            unsafe {
                a[0] = _mm256_loadu_ps(t.as_ptr());
                a[1] = _mm256_loadu_ps(t.as_ptr().add(8));
            }
        }
    }
    for kk in 0..kc {
        // SAFETY: kk < kc: within the panel's block and within each of the R rows.
        unsafe {
            let b0 = _mm256_loadu_ps(panel.add(kk * PANEL));
            let b1 = _mm256_loadu_ps(panel.add(kk * PANEL + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*x.add(r * stride + kk));
                a[0] = _mm256_fmadd_ps(xv, b0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, b1, a[1]);
            }
        }
    }
    for (t, a) in tile.iter_mut().zip(&acc) {
        // SAFETY: each tile row holds 16 floats.
        unsafe {
            _mm256_storeu_ps(t.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(t.as_mut_ptr().add(8), a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// The kernel against its twin, bit for bit, on shapes with partial tiles, chunks and panels.
    #[test]
    fn packed_product_equals_its_twin() {
        if !PackedF32::runs_here() {
            eprintln!("SKIPPED: no AVX2 and FMA on this CPU");
            return;
        }
        for (m, n, k) in [
            (1usize, 1usize, 1usize),
            (7, 17, 5),
            (150, 48, 64),
            (241, 40, 33),
            (13, 20, 1100),
        ] {
            let w = values(n * k, (m + n + k) as u64);
            let x = values(m * k, 3 + k as u64);
            let packed = PackedF32::pack(&w, n, k).unwrap();
            let want = product_plain(&x, m, &packed);
            let got = product(&x, m, &packed);
            for (i, (g, t)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    t.to_bits(),
                    "({m}, {n}, {k}) at {i}: {g} vs {t}"
                );
            }
            assert_eq!(packed.unpack(), w);
            // And the twin is the product itself: W's rows against x's rows.
            for (i, t) in want.iter().enumerate() {
                let (r, j) = (i / n, i % n);
                let exact: f64 = (0..k)
                    .map(|kk| x[r * k + kk] as f64 * w[j * k + kk] as f64)
                    .sum();
                assert!(
                    (*t as f64 - exact).abs() < 1e-5 * k as f64,
                    "{t} vs {exact}"
                );
            }
        }
    }
}
