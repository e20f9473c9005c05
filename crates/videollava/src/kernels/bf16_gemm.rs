//! BF16 matrix product `out = A · Wᵀ` with f32 accumulation, for the CPU.
//!
//! Conventions (every function of this file):
//! - `a`: activations, BF16 bit patterns (`u16`), row-major `[m, k]`;
//! - `w`: weight, BF16 bit patterns (`u16`), row-major `[n, k]` (PyTorch `nn.Linear` layout);
//! - `out`: f32, row-major `[m, n]`, overwritten: `out[i, j] = Σ_p a[i, p] · w[j, p]`.
//!
//! Why it exists: candle's CPU matmul for BF16 widens both operands to f32 and runs an f32 GEMM
//! (about 180 GFLOP/s on 2 threads), which dominates the prefill of long prompts through a 7B
//! Llama. AVX-512 BF16 has `vdpbf16ps` (per 32-bit lane: two BF16 products added to an f32
//! accumulator, 16 lanes), twice the multiply-adds per instruction of an f32 FMA on 512 bits.
//!
//! Paths, picked at run time:
//! - AMX BF16 (Sapphire Rapids and later), `k % 32 == 0`: [`super::bf16_amx`] (`2..=64` rows:
//!   `W` streamed once through the tiles; more: the blocked tile GEMM);
//! - AVX-512 BF16 (`avx512f` + `avx512bw` + `avx512bf16`; needs Rust 1.89+ for the intrinsics):
//!   - `m <= 48` (decoding, short chunks): a streaming kernel that reads `W` from memory once
//!     (dot products along `k`, several rows of `W` at a time, the rows two groups ahead
//!     prefetched; with more than 4 rows of `A`, blocks of 16 rows of `W` are then reused from
//!     the L2 cache by the other rows of `A`, 4 at a time);
//!   - otherwise a blocked GEMM. `A` is packed once per call into tiles of 14 rows, each as
//!     `[k/2][14]` 32-bit pairs of consecutive-`k` values (odd `k` padded with a zero), the
//!     layout a 32-bit broadcast feeds to `vdpbf16ps`. Tasks (rayon) take a stripe of about 256
//!     output columns (and a range of row tiles when there are too few stripes), pack their
//!     stripe of `W` into a thread-local buffer as `[k/2][32]` pairs per 32-column micro-panel,
//!     then run a 14×32 micro-kernel (28 zmm accumulators) over blocks of 256 `k` pairs: the
//!     micro-panel of `A` stays in L1 while the micro-panels of `W` stream from L2.
//! - Otherwise: `m <= 8` rows stream `W` once with f32 dot products ([`gemv_f32`], AVX2 + FMA
//!   where allowed); more rows: on x86-64 with AVX2 + FMA or AVX-512F our f32-FMA GEMM that widens
//!   the operands as it packs them ([`super::bf16_fma`]); on other CPUs and architectures `A` once
//!   and `W` a stripe at a time widened to f32 (exact) for the `gemm` crate's f32 GEMM (NEON, or
//!   x86 SSE/AVX2 as the `gemm` crate is built here).
//!
//! Numerics: the AVX-512 path follows `vdpbf16ps` (BF16 denormal inputs read as zero, f32
//! denormal results flushed, round-to-nearest-even); the portable path uses plain f32
//! multiply-add. All sum in f32, in different orders, so they differ by f32 rounding only.
//! Parallelism: rayon's global pool. Memory: the packed `A` (about the size of `A`) is kept
//! between calls, and each rayon thread keeps its packed stripe of `W` (`256 * k * 2` bytes).

use rayon::prelude::*;

/// Whether [`matmul_bf16`] uses the AVX-512 BF16 kernels (this CPU, within the kernel-set switch).
pub fn has_fast_path() -> bool {
    super::cpu::features().avx512_bf16
}

