//! 8-bit products `x W^T + b` on the CPU, the encoders' quantized path.
//!
//! - Weights are quantized once, at load, to signed 7-bit values (`-63..=63`, stored in bytes)
//!   with one scale per output column and block of [`K_BLOCK`] inputs, and packed in panels of
//!   16 columns x 4 inputs: one 256-bit load (two for AVX2) per four inputs of a panel.
//! - Activations are quantized once per product to 7 bits per row and block (`-63..=63`,
//!   stored plus 64 as unsigned bytes).
//! - Each block's dot products accumulate exactly in i32 (`vpdpbusd` with AVX512-VNNI or
//!   AVX-VNNI; `vpmaddubsw` + `vpmaddwd` with AVX2), then are scaled and added in f32.
//!
//! Why 7 bits on both sides: `vpmaddubsw` adds two u8 x i8 products into a *saturating* i16.
//! With bytes at most 127 and weights at most 63 in magnitude even the sum of two such pairs is
//! at most 32 004, so AVX2 adds two `vpmaddubsw` results before widening them (one `vpmaddwd`
//! per eight inputs instead of per four: AVX2 CPUs have no VNNI, and the widening was a third of
//! their multiply instructions) and still never saturates: every kernel computes the same
//! integers, and the float steps after each block are the same operations in the same order, so
//! all kernels (and the plain twin) give bit-identical results on every CPU. Per-block scales
//! keep an outlier from coarsening a whole row.
//!
//! Twin: [`matmul_plain`], scalar integer loops over the unpacked values; tests require equality.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

use super::SyncPtr;
use super::dense::{projection_input, projection_output};

/// Inputs per scale block. Whisper's and Wav2Vec2's widths (512, 768, 1024, 1536, 2048, 3072,
/// 4096) are multiples; other widths end with a shorter block.
pub const K_BLOCK: usize = 256;
/// Bits per packed weight, sign included (`-63..=63`).
pub const WEIGHT_BITS: u32 = 7;
/// Output columns per packed panel.
const PANEL: usize = 16;
const ACT_MAX: f32 = 63.0;
const ACT_OFFSET: u8 = 64;
/// 7-bit weights: four products of an activation byte (at most 127) and a weight sum to at most
/// 32 004 in magnitude, so AVX2 can add two `vpmaddubsw` results in i16 (see `tile_avx2`).
const W_MAX: f32 = ((1 << (WEIGHT_BITS - 1)) - 1) as f32;
/// Rows a task works through before its panels' weights are read again (activations of this
/// many rows stay in L2 while the panels stream past).
const ROW_CHUNK: usize = 120;
/// Weights larger than this (xlsr's projections, 1-4 MB) do not stay in L2 from one row chunk
/// to the next, so their products take as few chunks as [`CHUNK_ACTIVATION_BYTES`] allows and
/// stream the weights from memory once per chunk. Smaller ones (Whisper's) keep 120-row chunks,
/// whose smaller tasks share out better between the threads.
const CACHED_WEIGHT_BYTES: usize = 2 << 20;
/// The activations of one large-weight row chunk (half an L2 of the CPUs measured).
const CHUNK_ACTIVATION_BYTES: usize = 1 << 20;
/// Row chunks are whole tiles of every kernel (4, 6 or 8 rows).
const CHUNK_TILE: usize = 24;

/// Rows per chunk of a product of `m` rows of `row_bytes` activations with `weight_bytes` of
/// weights.
fn row_chunk(m: usize, row_bytes: usize, weight_bytes: usize) -> usize {
    if weight_bytes <= CACHED_WEIGHT_BYTES {
        return ROW_CHUNK;
    }
    let most = (CHUNK_ACTIVATION_BYTES / row_bytes.max(1)).max(CHUNK_TILE);
    let chunks = m.div_ceil(most).max(1);
    m.div_ceil(chunks).div_ceil(CHUNK_TILE) * CHUNK_TILE
}

/// Which 8-bit kernel runs, chosen once per CPU ([`Int8Kernel::detect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    Avx512Vnni,
    AvxVnni,
    Avx2,
    /// Scalar loops: correct anywhere, far slower than f32 (loaders keep f32 weights where
    /// this is the only kernel).
    Plain,
}

impl Int8Kernel {
    /// The fastest kernel this CPU runs, capped at `limit` (e.g. AVX2 to measure what an
    /// AVX2-only CPU does on a newer one).
    pub fn detect(limit: Option<Self>) -> Self {
        [Self::Avx512Vnni, Self::AvxVnni, Self::Avx2]
            .into_iter()
            .filter(|k| limit.is_none_or(|cap| k.rank() <= cap.rank()))
            .find(|k| k.runs_here())
            .unwrap_or(Self::Plain)
    }

    /// Whether this CPU has the kernel's instructions (AVX512-VNNI does not imply AVX-VNNI).
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            match self {
                Self::Avx512Vnni => {
                    avx2 && std::is_x86_feature_detected!("avx512f")
                        && std::is_x86_feature_detected!("avx512bw")
                        && std::is_x86_feature_detected!("avx512vnni")
                }
                Self::AvxVnni => avx2 && std::is_x86_feature_detected!("avxvnni"),
                Self::Avx2 => avx2,
                Self::Plain => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Self::Plain
        }
    }

    /// Whether this kernel is `other` or a lesser one.
    pub fn rank_at_most(self, other: Self) -> bool {
        self.rank() <= other.rank()
    }

    /// "avx2", "avx-vnni", "avx512-vnni" or "plain" (what [`Int8Kernel::parse`] reads).
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Avx512Vnni => "avx512-vnni",
            Self::AvxVnni => "avx-vnni",
            Self::Avx2 => "avx2",
            Self::Plain => "plain",
        }
    }

    fn rank(self) -> u8 {
        match self {
            Self::Plain => 0,
            Self::Avx2 => 1,
            Self::AvxVnni => 2,
            Self::Avx512Vnni => 3,
        }
    }

    /// Whether this kernel beats the f32 product (only the scalar one does not).
    pub fn is_fast(self) -> bool {
        self != Self::Plain
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512Vnni => "int8 AVX512-VNNI (vpdpbusd)",
            Self::AvxVnni => "int8 AVX-VNNI (vpdpbusd)",
            Self::Avx2 => "int8 AVX2 (vpmaddubsw)",
            Self::Plain => "int8 scalar",
        }
    }

    /// Parses `avx512-vnni`, `avx-vnni`, `avx2` or `plain`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "avx512-vnni" | "avx512_vnni" => Some(Self::Avx512Vnni),
            "avx-vnni" | "avx_vnni" => Some(Self::AvxVnni),
            "avx2" => Some(Self::Avx2),
            "plain" | "scalar" => Some(Self::Plain),
            _ => None,
        }
    }
}

