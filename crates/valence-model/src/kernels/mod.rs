//! Low-level CPU kernels: the fused f32 operations the encoders run on the CPU, and the glue
//! they share (runtime SIMD dispatch, candle's worker pool, strided `gemm` calls).
//!
//! Every kernel here sits beside a plain twin that is obviously correct (candle's own ops or
//! scalar Rust), and the unit tests compare the two on random shapes, odd sizes included. Model
//! blocks ([`crate::nn`]) call these kernels and fall back to candle's ops on other devices and
//! dtypes; nothing here knows about model blocks. Measured speed-ups live in docs/performance.md and
//! `valence bench`, not in comments.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod dense;
pub mod epilogue;
pub mod int8;
pub mod packed_f32;
pub mod rows;

use candle_core::{CpuStorage, Layout};

/// Defines `fn $name(args)` that runs the `#[inline(always)]` function `$body` compiled for
/// AVX2 and FMA when the CPU has them, so that its loops vectorise 8 wide (the crate is built
/// for baseline x86-64), and as is elsewhere.
macro_rules! avx2_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $body:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn enabled($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were just detected.
                    unsafe { enabled($($arg),*) };
                    return;
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use avx2_dispatch;

/// Runs `f(offset, piece)` over consecutive pieces of `dst` (`piece_len` values each, the last
/// possibly shorter) on candle's CPU pool, which hands each worker a run of whole pieces; on the
/// calling thread when there is only one piece.
pub(crate) fn par_pieces_mut(
    dst: &mut [f32],
    piece_len: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    let len = dst.len();
    if len <= piece_len {
        f(0, dst);
        return;
    }
    let base = SyncPtr(dst.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(len.div_ceil(piece_len), |pieces| {
        let start = pieces.start * piece_len;
        let end = (pieces.end * piece_len).min(len);
        // SAFETY: the pool hands out disjoint piece ranges and `execute_chunked` returns only
        // when every range is done, so these are disjoint sub-slices of the live `dst`.
        f(start, unsafe {
            std::slice::from_raw_parts_mut(base.get().add(start), end - start)
        });
    });
}

/// A pointer into an output buffer that the CPU ops hand to candle's pool threads, each of
/// which writes a disjoint part of the buffer (every user states why its parts are disjoint).
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: only ever used to write disjoint parts of a buffer that outlives the pool call.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A strided f32 matrix for [`gemm_f32`]: its first element and its row and column strides,
/// in elements.
#[derive(Clone, Copy)]
pub(crate) struct MatRef {
    pub(crate) ptr: *const f32,
    pub(crate) row_stride: usize,
    pub(crate) col_stride: usize,
}
// SAFETY: products only read through a MatRef, from buffers their callers keep alive until the
// product (and every pool thread it uses) is done.
unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}

impl MatRef {
    /// The same matrix without its first `column` columns.
    ///
    /// # Safety
    /// `column` must be at most the matrix's width.
    unsafe fn skip_columns(self, column: usize) -> Self {
        Self {
            // SAFETY: inside the matrix by the caller's promise.
            ptr: unsafe { self.ptr.add(column * self.col_stride) },
            ..self
        }
    }
}

/// `dst = lhs rhs` for an m x k `lhs`, a k x n `rhs` and an m x n `dst` whose rows are
/// `dst_row_stride` apart (columns adjacent), on this thread, through `gemm`, candle's CPU matmul
/// engine, which takes any strides (rows may overlap: operands are only read).
///
/// # Safety
/// Every element the shapes and strides address must lie in live buffers, and `dst` must not
/// overlap the operands or anything another thread touches meanwhile.
pub(crate) unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: MatRef,
    rhs: MatRef,
) {
    // SAFETY: forwarded to the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            false,
            lhs.ptr,
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.ptr,
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            // One thread: callers that split a product do so on candle's pool.
            gemm::Parallelism::None,
        )
    }
}

/// Products smaller than this many multiply-adds run on the calling thread: waking a second
/// thread costs more than it saves.
const PAR_GEMM_MIN_MACS: usize = 1 << 20;
/// Column blocks of [`par_gemm_f32`] are whole multiples of this (gemm's widest f32 tile).
const PAR_GEMM_COLUMN_ALIGN: usize = 16;