/// `out[i, j] = Σ_p a[i, p] · w[j, p]` (f32 accumulation).
///
/// `a`: BF16 bits, row-major `[m, k]`; `w`: BF16 bits, row-major `[n, k]`; `out`: f32, row-major
/// `[m, n]` (overwritten). Any sizes; with `k == 0` the output is zeros. Runs on rayon's global
/// pool. Panics when a slice length does not match its shape.
pub fn matmul_bf16(a: &[u16], m: usize, w: &[u16], n: usize, k: usize, out: &mut [f32]) {
    assert!(m.checked_mul(k) == Some(a.len()), "matmul_bf16: `a` has {} elements, expected m*k = {m}*{k}", a.len());
    assert!(n.checked_mul(k) == Some(w.len()), "matmul_bf16: `w` has {} elements, expected n*k = {n}*{k}", w.len());
    assert!(
        m.checked_mul(n) == Some(out.len()),
        "matmul_bf16: `out` has {} elements, expected m*n = {m}*{n}",
        out.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // From 2 rows AMX beats the streaming kernel, which is bound by its arithmetic there, and
    // up to 64 rows `W` read once beats the blocked tile GEMM's copies of it (one layer of the
    // 7B: 8 rows 15 ms against 27 streaming; 46 rows, a conversation's next turn, 21 ms against
    // 40 through the blocked tile GEMM).
    if super::bf16_amx::applies_few_rows(m, k) {
        // SAFETY: `applies_few_rows` checked the CPU, `k` and `m`; the slice lengths match the
        // shapes (asserted above).
        unsafe { super::bf16_amx::matmul_few_rows(a, m, w, n, k, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::bf16_amx::applies(m, k) {
        // SAFETY: `applies` checked the CPU and `k`; the slice lengths match the shapes (asserted
        // above).
        unsafe { super::bf16_amx::matmul(a, m, w, n, k, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_fast_path() {
        // SAFETY: the CPU has the features the kernels are compiled for (checked just above), and
        // the slice lengths match the shapes (asserted above).
        unsafe {
            if m <= avx512::GEMV_MAX_ROWS {
                avx512::gemv(a, m, w, n, k, out);
            } else {
                avx512::gemm(a, m, w, n, k, out);
            }
        }
        return;
    }
    let set = super::cpu::kernel_set();
    if m <= GEMV_MAX_ROWS {
        let x: Vec<f32> = a.iter().map(|&b| widen(b)).collect();
        gemv_f32_into(set, &x, m, w, n, k, out);
    } else if super::bf16_fma::applies(set) {
        super::bf16_fma::matmul(set, a, m, w, n, k, out);
    } else {
        widened_gemm(a, m, w, n, k, out);
    }
}

/// `act(A · Wᵀ + bias)` rounded to BF16 (`[m, n]`) within the product's own pass, where a
/// kernel does that: the AMX blocked GEMM (more than 64 rows), the f32-FMA GEMM of CPUs without
/// AVX-512 BF16 (more than [`GEMV_MAX_ROWS`] rows, AVX2 or AVX-512F). `None` elsewhere: the caller then
/// rounds [`matmul_bf16`]'s f32 product with [`super::fused::linear_output_bf16`], which gives the
/// same numbers. Shapes as [`matmul_bf16`]; `bias` `[n]` f32.
pub fn matmul_bf16_rounded(
    a: &[u16],
    m: usize,
    w: &[u16],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    act: super::fused::Activation,
) -> Option<Vec<half::bf16>> {
    assert!(m.checked_mul(k) == Some(a.len()), "matmul_bf16_rounded: `a` has {} elements, expected m*k", a.len());
    assert!(n.checked_mul(k) == Some(w.len()), "matmul_bf16_rounded: `w` has {} elements, expected n*k", w.len());
    let bias = bias.unwrap_or(&[]);
    assert!(bias.is_empty() || bias.len() == n, "matmul_bf16_rounded: bias of {} values for n = {n}", bias.len());
    #[cfg(target_arch = "x86_64")]
    if n > 0 && !super::bf16_amx::applies_few_rows(m, k) && super::bf16_amx::applies(m, k) {
        let mut out = vec![half::bf16::ZERO; m * n];
        let set = super::cpu::kernel_set();
        // SAFETY: `applies` checked the CPU, `k` and `m`; the lengths match the shapes (asserted
        // above); `set` is this thread's.
        unsafe { super::bf16_amx::matmul_bf16_out(a, m, w, n, k, bias, act, set, &mut out) };
        return Some(out);
    }
    let set = super::cpu::kernel_set();
    if m > GEMV_MAX_ROWS && !has_fast_path() && super::bf16_fma::applies(set) {
        let mut out = vec![half::bf16::ZERO; m * n];
        super::bf16_fma::matmul_bf16_out(set, a, m, w, n, k, bias, act, &mut out);
        return Some(out);
    }
    let _ = (m, n, k, bias, act);
    None
}

/// Rows up to which the paths without AVX-512 BF16 stream `W` once per call with dot products
/// ([`gemv_f32`]); more rows go through [`widened_gemm`].
pub(crate) const GEMV_MAX_ROWS: usize = 8;

/// Columns of `W` widened to f32 at a time by [`widened_gemm`] (`256 * k * 4` bytes).
const WIDEN_STRIPE: usize = 256;

/// `out = A · Wᵀ` off AVX-512 BF16, `m > GEMV_MAX_ROWS`: `A` widened to f32 once, `W` a stripe of
/// [`WIDEN_STRIPE`] rows at a time (BF16 to f32 is exact: `bits << 16`), each stripe through the
/// `gemm` crate's f32 GEMM (its AVX2/FMA, AVX-512 or NEON micro-kernels, chosen at run time; rayon
/// inside). f32 products and sums, as the portable path.
fn widened_gemm(a: &[u16], m: usize, w: &[u16], n: usize, k: usize, out: &mut [f32]) {
    let mut af = vec![0f32; m * k];
    af.par_chunks_mut(4096).zip(a.par_chunks(4096)).for_each(|(o, i)| widen_into(i, o));
    let mut wf = vec![0f32; WIDEN_STRIPE.min(n) * k];
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    for j0 in (0..n).step_by(WIDEN_STRIPE) {
        let nj = WIDEN_STRIPE.min(n - j0);
        let wf = &mut wf[..nj * k];
        wf.par_chunks_mut(4096).zip(w[j0 * k..(j0 + nj) * k].par_chunks(4096)).for_each(|(o, i)| widen_into(i, o));
        // SAFETY: `dst` = columns j0..j0 + nj of `out` ([m, n] row-major: row stride n, column
        // stride 1), inside `out` since j0 + nj <= n; `lhs` = `af` [m, k] row-major; `rhs` = the
        // stripe read as its transpose [k, nj] (row stride 1, column stride k); every index the
        // GEMM reads or writes lies inside those slices, which outlive the call.
        unsafe {
            gemm::gemm(
                m,
                nj,
                k,
                out.as_mut_ptr().add(j0),
                1,
                n as isize,
                false,
                af.as_ptr(),
                1,
                k as isize,
                wf.as_ptr(),
                k as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                parallelism,
            )
        };
    }
}

#[inline]
fn widen_into(bits: &[u16], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(bits) {
        *o = widen(b);
    }
}

/// `y[r, j] = Σ_p x[r, p] · w[j, p]` for f32 activations `x` `[rows, k]` and BF16 weight bits
/// `w` `[n, k]`: returns `[rows, n]` f32. The weight is streamed once (blocks of 64 rows of `W`
/// per task, every row of `x` against each); f32 fused multiply-adds in 16 partial sums. For
/// `rows` up to 8 (decoding); any CPU, with AVX2 + FMA where [`cpu`](super::cpu) allows it.
pub fn gemv_f32(x: &[f32], rows: usize, w: &[u16], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    gemv_f32_into(super::cpu::kernel_set(), x, rows, w, n, k, &mut out);
    out
}

/// [`gemv_f32`] into `out` `[rows, n]` with the kernel set `set`.
fn gemv_f32_into(set: super::cpu::KernelSet, x: &[f32], rows: usize, w: &[u16], n: usize, k: usize, out: &mut [f32]) {
    const BLOCK: usize = 64;
    assert_eq!(x.len(), rows * k, "gemv_f32: x has {} values, expected rows * k = {rows} * {k}", x.len());
    assert_eq!(w.len(), n * k, "gemv_f32: w has {} values, expected n * k = {n} * {k}", w.len());
    let mut out_t = vec![0f32; n * rows]; // [n, rows]
    if rows > 0 {
        out_t.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(bi, chunk)| {
            let j0 = bi * BLOCK;
            let nj = chunk.len() / rows;
            gemv_block(set, x, rows, &w[j0 * k..(j0 + nj) * k], nj, k, chunk);
        });
    }
    for j in 0..n {
        for r in 0..rows {
            out[r * n + j] = out_t[j * rows + r];
        }
    }
}

fn gemv_block(set: super::cpu::KernelSet, x: &[f32], rows: usize, w: &[u16], nj: usize, k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if set >= super::cpu::KernelSet::Avx2 {
        // SAFETY: `set` allows AVX2 + FMA only where they were detected at run time.
        unsafe { gemv_block_avx2(x, rows, w, nj, k, out) };
        return;
    }
    let _ = set;
    gemv_block_generic(x, rows, w, nj, k, out);
}

/// [`gemv_block_generic`] with four weight rows at a time (eight independent FMA chains, four
/// weight streams), the same sums in the same order (so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gemv_block_avx2(x: &[f32], rows: usize, w: &[u16], nj: usize, k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    const J: usize = 4;
    let full = nj / J * J;
    let chunks = k / 16;
    // 16 BF16 bits from `s` widened to f32: the low and the high 8.
    let widen16 = |s: &[u16]| {
        let s: &[u16; 16] = s.try_into().expect("16 values");
        // SAFETY: `s` is 32 readable bytes; `loadu` has no alignment requirement; AVX2 is
        // enabled in this function.
        let v = unsafe { _mm256_loadu_si256(s.as_ptr().cast()) };
        let lo = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)));
        let hi = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(v)));
        (_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi))
    };
    for j0 in (0..full).step_by(J) {
        let wr: [&[u16]; J] = std::array::from_fn(|jj| &w[(j0 + jj) * k..(j0 + jj + 1) * k]);
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            let mut acc = [[_mm256_setzero_ps(); 2]; J];
            for c in 0..chunks {
                let xs: &[f32; 16] = xr[c * 16..(c + 1) * 16].try_into().expect("16 values");
                // SAFETY: `xs` is 64 readable bytes; `loadu` has no alignment requirement.
                let (x0, x1) = unsafe { (_mm256_loadu_ps(xs.as_ptr()), _mm256_loadu_ps(xs.as_ptr().add(8))) };
                for jj in 0..J {
                    let (lo, hi) = widen16(&wr[jj][c * 16..(c + 1) * 16]);
                    acc[jj][0] = _mm256_fmadd_ps(x0, lo, acc[jj][0]);
                    acc[jj][1] = _mm256_fmadd_ps(x1, hi, acc[jj][1]);
                }
            }
            for jj in 0..J {
                // The 16 partial sums in lane order, then the tail: as `dot_bf16w`.
                let mut lanes = [0f32; 16];
                // SAFETY: `lanes` is 64 writable bytes.
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[jj][0]);
                    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[jj][1]);
                }
                let mut sum: f32 = lanes.iter().sum();
                for i in chunks * 16..k {
                    sum += xr[i] * widen(wr[jj][i]);
                }
                out[(j0 + jj) * rows + r] = sum;
            }
        }
    }
    gemv_block_generic(x, rows, &w[full * k..], nj - full, k, &mut out[full * rows..]);
}