/// Where the weight of output `j` and input `kk` lies in [`PackedWeights`]'s data:
/// [panel][k4 / 4][PANEL][4].
#[inline(always)]
fn packed_index(k4: usize, j: usize, kk: usize) -> usize {
    (j / PANEL) * k4 * PANEL + (kk / 4) * PANEL * 4 + (j % PANEL) * 4 + kk % 4
}

/// The block `b` of a `k4`-wide row: its first and one-past-last input.
fn block_range(b: usize, k4: usize) -> (usize, usize) {
    (b * K_BLOCK, ((b + 1) * K_BLOCK).min(k4))
}

/// A weight matrix [n, k] (PyTorch's [out, in]) quantized and packed for [`matmul`].
#[derive(Debug, Clone)]
pub struct PackedWeights {
    n: usize,
    k: usize,
    /// `k` rounded up to a multiple of 4 (the padding weights are zero).
    k4: usize,
    blocks: usize,
    panels: usize,
    /// [panel][k4 / 4][PANEL][4]
    data: Vec<i8>,
    /// [panel][block][PANEL]
    scales: Vec<f32>,
    /// [panel][block][PANEL]: 64 x the block's weights of the column summed; the kernels add
    /// the activations' +64 in every product and take it out here.
    offset_sums: Vec<i32>,
}

impl PackedWeights {
    /// Quantizes and packs `weight` ([n, k] row-major). Weights must be finite.
    pub fn pack(weight: &[f32], n: usize, k: usize) -> candle_core::Result<Self> {
        if weight.len() != n * k || n == 0 || k == 0 {
            candle_core::bail!("cannot pack {} weights as a {n} x {k} matrix", weight.len());
        }
        if let Some(bad) = weight.iter().position(|w| !w.is_finite()) {
            candle_core::bail!("weight {bad} of a {n} x {k} matrix is not finite");
        }
        let k4 = k.div_ceil(4) * 4;
        let blocks = k4.div_ceil(K_BLOCK);
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0i8; panels * k4 * PANEL];
        let mut scales = vec![0f32; panels * blocks * PANEL];
        let mut offset_sums = vec![0i32; panels * blocks * PANEL];
        for (j, row) in weight.chunks_exact(k).enumerate() {
            let (panel, lane) = (j / PANEL, j % PANEL);
            for b in 0..blocks {
                let (start, end) = block_range(b, k4);
                let vals = &row[start.min(k)..end.min(k)];
                let max_abs = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                let (scale, inv) = scale_and_inverse(max_abs, W_MAX);
                let slot = (panel * blocks + b) * PANEL + lane;
                scales[slot] = scale;
                let mut sum = 0i32;
                for (i, &v) in vals.iter().enumerate() {
                    let q = quantize_value(v, inv, W_MAX) as i8;
                    let kk = start + i;
                    data[packed_index(k4, j, kk)] = q;
                    sum += q as i32;
                }
                offset_sums[slot] = ACT_OFFSET as i32 * sum;
            }
        }
        Ok(Self {
            n,
            k,
            k4,
            blocks,
            panels,
            data,
            scales,
            offset_sums,
        })
    }

    /// The quantized weight of output `j` and input `kk` (the twin reads weights through this).
    fn weight_at(&self, j: usize, kk: usize) -> i8 {
        self.data[packed_index(self.k4, j, kk)]
    }

    fn scale_at(&self, j: usize, b: usize) -> f32 {
        self.scales[((j / PANEL) * self.blocks + b) * PANEL + j % PANEL]
    }

    /// The dequantized matrix [n, k] (what the tests compare with the weights).
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        for j in 0..self.n {
            for kk in 0..self.k {
                out[j * self.k + kk] =
                    self.weight_at(j, kk) as f32 * self.scale_at(j, kk / K_BLOCK);
            }
        }
        out
    }
}

/// The scale that maps `max_abs` to `limit`, and its inverse (0 for an all-zero block).
/// A block whose largest value is subnormal quantizes to zeros (its inverse would overflow).
fn scale_and_inverse(max_abs: f32, limit: f32) -> (f32, f32) {
    let inv = limit / max_abs;
    if max_abs > 0.0 && inv.is_finite() {
        (max_abs / limit, inv)
    } else {
        (0.0, 0.0)
    }
}

/// `v * inv` rounded to the nearest integer (ties to even) within `±limit`; NaN gives 0.
/// Adding and removing 1.5 * 2^23 rounds a value of magnitude below 2^22 to an integer in the
/// default rounding mode, ties to even, as `round_ties_even` and `vcvtps2dq` do; written out
/// because `round_ties_even` is a libm call (`rintf`) on baseline x86-64, which made packing
/// the weights at load take longer than everything else in it.
#[inline(always)]
fn quantize_value(v: f32, inv: f32, limit: f32) -> i32 {
    const ROUND: f32 = 12_582_912.0;
    ((v * inv).clamp(-limit, limit) + ROUND - ROUND) as i32
}