/// [`gemm_f32`] split across candle's CPU pool, each worker computing whole column blocks with
/// a single-threaded `gemm`, rather than through `gemm`'s own rayon threads. Every other CPU
/// kernel here runs on that pool, whose workers spin for a while after each operation before
/// they park; a product on a second pool competed with them for the cores (on 2 cores that
/// once cost Whisper f32 a third of its speed), and parking sooner instead made every window
/// after an idle moment wake the other core many times over (2.6x slower on a KVM guest).
/// Columns, not rows: each worker packs only its part of `rhs` (the weights, usually the
/// larger operand).
///
/// # Safety
/// As [`gemm_f32`].
pub(crate) unsafe fn par_gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: MatRef,
    rhs: MatRef,
) {
    let threads = candle_core::utils::get_num_threads();
    if threads <= 1 || m * n * k < PAR_GEMM_MIN_MACS || n < 2 * PAR_GEMM_COLUMN_ALIGN {
        // SAFETY: forwarded to the caller.
        unsafe { gemm_f32((m, n, k), dst, dst_row_stride, lhs, rhs) };
        return;
    }
    // Two blocks per thread, so a thread slowed by something else hands its second one over.
    let block = n
        .div_ceil(2 * threads)
        .next_multiple_of(PAR_GEMM_COLUMN_ALIGN);
    let dst = SyncPtr(dst);
    candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(block), |blocks| {
        for b in blocks {
            let (c0, c1) = (b * block, ((b + 1) * block).min(n));
            // SAFETY: column block [c0, c1) of the caller's product: rhs columns from c0 and
            // dst columns from c0 lie inside what the caller vouched for; the pool hands each
            // block to one worker and returns when all are done, so the dst parts written are
            // disjoint and live.
            unsafe {
                gemm_f32(
                    (m, c1 - c0, k),
                    dst.get().add(c0),
                    dst_row_stride,
                    lhs,
                    rhs.skip_columns(c0),
                );
            }
        }
    });
}

/// `src` [rows, cols] row-major transposed into [cols, rows], in cache-sized tiles.
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    assert_eq!(src.len(), rows * cols, "transpose of {rows} x {cols}");
    let mut dst = vec![0f32; src.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    dst
}

/// `weight` [rows, cols] transposed into a contiguous [cols, rows] tensor: with [`transpose`]
/// for f32 on the CPU (candle's strided copy of a transposed view was most of a model's load
/// time), with candle elsewhere.
pub(crate) fn transposed(weight: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    if weight.device().is_cpu() && weight.dtype() == candle_core::DType::F32 {
        let (rows, cols) = weight.dims2()?;
        let values = weight.flatten_all()?.to_vec1::<f32>()?;
        candle_core::Tensor::from_vec(
            transpose(&values, rows, cols),
            (cols, rows),
            weight.device(),
        )
    } else {
        weight.t()?.contiguous()
    }
}

/// The values of a contiguous f32 CPU tensor, as the fused CPU ops take them.
pub(crate) fn contiguous_f32<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op} expects f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} expects a contiguous tensor")
    };
    Ok(&data[start..end])
}

/// Largest absolute value of a tensor (the kernel and block tests' tolerance checks).
#[cfg(test)]
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool helper's twin is a plain loop: every element is visited exactly once, with the
    /// offset it has in the whole slice, for lengths around the piece size. (No assertion runs
    /// inside the pool: a panic there would poison candle's pool for the other tests.)
    #[test]
    fn par_pieces_visit_every_element_once() {
        for (len, piece) in [(0, 4), (1, 4), (4, 4), (5, 4), (1023, 7), (10_000, 64)] {
            let mut xs = vec![0f32; len];
            par_pieces_mut(&mut xs, piece, |offset, part| {
                for (i, x) in part.iter_mut().enumerate() {
                    *x += (offset + i) as f32 + 1.0;
                }
            });
            let want: Vec<f32> = (0..len).map(|i| i as f32 + 1.0).collect();
            assert_eq!(xs, want, "len {len}, piece {piece}");
        }
    }

    #[test]
    fn transpose_matches_candle() {
        for (r, c) in [(1usize, 1usize), (2, 3), (33, 65), (70, 31)] {
            let t =
                candle_core::Tensor::randn(0f32, 1., (r, c), &candle_core::Device::Cpu).unwrap();
            let want = t.t().unwrap().contiguous().unwrap().flatten_all().unwrap();
            let got = transposed(&t).unwrap();
            assert_eq!(got.dims(), &[c, r]);
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.to_vec1::<f32>().unwrap()
            );
        }
    }

    /// `par_gemm_f32` against a triple loop, with transposed and overlapping-row operands: a
    /// product small enough for one thread, and one split into column blocks (the last short).
    #[test]
    fn gemm_matches_naive_product() {
        for (m, n, k) in [(13, 7, 9), (40, 100, 300)] {
            let a: Vec<f32> = (0..m * 3 + k)
                .map(|i| ((i * 37) % 17) as f32 - 8.0)
                .collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 11) % 13) as f32 - 6.0).collect();
            // lhs rows overlap (stride 3 < k), rhs read transposed (b as [n, k]).
            let lhs = MatRef {
                ptr: a.as_ptr(),
                row_stride: 3,
                col_stride: 1,
            };
            let rhs = MatRef {
                ptr: b.as_ptr(),
                row_stride: 1,
                col_stride: k,
            };
            let mut dst = vec![0f32; m * (n + 2)];
            // SAFETY: lhs reads up to a[(m-1)*3 + k-1] < a.len(); rhs up to b[(n-1)*k + k-1];
            // dst rows are n + 2 apart.
            unsafe { par_gemm_f32((m, n, k), dst.as_mut_ptr(), n + 2, lhs, rhs) };
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|p| a[i * 3 + p] * b[j * k + p]).sum();
                    assert_eq!(dst[i * (n + 2) + j], want, "{m}x{n}x{k} ({i}, {j})");
                }
                assert_eq!(dst[i * (n + 2) + n], 0.0, "padding column written");
            }
        }
    }
}