#[inline(always)]
fn gemv_block_generic(x: &[f32], rows: usize, w: &[u16], nj: usize, k: usize, out: &mut [f32]) {
    for j in 0..nj {
        let wr = &w[j * k..(j + 1) * k];
        for r in 0..rows {
            out[j * rows + r] = dot_bf16w(&x[r * k..(r + 1) * k], wr);
        }
    }
}

/// `Σ x[i] · w[i]`, `w` as BF16 bits, in 16 partial sums of fused multiply-adds (vectorised
/// under AVX2 + FMA).
#[inline(always)]
fn dot_bf16w(x: &[f32], w: &[u16]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = x.len() / LANES;
    for c in 0..chunks {
        let xs = &x[c * LANES..(c + 1) * LANES];
        let ws = &w[c * LANES..(c + 1) * LANES];
        for i in 0..LANES {
            acc[i] = xs[i].mul_add(widen(ws[i]), acc[i]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * LANES..x.len() {
        sum += x[i] * widen(w[i]);
    }
    sum
}

#[inline]
fn widen(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

#[cfg(target_arch = "x86_64")]
// Register-blocked kernels index their accumulator arrays by loop counters on purpose.
#[allow(clippy::needless_range_loop)]
pub(crate) mod avx512 {
    use crate::kernels::out_ptr::OutPtr;
    use crate::kernels::pack_cache::PackCache;
    use crate::kernels::task_grid::TaskGrid;
    pub(crate) use crate::kernels::transpose::transpose16;
    use core::arch::x86_64::*;
    use core::mem::transmute;
    use rayon::prelude::*;
    use std::cell::RefCell;

    /// Most rows of `A` for the streaming (matrix-vector) kernel: above, the GEMM (which packs
    /// all of `W` once per call) is faster (measured: ~48 rows is the crossover).
    pub(super) const GEMV_MAX_ROWS: usize = 48;
    /// Rows of the GEMM micro-tile (each a 32-bit broadcast).
    const MR: usize = 14;
    /// Columns of the GEMM micro-tile (2 zmm of 16 f32).
    const NR: usize = 32;
    /// `k` pairs per cache block (the packed micro-panel of `A` is `KCP * MR * 4` bytes, in L1).
    const KCP: usize = 256;
    /// Micro-panels (of `NR` columns) per column stripe: a task's packed stripe of `W` is
    /// `NC_PANELS * NR * k * 2` bytes.
    const NC_PANELS: usize = 8;
    /// Row tiles per cache block of packed `A` (`MC_TILES * MR * KCP * 4` bytes, in L2).
    const MC_TILES: usize = 12;
    /// Rows of `W` per task in the streaming kernel.
    const GEMV_NB: usize = 64;
    /// Rows of `W` per block (kept in L2) in the streaming kernel for more than 4 rows of `A`.
    const GEMV_JB: usize = 16;

    /// Packed `A`, kept between calls (at most 64 Mi u32 elements: 256 MiB).
    static A_PACK: PackCache<u32> = PackCache::new(64 << 20);

    thread_local! {
        /// Packed stripe of `W`, reused by the tasks run on this thread.
        static PACK: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    }

    /// Blocked GEMM, `m > GEMV_MAX_ROWS` (works for any `m >= 1`).
    ///
    /// # Safety
    /// The CPU has avx512f, avx512bw and avx512bf16; the slices match the shapes; `k >= 1`.
    pub(super) unsafe fn gemm(a: &[u16], m: usize, w: &[u16], n: usize, k: usize, out: &mut [f32]) {
        let kp = k.div_ceil(2);
        let m_tiles = m.div_ceil(MR);
        // `A` packed once, shared by all tasks: tiles of MR rows, `[kp][MR]` pairs each.
        let tile_len = kp * MR;
        let len = m_tiles * tile_len;
        A_PACK.with(len, 0, |apack| {
            apack.par_chunks_mut(tile_len).enumerate().for_each(|(t, dst)| {
                let r0 = t * MR;
                let rows = MR.min(m - r0);
                // SAFETY: the CPU has the features (caller's contract).
                unsafe { pack_rows::<MR>(&a[r0 * k..(r0 + rows) * k], k, dst) };
            });
            let grid = TaskGrid::new(n, NR, NC_PANELS, m_tiles);
            let outp = OutPtr::new(out);
            let apack = &apack[..];
            grid.run(&PACK, |j0, j1, t0, t1, buf| {
                // SAFETY: as for `gemm`; the task writes the rows of tiles t0..t1, columns j0..j1 only.
                unsafe { gemm_task(apack, m, t0, t1, w, n, k, j0, j1 - j0, outp, buf) }
            });
        })
    }

    /// One task of [`gemm`]: row tiles `t0..t1` (`apack`: packed `A`), columns `j0..j0 + cols`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_task(
        apack: &[u32],
        m: usize,
        t0: usize,
        t1: usize,
        w: &[u16],
        n: usize,
        k: usize,
        j0: usize,
        cols: usize,
        out: OutPtr,
        buf: &mut Vec<u32>,
    ) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let kp = k.div_ceil(2);
            let panels = cols.div_ceil(NR);
            let panel_len = kp * NR;
            if buf.len() < panels * panel_len {
                // Every element in use is overwritten by the packing below.
                buf.resize(panels * panel_len, 0);
            }
            for p in 0..panels {
                let c0 = j0 + p * NR;
                let valid = NR.min(j0 + cols - c0);
                pack_rows::<NR>(&w[c0 * k..(c0 + valid) * k], k, &mut buf[p * panel_len..(p + 1) * panel_len]);
            }
            let c = out.get();
            let ap = apack.as_ptr();
            let bp = buf.as_ptr();
            let mut tc = t0;
            while tc < t1 {
                let tc_end = t1.min(tc + MC_TILES);
                let mut pc = 0;
                while pc < kp {
                    let kcp = KCP.min(kp - pc);
                    let accumulate = pc > 0;
                    let tile = |t: usize, p: usize| {
                        let c0 = j0 + p * NR;
                        let valid = NR.min(j0 + cols - c0);
                        let m0 = if valid >= 16 { 0xffff } else { (1u32 << valid) as u16 - 1 };
                        let m1 = if valid <= 16 {
                            0
                        } else if valid >= 32 {
                            0xffff
                        } else {
                            (1u32 << (valid - 16)) as u16 - 1
                        };
                        let b = bp.add(p * panel_len + pc * NR);
                        let rows = MR.min(m - t * MR);
                        let at = ap.add(t * kp * MR + pc * MR);
                        let ct = c.add(t * MR * n + c0);
                        macro_rules! call {
                        ($($r:literal)*) => {
                            match rows {
                                $($r => micro::<$r>(at, b, kcp, ct, n, m0, m1, accumulate),)*
                                _ => {}
                            }
                        };
                    }
                        call!(1 2 3 4 5 6 7 8 9 10 11 12 13 14);
                    };
                    // A micro-panel of `A` stays in L1 while the micro-panels of `W` stream from L2.
                    for t in tc..tc_end {
                        for p in 0..panels {
                            tile(t, p);
                        }
                    }
                    pc += kcp;
                }
                tc = tc_end;
            }
        }
    }

    /// Packs the rows of `src` (`[rows, k]`, `rows <= S`) as
    /// `dst[q * S + r] = x[r, 2q] | x[r, 2q + 1] << 16` for `q < ceil(k / 2)`, `r < S`; missing
    /// rows and the odd-`k` last high half are zeros. Every element of `dst[..ceil(k/2) * S]` is
    /// written. By 16×16 transposes of 32-bit pairs (16 rows × 16 pairs at a time).
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pack_rows<const S: usize>(src: &[u16], k: usize, dst: &mut [u32]) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let rows = src.len() / k;
            let kp = k.div_ceil(2);
            debug_assert!(rows <= S && dst.len() >= kp * S);
            let d = dst.as_mut_ptr();
            let mut g0 = 0;
            while g0 < S {
                let lanes = 16.min(S - g0);
                let lane_mask: u16 = if lanes == 16 { 0xffff } else { (1u32 << lanes) as u16 - 1 };
                let mut q0 = 0;
                while q0 < kp {
                    let count = 32.min(k - 2 * q0);
                    let load_mask: u32 = if count == 32 { u32::MAX } else { (1u32 << count) - 1 };
                    let mut v = [_mm512_setzero_si512(); 16];
                    for (r, x) in v.iter_mut().enumerate() {
                        if g0 + r < rows {
                            *x = _mm512_maskz_loadu_epi16(
                                load_mask,
                                src.as_ptr().add((g0 + r) * k + 2 * q0) as *const i16,
                            );
                        }
                    }
                    let t = transpose16(v);
                    for (qq, x) in t.iter().enumerate().take(16.min(kp - q0)) {
                        _mm512_mask_storeu_epi32(d.add((q0 + qq) * S + g0) as *mut i32, lane_mask, *x);
                    }
                    q0 += 16;
                }
                g0 += 16;
            }
        }
    }

    #[inline(always)]
    fn bh(v: __m512i) -> __m512bh {
        // SAFETY: same size, plain bits.
        unsafe { transmute(v) }
    }

    /// `R`×32 micro-tile: `c[r, 0..32] (+)= Σ_q a[q, r] · b[q, 0..32]` over `pairs` pairs
    /// (`a`: packed micro-panel, `MR` u32 per pair; `b`: packed micro-panel, 32 u32 per pair).
    /// Stores the columns enabled in `m0` (0..16) and `m1` (16..32) of rows `0..R` (stride `ldc`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro<const R: usize>(
        a: *const u32,
        b: *const u32,
        pairs: usize,
        c: *mut f32,
        ldc: usize,
        m0: u16,
        m1: u16,
        accumulate: bool,
    ) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            // The output tile is needed at the end: start fetching it now. (`wrapping_add`: with a
            // partial panel the second half may lie past the end of `out`; a prefetch never faults,
            // nor does a masked-off lane of a masked load or store.)
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(r * ldc + 16) as *const i8);
            }
            let mut c0 = [_mm512_setzero_ps(); R];
            let mut c1 = [_mm512_setzero_ps(); R];
            let mut aq = a;
            let mut bq = b;
            for _ in 0..pairs {
                let b0 = bh(_mm512_loadu_si512(bq as *const _));
                let b1 = bh(_mm512_loadu_si512(bq.add(16) as *const _));
                for r in 0..R {
                    let av = bh(_mm512_set1_epi32(*aq.add(r) as i32));
                    c0[r] = _mm512_dpbf16_ps(c0[r], av, b0);
                    c1[r] = _mm512_dpbf16_ps(c1[r], av, b1);
                }
                aq = aq.add(MR);
                bq = bq.add(NR);
            }
            for r in 0..R {
                let cr = c.add(r * ldc);
                let cr16 = cr.wrapping_add(16);
                if accumulate {
                    c0[r] = _mm512_add_ps(c0[r], _mm512_maskz_loadu_ps(m0, cr));
                    c1[r] = _mm512_add_ps(c1[r], _mm512_maskz_loadu_ps(m1, cr16));
                }
                _mm512_mask_storeu_ps(cr, m0, c0[r]);
                _mm512_mask_storeu_ps(cr16, m1, c1[r]);
            }
        }
    }

    /// Streaming kernel for `m <= GEMV_MAX_ROWS`: `W` is read from memory once, dot products
    /// along `k`.
    ///
    /// `A` is copied as `[ceil(k / 32)][m][32]` (zero padded), so that the `m` 32-value pieces a
    /// step needs are adjacent (rows of `A` a power of two apart would share L1 sets). Each task
    /// takes `GEMV_NB` rows of `W`, streamed whole, a few at a time; for more than 4 rows of `A`,
    /// in blocks of `GEMV_JB` rows that the rows of `A` after the first 4 read from L2.
    ///
    /// # Safety
    /// The CPU has avx512f, avx512bw and avx512bf16; the slices match the shapes; `k >= 1`.
    pub(super) unsafe fn gemv(a: &[u16], m: usize, w: &[u16], n: usize, k: usize, out: &mut [f32]) {
        let steps = k.div_ceil(32);
        let mut apack = vec![0u16; steps * m * 32];
        for (i, row) in a.chunks_exact(k).enumerate() {
            for (s, piece) in row.chunks(32).enumerate() {
                apack[(s * m + i) * 32..][..piece.len()].copy_from_slice(piece);
            }
        }
        let apack = &apack[..];
        let outp = OutPtr::new(out);
        (0..n.div_ceil(GEMV_NB)).into_par_iter().for_each(|t| {
            let j0 = t * GEMV_NB;
            let j1 = n.min(j0 + GEMV_NB);
            // SAFETY: as for `gemv`; the task writes columns j0..j1 only.
            unsafe { gemv_task(apack, m, w, n, k, j0, j1, outp) };
        });
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemv_task(ap: &[u16], m: usize, w: &[u16], n: usize, k: usize, j0: usize, j1: usize, out: OutPtr) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let (ap, w, c) = (ap.as_ptr(), w.as_ptr(), out.get());
            // Row stride of packed `A` (one 32-value step of all `m` rows).
            let sa = m * 32;
            match m {
                1 => gemv_rows::<1, 8, true>(ap, sa, w, k, j0, j1, c, n),
                2 => gemv_rows::<2, 8, true>(ap, sa, w, k, j0, j1, c, n),
                3 => gemv_rows::<3, 4, true>(ap, sa, w, k, j0, j1, c, n),
                4 => gemv_rows::<4, 4, true>(ap, sa, w, k, j0, j1, c, n),
                _ => {
                    // Rows 0..4 of `A` stream a block of `W` from memory, the others find it in the
                    // L2 cache, 4 rows at a time (more rows at once would leave fewer rows of `W`
                    // in flight, or not fit the registers).
                    let mut jb = j0;
                    while jb < j1 {
                        let je = j1.min(jb + GEMV_JB);
                        gemv_rows::<4, 4, true>(ap, sa, w, k, jb, je, c, n);
                        let mut i0 = 4;
                        while i0 < m {
                            let (api, ci) = (ap.add(i0 * 32), c.add(i0 * n));
                            match m - i0 {
                                1 => gemv_rows::<1, 8, false>(api, sa, w, k, jb, je, ci, n),
                                2 => gemv_rows::<2, 8, false>(api, sa, w, k, jb, je, ci, n),
                                3 => gemv_rows::<3, 4, false>(api, sa, w, k, jb, je, ci, n),
                                _ => gemv_rows::<4, 4, false>(api, sa, w, k, jb, je, ci, n),
                            }
                            i0 += 4;
                        }
                        jb = je;
                    }
                }
            }
        }
    }

    /// Rows `j0..j1` of `W` against `M` rows of packed `A` (from `ap`, `sa` u16 per 32-value
    /// step), `J` rows of `W` at a time: `c[i * ldc + j] = Σ_p a[i, p] w[j, p]`. With `PF`,
    /// prefetches (to L2) the rows of `W` two groups ahead.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemv_rows<const M: usize, const J: usize, const PF: bool>(
        ap: *const u16,
        sa: usize,
        w: *const u16,
        k: usize,
        j0: usize,
        j1: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let mut j = j0;
            while j + J <= j1 {
                gemv_group::<M, J, PF>(ap, sa, w.add(j * k), k, c.add(j), ldc);
                j += J;
            }
            while j < j1 {
                gemv_group::<M, 1, false>(ap, sa, w.add(j * k), k, c.add(j), ldc);
                j += 1;
            }
        }
    }

    /// `J` rows of `W` (from `w`, stride `k`) against `M` rows of packed `A`:
    /// `c[i * ldc + j]` for `i < M`, `j < J`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn gemv_group<const M: usize, const J: usize, const PF: bool>(
        ap: *const u16,
        sa: usize,
        w: *const u16,
        k: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); M]; J];
            let full = k / 32;
            for s in 0..full {
                let mut wv = [bh(_mm512_setzero_si512()); J];
                for j in 0..J {
                    wv[j] = bh(_mm512_loadu_si512(w.add(j * k + s * 32) as *const _));
                }
                if PF {
                    for j in 0..J {
                        // May point past `W` near its end: a prefetch never faults.
                        _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add((2 * J + j) * k + s * 32) as *const i8);
                    }
                }
                let a = ap.add(s * sa);
                for i in 0..M {
                    let av = bh(_mm512_loadu_si512(a.add(i * 32) as *const _));
                    for j in 0..J {
                        acc[j][i] = _mm512_dpbf16_ps(acc[j][i], av, wv[j]);
                    }
                }
            }
            if full * 32 < k {
                // The last, partial step: masked loads of `W` (packed `A` is zero padded).
                let s = full;
                let mask = ((1u64 << (k - s * 32)) - 1) as u32;
                let mut wv = [bh(_mm512_setzero_si512()); J];
                for j in 0..J {
                    wv[j] = bh(_mm512_maskz_loadu_epi16(mask, w.add(j * k + s * 32) as *const i16));
                }
                let a = ap.add(s * sa);
                for i in 0..M {
                    let av = bh(_mm512_loadu_si512(a.add(i * 32) as *const _));
                    for j in 0..J {
                        acc[j][i] = _mm512_dpbf16_ps(acc[j][i], av, wv[j]);
                    }
                }
            }
            for j in 0..J {
                for i in 0..M {
                    *c.add(i * ldc + j) = _mm512_reduce_add_ps(acc[j][i]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::{self, KernelSet};

    use crate::kernels::testing::bf16_values as values;

    fn widen64(b: u16) -> f64 {
        widen(b) as f64
    }

    /// First violation of `|out - ref| <= 1e-5 * Σ|a w| + 1e-6` (f64 reference,
    /// [`crate::kernels::testing::check_gemm`]), as `Err((i, j, got, want))`.
    fn check(a: &[u16], m: usize, w: &[u16], n: usize, k: usize, out: &[f32]) -> Result<(), (usize, usize, f32, f64)> {
        crate::kernels::testing::check_gemm(out, m, n, 1e-6, |i, j| {
            (0..k)
                .map(|p| widen64(a[i * k + p]) * widen64(w[j * k + p]))
                .fold((0f64, 0f64), |(s, abs), v| (s + v, abs + v.abs()))
        })
    }

    /// `matmul_bf16` on the calling thread's kernel set against the f64 reference.
    fn run(m: usize, n: usize, k: usize, set: KernelSet) {
        let a = values(m * k, (m * 1000 + k) as u64);
        let w = values(n * k, (n * 7919 + k) as u64 + 1);
        // NaN everywhere: every element must be overwritten.
        let mut out = vec![f32::NAN; m * n];
        matmul_bf16(&a, m, &w, n, k, &mut out);
        if let Err((i, j, got, want)) = check(&a, m, &w, n, k, &out) {
            panic!("m={m} n={n} k={k} kernels={set}: out[{i}, {j}] = {got}, want {want}");
        }
    }

    const MS: [usize; 8] = [1, 2, 3, 7, 8, 9, 17, 130];
    const NS: [usize; 5] = [1, 15, 16, 17, 100];
    const KS: [usize; 6] = [1, 2, 31, 32, 33, 300];

    /// Every kernel set this CPU has (AVX-512 BF16, AVX2, portable), each forced in turn.
    #[test]
    fn every_kernel_set_matches_reference() {
        cpu::for_each_set(|set| {
            for m in MS {
                for n in NS {
                    for k in KS {
                        run(m, n, k, set);
                    }
                }
            }
        });
    }

    /// Shapes that cross the cache blocks (several k blocks, odd k, stripes, partial tiles and
    /// partial 32-column panels) and the matrix-vector kernel's 32-value steps.
    #[test]
    fn blocked_shapes_match_reference() {
        for &(m, n, k) in &[
            (200, 300, 1101),
            (190, 520, 514),
            (61, 600, 257),
            (29, 130, 1001),
            (8, 130, 1001),
            (5, 67, 4097),
            (15, 33, 64),
        ] {
            cpu::for_each_set(|set| run(m, n, k, set));
        }
    }

    /// The decode matrix-vector product (`gemv_f32`) gives the same bits on every kernel set
    /// (the AVX2 kernel sums in the portable loop's order), and matches the f64 reference:
    /// weight rows not a multiple of its 4 at a time, `k` not a multiple of 16, 1-8 rows.
    #[test]
    fn gemv_f32_same_bits_on_every_set() {
        for &(rows, n, k) in &[(1, 7, 35), (1, 64, 256), (3, 13, 100), (8, 5, 48), (2, 130, 16)] {
            let x: Vec<f32> = values(rows * k, 3).into_iter().map(widen).collect();
            let w = values(n * k, 4);
            let mut want = vec![0f32; rows * n];
            gemv_f32_into(KernelSet::Portable, &x, rows, &w, n, k, &mut want);
            for r in 0..rows {
                for j in 0..n {
                    let e: f64 = (0..k).map(|p| x[r * k + p] as f64 * widen64(w[j * k + p])).sum();
                    let tol =
                        1e-5 * (1.0 + (0..k).map(|p| (x[r * k + p] as f64 * widen64(w[j * k + p])).abs()).sum::<f64>());
                    assert!((want[r * n + j] as f64 - e).abs() <= tol, "rows={rows} n={n} k={k}: [{r}, {j}]");
                }
            }
            for set in cpu::available_sets() {
                let mut got = vec![f32::NAN; rows * n];
                gemv_f32_into(set, &x, rows, &w, n, k, &mut got);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{set}: rows={rows} n={n} k={k}");
            }
        }
    }

    /// The GEMM and the streaming kernel called directly, whatever `m` would pick: every tile
    /// height of the GEMM, every row remainder of the streaming kernel.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_fast_kernel_on_all_row_counts() {
        if !has_fast_path() {
            eprintln!("no AVX-512 BF16 on this CPU: skipped");
            return;
        }
        type Kernel = unsafe fn(&[u16], usize, &[u16], usize, usize, &mut [f32]);
        let kernels: [(&str, Kernel, usize); 2] =
            [("gemm", avx512::gemm, 30), ("gemv", avx512::gemv, avx512::GEMV_MAX_ROWS)];
        for (name, kernel, max_m) in kernels {
            for m in 1..=max_m {
                for (n, k) in [(1, 33), (17, 31), (33, 300), (100, 2), (40, 1)] {
                    let a = values(m * k, (m * 31 + k) as u64);
                    let w = values(n * k, (n * 17 + k) as u64);
                    let mut out = vec![f32::NAN; m * n];
                    // SAFETY: the CPU has the features; the lengths match; k >= 1.
                    unsafe { kernel(&a, m, &w, n, k, &mut out) };
                    if let Err((i, j, got, want)) = check(&a, m, &w, n, k, &out) {
                        panic!("{name} m={m} n={n} k={k}: out[{i}, {j}] = {got}, want {want}");
                    }
                }
            }
        }
    }

    /// Shapes of the AMX path (`k % 32 == 0`): several `k` blocks, several row blocks and task
    /// stripes, row and column tails, odd tile counts; run on every kernel set (so the lower
    /// paths see them too), and the AMX kernel called directly from 16 rows up.
    #[test]
    fn amx_shapes_match_reference() {
        let shapes = [
            (49, 17, 32),
            (300, 300, 1056),
            (257, 129, 544),
            (64, 16, 64),
            (530, 40, 96),
            (16, 1, 32),
            (33, 250, 64),
            // Several `k` blocks (partial sums carried over), the last one a single step.
            (49, 40, 4128),
            (130, 33, 2080),
            // Up to 64 rows (`matmul_few_rows`): one tile of `W` at a time, odd step counts, 1-4
            // tile rows of `A`.
            (2, 17, 32),
            (20, 33, 96),
            (40, 20, 64),
            (64, 17, 4128),
            (49, 48, 32),
            (8, 40, 96),
            (16, 33, 4128),
            (5, 16, 64),
            (13, 1, 32),
        ];
        for &(m, n, k) in &shapes {
            cpu::for_each_set(|set| run(m, n, k, set));
        }
        #[cfg(target_arch = "x86_64")]
        {
            if !crate::kernels::bf16_amx::applies(16, 32) {
                eprintln!("no AMX BF16 on this CPU (or not permitted): the direct AMX calls skipped");
                return;
            }
            use crate::kernels::bf16_amx::{applies, applies_few_rows, matmul, matmul_few_rows};
            type Kernel = unsafe fn(&[u16], usize, &[u16], usize, usize, &mut [f32]);
            let kernels: [(&str, Kernel, fn(usize, usize) -> bool); 2] =
                [("amx", matmul, applies), ("amx few rows", matmul_few_rows, applies_few_rows)];
            for (name, kernel, applies) in kernels {
                for &(m, n, k) in shapes.iter().filter(|&&(m, _, k)| applies(m, k)) {
                    let a = values(m * k, (m * 3 + k) as u64);
                    let w = values(n * k, (n * 5 + k) as u64);
                    let mut out = vec![f32::NAN; m * n];
                    // SAFETY: `applies` held (AMX, k % 32 == 0, the kernel's rows); the lengths match.
                    unsafe { kernel(&a, m, &w, n, k, &mut out) };
                    if let Err((i, j, got, want)) = check(&a, m, &w, n, k, &out) {
                        panic!("{name} m={m} n={n} k={k}: out[{i}, {j}] = {got}, want {want}");
                    }
                }
            }
        }
    }

    /// The AMX GEMM's BF16 output (bias added and activation applied in its pass) is bit for bit
    /// the rounding of its f32 product by `linear_output_bf16`; the other sets decline.
    #[test]
    fn rounded_output_equals_rounding_the_f32_product() {
        use crate::kernels::fused::{linear_output_bf16, Activation};
        let mut fused_runs = 0;
        for &(m, n, k) in &[(300, 300, 1056), (257, 129, 544), (65, 17, 32), (530, 40, 96), (130, 250, 2080)] {
            let a = values(m * k, (m * 3 + k) as u64);
            let w = values(n * k, (n * 5 + k) as u64);
            let bias: Vec<f32> = (0..n).map(|j| (j as f32 - 50.0) / 7.0).collect();
            cpu::for_each_set(|set| {
                for bias in [Some(&bias[..]), None] {
                    for act in [Activation::Identity, Activation::QuickGelu, Activation::Scale(0.3)] {
                        let Some(got) = matmul_bf16_rounded(&a, m, &w, n, k, bias, act) else { continue };
                        fused_runs += 1;
                        let mut f = vec![f32::NAN; m * n];
                        matmul_bf16(&a, m, &w, n, k, &mut f);
                        let want = linear_output_bf16(&f, n, bias, act);
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "{set} m={m} n={n} k={k} bias {} {act:?}: element [{}, {}]",
                                bias.is_some(),
                                i / n,
                                i % n
                            );
                        }
                    }
                }
            });
        }
        // AVX2 allowed here (this CPU, within VIDEOLLAVA_KERNELS): the fused output must have run
        // (the f32-FMA GEMM with AVX2 forced, the AMX GEMM where the CPU has it).
        let avx2 = cpu::kernel_set() >= cpu::KernelSet::Avx2;
        assert_eq!(fused_runs > 0, avx2, "the rounded output ran {fused_runs} times; AVX2 allowed: {avx2}");
    }

    /// Prefill (m = 512: one prefill chunk) and vision (m = 2056: 8 frames of 257 patches) shapes
    /// of Llama-7B and CLIP-L, each kernel set this CPU has forced in turn, interleaved.
    /// `cargo test --release -p videollava --lib bf16_gemm::tests::bench -- --ignored --nocapture`
    /// (`BENCH_SET=amx`, say, for one set only).
    #[test]
    #[ignore]
    fn bench_prefill_shapes() {
        use std::time::Instant;
        let iters = 5;
        eprintln!("threads: rayon {}, sets: {:?}", rayon::current_num_threads(), cpu::available_sets());
        let shapes = [
            (512, 4096, 4096),
            (512, 11008, 4096),
            (512, 4096, 11008),
            (2056, 1024, 1024),
            (2056, 4096, 1024),
            (2056, 1024, 4096),
        ];
        for &(m, n, k) in &shapes {
            let a = values(m * k, 1);
            let w = values(n * k, 2);
            let mut out = vec![0f32; m * n];
            let mut line = format!("m={m:4} n={n:5} k={k:5}:");
            let only = std::env::var("BENCH_SET").ok();
            for set in cpu::available_sets().into_iter().filter(|&s| s >= KernelSet::Avx2) {
                if only.as_deref().is_some_and(|o| o != set.name()) {
                    continue;
                }
                let _g = cpu::force(set);
                matmul_bf16(&a, m, &w, n, k, &mut out);
                let mut t: Vec<f64> = (0..iters)
                    .map(|_| {
                        let t = Instant::now();
                        matmul_bf16(&a, m, &w, n, k, &mut out);
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                t.sort_by(f64::total_cmp);
                line += &format!(" {set} {:7.1}", 2.0 * (m * n * k) as f64 / t[iters / 2] / 1e9);
            }
            eprintln!("{line} GFLOP/s");
        }
    }

    /// The vision tower's product shapes (8 frames of CLIP-L: 2,056 rows; `q`, `k`, `v` and
    /// `out_proj` share the first) with their BF16 output as the tower's linear layers make it
    /// (rounded in the GEMM where a kernel does that, else the f32 product then its rounding
    /// pass; `fc1` with `quick_gelu`), each kernel set from AVX2 up forced in turn: milliseconds
    /// and GFLOP/s, medians of 7 (`BENCH_M` for another row count, `BENCH_SET` for one set).
    /// `cargo test --release -p videollava --lib bf16_gemm::tests::bench_clip -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_clip_shapes() {
        use crate::kernels::fused::Activation;
        use std::time::Instant;
        let shapes = [
            (2056, 1024, 1024, Activation::Identity),
            (2056, 4096, 1024, Activation::QuickGelu),
            (2056, 1024, 4096, Activation::Identity),
        ];
        let only = std::env::var("BENCH_SET").ok();
        for &(m, n, k, act) in &shapes {
            let m = std::env::var("BENCH_M").ok().and_then(|v| v.parse().ok()).unwrap_or(m);
            let a = values(m * k, 1);
            // Weights scaled so that the outputs are of CLIP's size (a few units, no denormal
            // `quick_gelu`: those cost a microcode assist each and CLIP does not produce them).
            let w: Vec<u16> = values(n * k, 2)
                .into_iter()
                .map(|b| ((f32::from_bits((b as u32) << 16) * 0.01).to_bits() >> 16) as u16)
                .collect();
            for set in cpu::available_sets().into_iter().filter(|&s| s >= KernelSet::Avx2) {
                if only.as_deref().is_some_and(|o| o != set.name()) {
                    continue;
                }
                let _g = cpu::force(set);
                let mut t: Vec<f64> = (0..8)
                    .map(|_| {
                        let t = Instant::now();
                        std::hint::black_box(matmul_bf16_rounded(&a, m, &w, n, k, None, act).unwrap_or_else(|| {
                            let mut out = vec![0f32; m * n];
                            matmul_bf16(&a, m, &w, n, k, &mut out);
                            crate::kernels::fused::linear_output_bf16(&out, n, None, act)
                        }));
                        t.elapsed().as_secs_f64()
                    })
                    .skip(1)
                    .collect();
                t.sort_by(f64::total_cmp);
                eprintln!(
                    "m={m:4} n={n:5} k={k:5} {act:?} {set}: {:6.2} ms {:6.0} GFLOP/s",
                    t[3] * 1e3,
                    2.0 * (m * n * k) as f64 / t[3] / 1e9
                );
            }
        }
    }

    /// The AMX GEMM's BF16 output against its f32 output rounded in a second pass, at the 7B
    /// prefill and CLIP-L shapes, interleaved: milliseconds per product.
    /// `cargo test --release -p videollava --lib bf16_gemm::tests::bench_rounded -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_rounded_output() {
        use crate::kernels::fused::{linear_output_bf16, Activation};
        use std::time::Instant;
        let shapes =
            [(512, 4096, 4096), (512, 11008, 4096), (512, 4096, 11008), (2056, 4096, 1024), (2056, 1024, 4096)];
        for &(m, n, k) in &shapes {
            let a = values(m * k, 1);
            let w = values(n * k, 2);
            let mut f = vec![0f32; m * n];
            let (mut two, mut one) = (vec![], vec![]);
            for _ in 0..7 {
                let t = Instant::now();
                matmul_bf16(&a, m, &w, n, k, &mut f);
                std::hint::black_box(linear_output_bf16(&f, n, None, Activation::Identity));
                two.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                std::hint::black_box(matmul_bf16_rounded(&a, m, &w, n, k, None, Activation::Identity));
                one.push(t.elapsed().as_secs_f64() * 1e3);
            }
            two.sort_by(f64::total_cmp);
            one.sort_by(f64::total_cmp);
            eprintln!(
                "m={m:4} n={n:5} k={k:5}: f32 + rounding pass {:7.2} ms, rounded in the GEMM {:7.2} ms",
                two[3], one[3]
            );
        }
    }

    /// The seven projections of one 7B decoder layer (`(n, k)` each, random BF16 weights): the
    /// MLP width, the shapes, the weights and their bytes.
    #[allow(clippy::type_complexity)]
    fn seven_b_layer() -> (usize, [(usize, usize); 7], Vec<Vec<u16>>, usize) {
        let (h, f) = (4096, 11008);
        let layer = [(h, h), (h, h), (h, h), (h, h), (f, h), (f, h), (h, f)];
        let ws: Vec<Vec<u16>> = layer.iter().enumerate().map(|(i, &(n, k))| values(n * k, i as u64 + 9)).collect();
        let bytes: usize = layer.iter().map(|&(n, k)| n * k * 2).sum();
        (f, layer, ws, bytes)
    }

    /// Decode shapes: the seven projections of one Llama-7B layer (404 MB of BF16, more than the
    /// caches) for 1..16 rows of `A` (one decode step of that many running requests), each
    /// kernel set from AVX-512 up forced in turn; prints the milliseconds per layer and the
    /// weight bytes read per second.
    /// `cargo test --release -p videollava --lib bf16_gemm::tests::bench_decode -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_decode_shapes() {
        use std::time::Instant;
        let (f, layer, ws, bytes) = seven_b_layer();
        let only = std::env::var("BENCH_SET").ok();
        let ms: Vec<usize> = std::env::var("BENCH_ROWS")
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
            .unwrap_or(vec![1, 2, 4, 8, 12, 16]);
        for m in ms {
            let a = values(m * f, 5);
            let mut out = vec![0f32; m * f];
            let mut line = format!("m={m:3}:");
            for set in cpu::available_sets().into_iter().filter(|&s| s >= KernelSet::Avx512) {
                if only.as_deref().is_some_and(|o| o != set.name()) {
                    continue;
                }
                let _g = cpu::force(set);
                let mut t: Vec<f64> = (0..6)
                    .map(|_| {
                        let t = Instant::now();
                        for (w, &(n, k)) in ws.iter().zip(&layer) {
                            matmul_bf16(&a[..m * k], m, w, n, k, &mut out[..m * n]);
                        }
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                t.sort_by(f64::total_cmp);
                let s = t[3];
                line += &format!("  {set} {:6.2} ms {:5.1} GB/s", s * 1e3, bytes as f64 / s / 1e9);
            }
            eprintln!("{line}");
        }
    }

    /// The matrix-vector path of CPUs without AVX-512 BF16 ([`gemv_f32`]) on one 7B layer:
    /// `cargo test --release -p videollava --lib bf16_gemm::tests::bench_gemv -- --ignored
    /// --nocapture` (`VIDEOLLAVA_KERNELS=avx2` or `portable` picks the set).
    #[test]
    #[ignore]
    fn bench_gemv_f32_decode() {
        let (f, layer, ws, bytes) = seven_b_layer();
        let x: Vec<f32> = values(f, 5).into_iter().map(widen).collect();
        let mut t: Vec<f64> = (0..8)
            .map(|_| {
                let t = std::time::Instant::now();
                for (w, &(n, k)) in ws.iter().zip(&layer) {
                    std::hint::black_box(gemv_f32(&x[..k], 1, w, n, k));
                }
                t.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        eprintln!("gemv_f32 ({}): {:.2} ms, {:.1} GB/s", cpu::kernel_set(), t[4] * 1e3, bytes as f64 / t[4] / 1e9);
    }

    #[test]
    fn public_entry_point_and_zero_k() {
        let (m, n, k) = (9, 17, 33);
        let a = values(m * k, 1);
        let w = values(n * k, 2);
        let mut out = vec![f32::NAN; m * n];
        matmul_bf16(&a, m, &w, n, k, &mut out);
        assert!(check(&a, m, &w, n, k, &out).is_ok());
        let mut out = vec![f32::NAN; 6];
        matmul_bf16(&[], 2, &[], 3, 0, &mut out);
        assert!(out.iter().all(|&x| x == 0.0));
    }

    /// Exactly representable case: small integers, the result is exact on every path.
    #[test]
    fn exact_small_integers() {
        let (m, n, k) = (13, 35, 77);
        let bf = |x: f32| (x.to_bits() >> 16) as u16;
        let a: Vec<u16> = (0..m * k).map(|t| bf(((t * 7) % 5) as f32 - 2.0)).collect();
        let w: Vec<u16> = (0..n * k).map(|t| bf(((t * 3) % 7) as f32 - 3.0)).collect();
        cpu::for_each_set(|set| {
            let mut out = vec![f32::NAN; m * n];
            matmul_bf16(&a, m, &w, n, k, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|p| widen(a[i * k + p]) * widen(w[j * k + p])).sum();
                    assert_eq!(out[i * n + j], want, "kernels={set} ({i}, {j})");
                }
            }
        });
    }

    /// The checker itself rejects a wrong result.
    #[test]
    fn checker_detects_errors() {
        let (m, n, k) = (3, 4, 5);
        let a = values(m * k, 3);
        let w = values(n * k, 4);
        let mut out = vec![0f32; m * n];
        matmul_bf16(&a, m, &w, n, k, &mut out);
        assert!(check(&a, m, &w, n, k, &out).is_ok());
        out[5] += 1e-3 * (1.0 + out[5].abs());
        assert!(check(&a, m, &w, n, k, &out).is_err());
    }

    #[test]
    #[should_panic(expected = "expected n*k")]
    fn wrong_weight_length_panics() {
        let mut out = vec![0f32; 4];
        matmul_bf16(&[0; 6], 2, &[0; 5], 2, 3, &mut out);
    }
}