/// A product's activations [m, k] quantized for [`matmul`].
#[derive(Debug, Clone)]
pub struct QuantizedRows {
    m: usize,
    k4: usize,
    blocks: usize,
    /// [m][k4], each value + 64 (padding: 64, i.e. zero).
    data: Vec<u8>,
    /// [m][blocks]
    scales: Vec<f32>,
}

/// Quantizes `x` ([m, k] row-major), vectorised where the CPU has AVX2.
pub fn quantize_rows(x: &[f32], m: usize, k: usize) -> QuantizedRows {
    quantize_strided_rows(x, m, k, k)
}

/// Quantizes `m` rows of `k` values starting `row_stride` apart in `x` (rows may overlap: a
/// convolution's windows over channels-last frames, read in place).
pub fn quantize_strided_rows(x: &[f32], m: usize, k: usize, row_stride: usize) -> QuantizedRows {
    assert!(
        m == 0 || (m - 1) * row_stride + k <= x.len(),
        "{m} rows of {k} values {row_stride} apart do not fit in {} values",
        x.len()
    );
    let k4 = k.div_ceil(4) * 4;
    let blocks = k4.div_ceil(K_BLOCK);
    let mut q = QuantizedRows {
        m,
        k4,
        blocks,
        data: vec![ACT_OFFSET; m * k4],
        scales: vec![0f32; m * blocks],
    };
    quantize_rows_into(x, k, row_stride, &mut q);
    q
}

/// Row `i` of `m` rows of `k` values `row_stride` apart.
#[inline(always)]
fn row_at(x: &[f32], i: usize, k: usize, row_stride: usize) -> &[f32] {
    &x[i * row_stride..i * row_stride + k]
}

fn quantize_rows_into(x: &[f32], k: usize, row_stride: usize, q: &mut QuantizedRows) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        unsafe { simd::quantize_rows_avx2(x, k, row_stride, q) };
        return;
    }
    quantize_rows_scalar(x, k, row_stride, q);
}

fn quantize_rows_scalar(x: &[f32], k: usize, row_stride: usize, q: &mut QuantizedRows) {
    let (k4, blocks) = (q.k4, q.blocks);
    for ((row, dst), scales) in (0..q.m)
        .map(|i| row_at(x, i, k, row_stride))
        .zip(q.data.chunks_exact_mut(k4))
        .zip(q.scales.chunks_exact_mut(blocks))
    {
        for (b, scale) in scales.iter_mut().enumerate() {
            let (start, end) = block_range(b, k4);
            let vals = &row[start.min(k)..end.min(k)];
            let (s, inv) = scale_and_inverse(lane_max_abs(vals), ACT_MAX);
            *scale = s;
            quantize_into(vals, inv, &mut dst[start..]);
        }
    }
}

/// `vals` quantized with `inv` into `dst`, + 64 (the scalar steps every quantizer shares).
#[inline(always)]
fn quantize_into(vals: &[f32], inv: f32, dst: &mut [u8]) {
    for (d, &v) in dst.iter_mut().zip(vals) {
        *d = (quantize_value(v, inv, ACT_MAX) + ACT_OFFSET as i32) as u8;
    }
}

/// The largest magnitude, lane-wise so that it vectorises (NaN is skipped, as `f32::max` does).
#[inline(always)]
fn lane_max_abs(xs: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x.abs());
        }
    }
    let tail = chunks.remainder().iter().fold(0f32, |m, x| m.max(x.abs()));
    lanes.iter().fold(tail, |m, &l| m.max(l))
}

/// `dst [m, n] = x W^T` for quantized `x` [m, k] and packed `w` [n, k], with `kernel` (the
/// scalar one if this CPU lacks its instructions; all give the same values). Tasks of (row
/// chunk, panel) run on candle's CPU pool.
pub fn matmul(x: &QuantizedRows, w: &PackedWeights, dst: &mut [f32], kernel: Int8Kernel) {
    assert_eq!(dst.len(), x.m * w.n, "destination size");
    // SAFETY: `dst` holds the m x n cells.
    unsafe { matmul_into(x, w, dst.as_mut_ptr(), kernel) }
}

/// [`matmul`] into a new vector, never zeroed first: the product writes every cell, and
/// zeroing megabytes of outputs per window was ~2 % of the default model's time.
pub fn product(x: &QuantizedRows, w: &PackedWeights, kernel: Int8Kernel) -> Vec<f32> {
    let len = x.m * w.n;
    let mut dst = Vec::with_capacity(len);
    // SAFETY: the spare capacity holds `len` cells, and `matmul_into` writes every one of
    // them (each row chunk and panel once, every row and column) before the length is set.
    unsafe {
        matmul_into(x, w, dst.as_mut_ptr(), kernel);
        dst.set_len(len);
    }
    dst
}

/// # Safety
/// `dst` is valid for writes of `x.m * w.n` floats, and nothing else touches them meanwhile.
unsafe fn matmul_into(x: &QuantizedRows, w: &PackedWeights, dst: *mut f32, kernel: Int8Kernel) {
    let kernel = if kernel.runs_here() {
        kernel
    } else {
        Int8Kernel::Plain
    };
    assert_eq!(x.k4, w.k4, "activations and weights differ in width");
    let row_chunk = row_chunk(x.m, x.k4, w.data.len());
    let row_chunks = x.m.div_ceil(row_chunk);
    let out = SyncPtr(dst);
    // AVX-512 has registers for two panels at once: each broadcast of activations then
    // feeds twice the products (the loads, not the multiplies, limit one panel).
    let group = if kernel == Int8Kernel::Avx512Vnni {
        2
    } else {
        1
    };
    let groups = w.panels.div_ceil(group);
    let run = |tasks: std::ops::Range<usize>| {
        for task in tasks {
            let (chunk, g) = (task / groups, task % groups);
            let rows = chunk * row_chunk..((chunk + 1) * row_chunk).min(x.m);
            let first = g * group;
            // SAFETY: each task writes the columns of its own panels in its own rows of `dst`,
            // which lives until `execute_chunked` returns; the kernel matches this CPU.
            unsafe {
                if group == 2 && first + 1 < w.panels {
                    #[cfg(target_arch = "x86_64")]
                    panel_pair_rows(x, w, first, rows, out);
                } else {
                    for panel in first..(first + group).min(w.panels) {
                        panel_rows(x, w, panel, rows.clone(), out, kernel);
                    }
                }
            }
        }
    };
    let tasks = row_chunks * groups;
    if tasks <= 1 {
        run(0..tasks);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(tasks, run);
    }
}

/// Panels `first` and `first + 1` for `rows` with AVX512-VNNI, 8 rows at a time.
///
/// # Safety
/// As [`panel_rows`], for both panels; the CPU has AVX512-VNNI.
#[cfg(target_arch = "x86_64")]
unsafe fn panel_pair_rows(
    x: &QuantizedRows,
    w: &PackedWeights,
    first: usize,
    rows: std::ops::Range<usize>,
    out: SyncPtr,
) {
    // The first panel is whole (another follows it); the second may be the last, partial one.
    let cols = PANEL + PANEL.min(w.n - (first + 1) * PANEL);
    // SAFETY: forwarded.
    unsafe {
        tile_rows::<{ 2 * PANEL }>(rows, 8, first * PANEL, cols, w.n, out, |row, r, tile| {
            macro_rules! rows_of {
                ($($n:literal)*) => {
                    match r {
                        $($n => simd::tile_avx512_vnni_pair::<$n>(x, row, w, first, tile),)*
                        _ => unreachable!("tile of {r} rows"),
                    }
                };
            }
            rows_of!(1 2 3 4 5 6 7 8)
        })
    }
}

/// One panel's columns for `rows`, a few rows at a time.
///
/// # Safety
/// `out` is a live [x.m, w.n] buffer whose cells (rows, panel's columns) no one else touches;
/// `kernel` runs on this CPU.
unsafe fn panel_rows(
    x: &QuantizedRows,
    w: &PackedWeights,
    panel: usize,
    rows: std::ops::Range<usize>,
    out: SyncPtr,
    kernel: Int8Kernel,
) {
    // The AVX-512 tile covers two panels; a single one (an odd last panel) runs the AVX2 tile,
    // which every AVX512-VNNI CPU has and which gives the same values.
    let kernel = match kernel {
        Int8Kernel::Avx512Vnni => Int8Kernel::Avx2,
        k => k,
    };
    let step = match kernel {
        Int8Kernel::AvxVnni => 6,
        Int8Kernel::Avx2 | Int8Kernel::Avx512Vnni => 4,
        Int8Kernel::Plain => 1,
    };
    let cols = PANEL.min(w.n - panel * PANEL);
    // SAFETY: forwarded (the kernel's features are present).
    unsafe {
        tile_rows::<PANEL>(rows, step, panel * PANEL, cols, w.n, out, |row, r, tile| {
            tile_dispatch(x, row, r, w, panel, tile, kernel)
        })
    }
}

/// Runs `tile(row, r, tile)` over `rows`, `step` rows at a time, on a zeroed tile of `WIDTH`
/// columns, and copies each tile row's first `cols` values to `out` (rows `n` wide) from column
/// `col0`.
///
/// # Safety
/// `out` is a live buffer of `rows.end` rows of `n`, whose cells (rows, `col0..col0 + cols`) no
/// one else touches; `col0 + cols <= n`, `cols <= WIDTH`, `step <= 8`; `tile` is safe to call
/// (its kernel runs on this CPU).
unsafe fn tile_rows<const WIDTH: usize>(
    rows: std::ops::Range<usize>,
    step: usize,
    col0: usize,
    cols: usize,
    n: usize,
    out: SyncPtr,
    tile: impl Fn(usize, usize, &mut [[f32; WIDTH]; 8]),
) {
    let mut buf = [[0f32; WIDTH]; 8];
    let mut row = rows.start;
    while row < rows.end {
        let r = step.min(rows.end - row);
        // Only the rows the tile uses, and whole-width copies where the panel is whole: with
        // 512 inputs a tile is ~1000 cycles of products, and calls to memset and memcpy for
        // these few bytes were a measurable part of it.
        for t in buf[..r].iter_mut() {
            *t = [0.0; WIDTH];
        }
        tile(row, r, &mut buf);
        for (i, t) in buf[..r].iter().enumerate() {
            // SAFETY: row + i < rows.end and col0 + cols <= n: this task's cells of `out`.
            unsafe {
                let dst = out.get().add((row + i) * n + col0);
                if cols == WIDTH {
                    std::ptr::write_unaligned(dst as *mut [f32; WIDTH], *t);
                } else {
                    std::ptr::copy_nonoverlapping(t.as_ptr(), dst, cols);
                }
            }
        }
        row += r;
    }
}

/// Runs the kernel's tile function for `r` rows (1..=its step).
///
/// # Safety
/// `kernel` runs on this CPU.
unsafe fn tile_dispatch(
    x: &QuantizedRows,
    row: usize,
    r: usize,
    w: &PackedWeights,
    panel: usize,
    tile: &mut [[f32; PANEL]; 8],
    kernel: Int8Kernel,
) {
    #[cfg(target_arch = "x86_64")]
    macro_rules! rows_of {
        ($f:ident, $($n:literal)*) => {
            match r {
                $($n => unsafe { simd::$f::<$n>(x, row, w, panel, tile) },)*
                _ => unreachable!("tile of {r} rows"),
            }
        };
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::AvxVnni => rows_of!(tile_avx_vnni, 1 2 3 4 5 6),
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx2 => rows_of!(tile_avx2, 1 2 3 4),
        _ => tile_plain(x, row, r, w, panel, tile),
    }
}

/// The scalar tile: the same integers and float steps as the SIMD ones.
fn tile_plain(
    x: &QuantizedRows,
    row: usize,
    r: usize,
    w: &PackedWeights,
    panel: usize,
    tile: &mut [[f32; PANEL]; 8],
) {
    for (i, t) in tile[..r].iter_mut().enumerate() {
        let xr = &x.data[(row + i) * x.k4..][..x.k4];
        for (lane, out) in t.iter_mut().enumerate() {
            for b in 0..x.blocks {
                let (start, end) = block_range(b, x.k4);
                let mut acc = 0i32;
                for (kk, &xv) in xr.iter().enumerate().take(end).skip(start) {
                    let wv = w.data[packed_index(w.k4, panel * PANEL + lane, kk)];
                    acc += xv as i32 * wv as i32;
                }
                let slot = (panel * w.blocks + b) * PANEL + lane;
                let f = (acc - w.offset_sums[slot]) as f32;
                let s = x.scales[(row + i) * x.blocks + b] * w.scales[slot];
                *out = f.mul_add(s, *out);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{PANEL, PackedWeights, QuantizedRows, block_range};
    use std::arch::x86_64::*;

    /// The 4 activation bytes of row `row` at quad `q`, in every 32-bit lane.
    #[inline(always)]
    unsafe fn quad(x: &QuantizedRows, row: usize, q: usize) -> i32 {
        // SAFETY: row < m and 4 q + 4 <= k4.
        unsafe { std::ptr::read_unaligned(x.data.as_ptr().add(row * x.k4 + q * 4) as *const i32) }
    }

    /// [`super::quantize_rows_scalar`] with AVX2, 32 values at a time: the same maxima (NaN
    /// skipped), the same products, rounding to nearest even (`vcvtps2dq` in the default
    /// rounding mode, as `round_ties_even`), NaN to 0, and the clamp in integers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_rows_avx2(
        x: &[f32],
        k: usize,
        row_stride: usize,
        q: &mut QuantizedRows,
    ) {
        use super::{ACT_MAX, ACT_OFFSET, quantize_into, row_at, scale_and_inverse};
        let (k4, blocks) = (q.k4, q.blocks);
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let (lo, hi) = (
            _mm256_set1_epi32(-(ACT_MAX as i32)),
            _mm256_set1_epi32(ACT_MAX as i32),
        );
        let offset = _mm256_set1_epi32(ACT_OFFSET as i32);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for ((row, dst), scales) in (0..q.m)
            .map(|i| row_at(x, i, k, row_stride))
            .zip(q.data.chunks_exact_mut(k4))
            .zip(q.scales.chunks_exact_mut(blocks))
        {
            for (b, scale) in scales.iter_mut().enumerate() {
                let (start, end) = block_range(b, k4);
                let vals = &row[start.min(k)..end.min(k)];
                let mut chunks = vals.chunks_exact(8);
                let mut m = _mm256_setzero_ps();
                for c in &mut chunks {
                    // SAFETY: c has 8 values. max_ps returns its second operand when either is
                    // NaN, so NaN never replaces the running maximum.
                    let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
                    m = _mm256_max_ps(_mm256_and_ps(v, abs_mask), m);
                }
                let mut lanes = [0f32; 8];
                // SAFETY: 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
                let tail = chunks.remainder().iter().fold(0f32, |a, v| a.max(v.abs()));
                let max_abs = lanes.iter().fold(tail, |a, &l| a.max(l));
                let (s, inv) = scale_and_inverse(max_abs, ACT_MAX);
                *scale = s;
                let invv = _mm256_set1_ps(inv);
                let out = &mut dst[start..];
                let whole = vals.len() / 32 * 32;
                for (i, c) in vals[..whole].chunks_exact(32).enumerate() {
                    let mut ints = [_mm256_setzero_si256(); 4];
                    for (j, int) in ints.iter_mut().enumerate() {
                        // SAFETY: 8 values at 8 j within the chunk of 32.
                        let p =
                            _mm256_mul_ps(unsafe { _mm256_loadu_ps(c.as_ptr().add(8 * j)) }, invv);
                        let p = _mm256_and_ps(p, _mm256_cmp_ps::<_CMP_ORD_Q>(p, p));
                        let r = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(p), lo), hi);
                        *int = _mm256_add_epi32(r, offset);
                    }
                    let ab = _mm256_packs_epi32(ints[0], ints[1]);
                    let cd = _mm256_packs_epi32(ints[2], ints[3]);
                    let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
                    // SAFETY: out has k4 - start >= whole values from 32 i.
                    unsafe {
                        _mm256_storeu_si256(out.as_mut_ptr().add(32 * i) as *mut __m256i, bytes)
                    };
                }
                quantize_into(&vals[whole..], inv, &mut out[whole..]);
            }
        }
    }

    /// Defines a 256-bit tile kernel: 16 columns as two vectors of 8, `R` rows, with
    /// `$dot(acc, activations, weights)` adding four u8 x i8 products into each i32 lane.
    macro_rules! tile256 {
        ($(#[$doc:meta])* $name:ident, $features:literal, $dot:expr) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize>(
                x: &QuantizedRows,
                row: usize,
                w: &PackedWeights,
                panel: usize,
                tile: &mut [[f32; PANEL]; 8],
            ) {
                let wbase = unsafe { w.data.as_ptr().add(panel * w.k4 * PANEL) };
                for b in 0..w.blocks {
                    let (start, end) = block_range(b, w.k4);
                    let mut acc = [[_mm256_setzero_si256(); 2]; R];
                    for q in start / 4..end / 4 {
                        // SAFETY: quad q of this panel lies within `data`.
                        let (w0, w1) = unsafe {
                            let p = wbase.add(q * PANEL * 4) as *const __m256i;
                            (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)))
                        };
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xv = _mm256_set1_epi32(unsafe { quad(x, row + i, q) });
                            a[0] = $dot(a[0], xv, w0);
                            a[1] = $dot(a[1], xv, w1);
                        }
                    }
                    unsafe { combine256::<R>(&acc, x, row, w, panel, b, tile) };
                }
            }
        };
    }

    /// AVX2, 16 columns, `R` rows: for two quads at a time, two `vpmaddubsw` (pairs into i16)
    /// added in i16 (four products of at most 127 x 63: never above 32 004, so nothing
    /// saturates), then one `vpmaddwd` with ones into i32: three multiply instructions per
    /// eight inputs instead of four.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2<const R: usize>(
        x: &QuantizedRows,
        row: usize,
        w: &PackedWeights,
        panel: usize,
        tile: &mut [[f32; PANEL]; 8],
    ) {
        let wbase = unsafe { w.data.as_ptr().add(panel * w.k4 * PANEL) };
        let ones = _mm256_set1_epi16(1);
        // SAFETY (both): quad q of this panel lies within `data`.
        let weights = |q: usize| unsafe {
            let p = wbase.add(q * PANEL * 4) as *const __m256i;
            (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)))
        };
        for b in 0..w.blocks {
            let (start, end) = block_range(b, w.k4);
            let (first, last) = (start / 4, end / 4);
            let pairs_end = first + (last - first) / 2 * 2;
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for q in (first..pairs_end).step_by(2) {
                let ((w0a, w1a), (w0b, w1b)) = (weights(q), weights(q + 1));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xa = _mm256_set1_epi32(unsafe { quad(x, row + i, q) });
                    let xb = _mm256_set1_epi32(unsafe { quad(x, row + i, q + 1) });
                    let s0 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(xa, w0a),
                        _mm256_maddubs_epi16(xb, w0b),
                    );
                    let s1 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(xa, w1a),
                        _mm256_maddubs_epi16(xb, w1b),
                    );
                    a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(s0, ones));
                    a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(s1, ones));
                }
            }
            if pairs_end < last {
                let (w0, w1) = weights(pairs_end);
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_set1_epi32(unsafe { quad(x, row + i, pairs_end) });
                    let s0 = _mm256_maddubs_epi16(xv, w0);
                    let s1 = _mm256_maddubs_epi16(xv, w1);
                    a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(s0, ones));
                    a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(s1, ones));
                }
            }
            unsafe { combine256::<R>(&acc, x, row, w, panel, b, tile) };
        }
    }

    tile256!(
        /// AVX-VNNI: one `vpdpbusd` per product.
        tile_avx_vnni,
        "avx2,fma,avxvnni",
        |a, x, w| _mm256_dpbusd_avx_epi32(a, x, w)
    );

    /// Block `b`'s integer sums into the f32 tile: `tile += (acc - offset sums) * (sx * sw)`.
    #[inline(always)]
    unsafe fn combine256<const R: usize>(
        acc: &[[__m256i; 2]; R],
        x: &QuantizedRows,
        row: usize,
        w: &PackedWeights,
        panel: usize,
        b: usize,
        tile: &mut [[f32; PANEL]; 8],
    ) {
        let slot = (panel * w.blocks + b) * PANEL;
        unsafe {
            let sw = w.scales.as_ptr().add(slot);
            let os = w.offset_sums.as_ptr().add(slot) as *const __m256i;
            for (i, a) in acc.iter().enumerate() {
                let sx = _mm256_set1_ps(x.scales[(row + i) * x.blocks + b]);
                for (h, &ah) in a.iter().enumerate() {
                    let f = _mm256_cvtepi32_ps(_mm256_sub_epi32(ah, _mm256_loadu_si256(os.add(h))));
                    let s = _mm256_mul_ps(sx, _mm256_loadu_ps(sw.add(8 * h)));
                    let t = tile[i].as_mut_ptr().add(8 * h);
                    _mm256_storeu_ps(t, _mm256_fmadd_ps(f, s, _mm256_loadu_ps(t)));
                }
            }
        }
    }

    /// AVX512-VNNI over two adjacent panels (32 columns), `R` rows: each activation broadcast
    /// feeds two products.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    pub(super) unsafe fn tile_avx512_vnni_pair<const R: usize>(
        x: &QuantizedRows,
        row: usize,
        w: &PackedWeights,
        first: usize,
        tile: &mut [[f32; 2 * PANEL]; 8],
    ) {
        let base0 = unsafe { w.data.as_ptr().add(first * w.k4 * PANEL) };
        let base1 = unsafe { base0.add(w.k4 * PANEL) };
        for b in 0..w.blocks {
            let (start, end) = block_range(b, w.k4);
            let mut acc = [[_mm512_setzero_si512(); 2]; R];
            for q in start / 4..end / 4 {
                // SAFETY: quad q of both panels lies within `data`.
                let (w0, w1) = unsafe {
                    (
                        _mm512_loadu_si512(base0.add(q * PANEL * 4) as *const _),
                        _mm512_loadu_si512(base1.add(q * PANEL * 4) as *const _),
                    )
                };
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_epi32(unsafe { quad(x, row + i, q) });
                    a[0] = _mm512_dpbusd_epi32(a[0], xv, w0);
                    a[1] = _mm512_dpbusd_epi32(a[1], xv, w1);
                }
            }
            for (h, panel) in [first, first + 1].into_iter().enumerate() {
                let slot = (panel * w.blocks + b) * PANEL;
                unsafe {
                    let sw = _mm512_loadu_ps(w.scales.as_ptr().add(slot));
                    let os = _mm512_loadu_si512(w.offset_sums.as_ptr().add(slot) as *const _);
                    for (i, a) in acc.iter().enumerate() {
                        let sx = _mm512_set1_ps(x.scales[(row + i) * x.blocks + b]);
                        let f = _mm512_cvtepi32_ps(_mm512_sub_epi32(a[h], os));
                        let s = _mm512_mul_ps(sx, sw);
                        let t = tile[i].as_mut_ptr().add(PANEL * h);
                        _mm512_storeu_ps(t, _mm512_fmadd_ps(f, s, _mm512_loadu_ps(t)));
                    }
                }
            }
        }
    }
}

/// Twin of [`quantize_rows`] + [`matmul`]: scalar quantization and integer loops over the
/// weights read one by one, no packing-order assumptions beyond `PackedWeights::weight_at`.
pub fn matmul_plain(x: &[f32], m: usize, w: &PackedWeights) -> Vec<f32> {
    let (k, k4) = (w.k, w.k4);
    let mut out = vec![0f32; m * w.n];
    for i in 0..m {
        let row = &x[i * k..(i + 1) * k];
        for b in 0..w.blocks {
            let (start, end) = block_range(b, k4);
            let vals = &row[start.min(k)..end.min(k)];
            let max_abs = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (sx, inv) = scale_and_inverse(max_abs, ACT_MAX);
            let qx: Vec<i32> = vals
                .iter()
                .map(|&v| quantize_value(v, inv, ACT_MAX))
                .collect();
            for j in 0..w.n {
                let acc: i32 = qx
                    .iter()
                    .enumerate()
                    .map(|(t, &q)| q * w.weight_at(j, start + t) as i32)
                    .sum();
                let o = &mut out[i * w.n + j];
                *o = (acc as f32).mul_add(sx * w.scale_at(j, b), *o);
            }
        }
    }
    out
}

/// `x [.., k] W^T + bias` (then the erf GELU when `gelu`) as a candle op on f32 CPU tensors.
pub struct Int8Product<'a> {
    pub weights: &'a PackedWeights,
    pub bias: Option<&'a [f32]>,
    pub gelu: bool,
    pub kernel: Int8Kernel,
}

impl CustomOp1 for Int8Product<'_> {
    fn name(&self) -> &'static str {
        "int8-product"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (k, n) = (self.weights.k, self.weights.n);
        let x = projection_input(self.name(), storage, layout, (k, n), self.bias)?;
        let m = x.len() / k;
        let q = quantize_rows(x, m, k);
        let dst = product(&q, self.weights, self.kernel);
        Ok(projection_output(
            dst,
            layout.dims(),
            n,
            self.bias,
            self.gelu,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The kernels this CPU runs.
    fn kernels() -> Vec<Int8Kernel> {
        [
            Int8Kernel::Plain,
            Int8Kernel::Avx2,
            Int8Kernel::AvxVnni,
            Int8Kernel::Avx512Vnni,
        ]
        .into_iter()
        .filter(|k| k.runs_here())
        .collect()
    }

    #[test]
    fn large_weights_take_few_row_chunks_in_whole_tiles() {
        // Whisper's products (at most 1 MB of weights) keep 120-row chunks.
        assert_eq!(row_chunk(150, 512, 1536 * 512), ROW_CHUNK);
        assert_eq!(row_chunk(1200, 2048, 512 * 2048), ROW_CHUNK);
        // xlsr's at 10 s: one chunk of 1024-input rows, two of 4096-input rows.
        assert_eq!(row_chunk(499, 1024, 3072 * 1024), 504);
        assert_eq!(row_chunk(499, 4096, 1024 * 4096), 264);
        for (m, k) in [(1usize, 1024usize), (530, 4096), (3000, 1024), (7, 1 << 22)] {
            let chunk = row_chunk(m, k, 4096 * 1024);
            assert_eq!(chunk % CHUNK_TILE, 0, "({m}, {k}): {chunk}");
            let most = (CHUNK_ACTIVATION_BYTES / k).max(CHUNK_TILE);
            assert_eq!(m.div_ceil(chunk), m.div_ceil(most), "({m}, {k}): {chunk}");
        }
    }

    /// Every kernel this CPU runs equals the twin exactly, on odd sizes (tails of rows, panels,
    /// quads and blocks), rows with outliers, all-zero rows and NaN.
    #[test]
    fn every_kernel_equals_the_plain_twin() {
        for (m, n, k) in [
            (1usize, 1usize, 1usize),
            (3, 17, 5),
            (9, 16, 256),
            (13, 33, 257),
            (150, 40, 512),
            (121, 20, 700),
            (7, 5, 1536),
        ] {
            let w = values(n * k, 1 + (m * n * k) as u64);
            let mut x = values(m * k, 7 + k as u64);
            x[0] = 40.0; // an outlier in the first block of row 0
            if m > 2 {
                x[k..2 * k].iter_mut().for_each(|v| *v = 0.0);
                x[2 * k] = f32::NAN;
                x[2 * k + 1] = 1e-41;
            }
            let packed = PackedWeights::pack(&w, n, k).unwrap();
            let want = matmul_plain(&x, m, &packed);
            for kernel in kernels() {
                let q = quantize_rows(&x, m, k);
                let mut got = vec![f32::NAN; m * n];
                matmul(&q, &packed, &mut got, kernel);
                let fresh = product(&q, &packed, kernel);
                for (i, ((g, f), t)) in got.iter().zip(&fresh).zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == t.to_bits() && f.to_bits() == t.to_bits(),
                        "{kernel:?} ({m}, {n}, {k}) at {i}: {g} and {f} vs twin {t}"
                    );
                }
            }
        }
    }

    /// The largest bytes against the largest weights of both signs, every quad: the AVX2
    /// kernel's i16 sums of four products are at their limit and must not saturate.
    #[test]
    fn extreme_values_do_not_saturate() {
        let (m, n, k) = (5usize, 32usize, 520usize);
        let x = vec![1.0f32; m * k];
        let w: Vec<f32> = (0..n * k)
            .map(|i| if (i / k) % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let packed = PackedWeights::pack(&w, n, k).unwrap();
        let want = matmul_plain(&x, m, &packed);
        for (i, v) in want.iter().enumerate() {
            let exact = if (i % n) % 2 == 0 {
                k as f32
            } else {
                -(k as f32)
            };
            assert!((v - exact).abs() <= 1e-3 * k as f32, "twin {v} vs {exact}");
        }
        for kernel in kernels() {
            let mut got = vec![f32::NAN; m * n];
            matmul(&quantize_rows(&x, m, k), &packed, &mut got, kernel);
            assert_eq!(got, want, "{kernel:?}");
        }
    }

    /// The twin is within the quantization error of the f32 product: relative error of the
    /// whole product (Frobenius) under 2 %, for Gaussian-like data.
    #[test]
    fn twin_is_close_to_the_f32_product() {
        let (m, n, k) = (20, 24, 600);
        let w = values(n * k, 3);
        let x = values(m * k, 4);
        let packed = PackedWeights::pack(&w, n, k).unwrap();
        let got = matmul_plain(&x, m, &packed);
        let (mut err, mut norm) = (0f64, 0f64);
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                err += (got[i * n + j] as f64 - exact).powi(2);
                norm += exact.powi(2);
            }
        }
        let rel = (err / norm).sqrt();
        assert!(rel < 0.02, "relative error {rel}");
        assert!(rel > 0.0, "no quantization happened");
        let deq = packed.dequantize();
        let worst = w
            .iter()
            .zip(&deq)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1.0 / W_MAX / 2.0 + 1e-6, "weight error {worst}");
    }

    /// The dispatched quantizer writes the scalar one's bytes and scales, with NaN, infinities,
    /// subnormal blocks, huge values and ties among the inputs.
    #[test]
    fn quantizer_matches_the_scalar_one() {
        for (m, k) in [(1usize, 1usize), (2, 31), (3, 64), (5, 300), (4, 1031)] {
            let mut x = values(m * k, k as u64);
            for (i, v) in x.iter_mut().enumerate() {
                match i % 97 {
                    3 => *v = f32::NAN,
                    5 if i % 2 == 0 => *v = 0.5 / 63.0 * 7.0,
                    11 => *v *= 1e30,
                    _ => {}
                }
            }
            if m > 2 {
                x[k..2 * k].iter_mut().for_each(|v| *v = 1e-40);
                x[2 * k] = f32::INFINITY;
                x[2 * k + k / 2] = f32::NEG_INFINITY;
            }
            let got = quantize_rows(&x, m, k);
            let mut want = QuantizedRows {
                m,
                k4: got.k4,
                blocks: got.blocks,
                data: vec![ACT_OFFSET; got.data.len()],
                scales: vec![0f32; got.scales.len()],
            };
            quantize_rows_scalar(&x, k, k, &mut want);
            assert_eq!(got.data, want.data, "({m}, {k}) bytes");
            assert_eq!(got.scales, want.scales, "({m}, {k}) scales");
            assert!(got.data.iter().all(|&b| (1..=127).contains(&b)));
        }
    }

    /// The written-out rounding is `round_ties_even` (ties, negatives, limits, NaN).
    #[test]
    fn rounding_is_ties_to_even() {
        for i in -300..=300 {
            let v = i as f32 * 0.25;
            let want = v.round_ties_even().clamp(-63.0, 63.0) as i32;
            assert_eq!(quantize_value(v, 1.0, 63.0), want, "{v}");
        }
        assert_eq!(quantize_value(f32::NAN, 1.0, 63.0), 0);
        assert_eq!(quantize_value(f32::INFINITY, 1.0, 127.0), 127);
    }

    /// Overlapping strided rows quantize as the same rows copied out.
    #[test]
    fn strided_rows_equal_copied_rows() {
        let (m, k, stride) = (7usize, 300usize, 64usize);
        let x = values((m - 1) * stride + k, 9);
        let copied: Vec<f32> = (0..m)
            .flat_map(|i| x[i * stride..i * stride + k].to_vec())
            .collect();
        let (a, b) = (
            quantize_strided_rows(&x, m, k, stride),
            quantize_rows(&copied, m, k),
        );
        assert_eq!(a.data, b.data);
        assert_eq!(a.scales, b.scales);
    }

    #[test]
    fn packing_rejects_bad_weights() {
        assert!(PackedWeights::pack(&[1.0, f32::NAN], 1, 2).is_err());
        assert!(PackedWeights::pack(&[1.0, 2.0, 3.0], 2, 2).is_err());
        assert!(PackedWeights::pack(&[], 0, 0).is_err());
    }

    #[test]
    fn kernel_limit_caps_the_choice() {
        assert_eq!(
            Int8Kernel::detect(Some(Int8Kernel::Plain)),
            Int8Kernel::Plain
        );
        let avx2 = Int8Kernel::detect(Some(Int8Kernel::Avx2));
        assert!(avx2 == Int8Kernel::Avx2 || avx2 == Int8Kernel::Plain);
        for cap in [Int8Kernel::AvxVnni, Int8Kernel::Avx512Vnni] {
            let k = Int8Kernel::detect(Some(cap));
            assert!(k.runs_here() && k.rank_at_most(cap), "{cap:?} gave {k:?}");
        }
        assert_eq!(Int8Kernel::parse("AVX2"), Some(Int8Kernel::Avx2));
        assert_eq!(Int8Kernel::parse("sse"), None);
    }
}
