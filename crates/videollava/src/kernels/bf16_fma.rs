//! BF16 matrix product on f32 FMA units, for x86-64 CPUs without AVX-512 BF16 (AVX-512F:
//! Skylake-SP to Ice Lake; AVX2 + FMA: Haswell on, Zen 1-3): `out = A · Wᵀ` with both operands
//! widened to f32 (exact: `bits << 16`) while they are packed, then f32 fused multiply-adds.
//!
//! Conventions (every function of this file):
//! - `a`: activations, BF16 bit patterns (`u16`), row-major `[m, k]`;
//! - `w`: weight, BF16 bit patterns (`u16`), row-major `[n, k]` (PyTorch `nn.Linear` layout);
//! - output `[m, n]` row-major, overwritten: f32 `Σ_p a[i, p] · w[j, p]` ([`matmul`]), or BF16
//!   `act(Σ + bias)` rounded as [`super::fused::linear_output_bf16`] rounds the f32 sums
//!   ([`matmul_bf16_out`], in the product's own pass).
//!
//! Why it exists: without `vdpbf16ps` the BF16 layers used to widen both operands whole and run
//! the `gemm` crate's f32 GEMM (whose x86 kernels are AVX2 only as built here), then round its
//! f32 output in a second pass: 75-90 GFLOP/s on 2 Ice Lake cores, where f32 FMAs on 512 bits
//! peak near 300 (PyTorch's f32 GEMM there: ~250; its BF16 GEMM, emulated: ~60).
//!
//! Blocking (as BLIS): `A` is packed once per call into tiles of `MR` rows, `[k][MR]` f32; each
//! task packs its stripe of about 256 columns of `W` into micro-panels `[k][NR]` f32 and runs an
//! `MR`×`NR` micro-kernel over blocks of [`KC`] values of `k`: the micro-panel of `A` stays in L1
//! while those of `W` stream from L2. AVX-512F: 14×32 (28 zmm accumulators); AVX2 + FMA: 6×16
//! (12 ymm). The BF16 output is summed into a thread-local f32 block of [`MC_ROWS`] rows of the
//! stripe (in L2) and rounded when the block is complete.
//!
//! Numerics: every output element is one chain of f32 FMAs over `p = 0, 1, …, k-1` (a block of
//! `k` starts from the partial sum the previous one stored), so both kernel sets give the same
//! bits whatever the blocking; the f32 rounding differs from a plain `Σ` only in where FMAs fuse.
//! Parallelism: rayon's global pool. Memory: the packed `A` (twice the bytes of `A`) is kept
//! between calls, and each rayon thread keeps its packed stripe of `W` (`256 · k · 4` bytes)
//! and f32 block (`168 · 256 · 4` bytes).

use super::cpu::{self, KernelSet};
use super::fused::{finish_row, Activation};
use super::out_ptr::OutPtr;
use super::pack_cache::{aligned_mut, PackCache};
use super::task_grid::TaskGrid;
use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;

/// Values of `k` per cache block (the AVX-512 micro-panel of `A`: `KC · 14 · 4` = 14 KiB, in L1).
const KC: usize = 256;
/// Columns of `W` per task stripe (its micro-panels of one `k` block: `KC · 256 · 4` = 256 KiB, in L2).
const STRIPE: usize = 256;
/// Rows of `A` per cache block (its packed block of one `k` block: `168 · KC · 4` = 168 KiB, in L2).
const MC_ROWS: usize = 168;

/// Packed `A`, kept between calls (at most 64 Mi f32: 256 MiB).
static A_PACK: PackCache<f32> = PackCache::new(64 << 20);

thread_local! {
    /// A task's packed stripe of `W`, then its f32 output block; reused by the tasks run on this
    /// thread.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`matmul`] and [`matmul_bf16_out`] run for the kernel set `set` (x86-64, AVX2 + FMA
/// or more).
pub(crate) fn applies(set: KernelSet) -> bool {
    cfg!(target_arch = "x86_64") && set >= KernelSet::Avx2
}

/// Micro-tile rows and columns for a kernel set: AVX-512F 14×32, AVX2 + FMA 6×16.
fn tile(set: KernelSet) -> (usize, usize) {
    if set >= KernelSet::Avx512 {
        (MR512, 32)
    } else {
        (MR256, 16)
    }
}
const MR512: usize = 14;
const MR256: usize = 6;

/// Where [`blocked`] writes `[m, n]`.
#[derive(Clone, Copy)]
enum Out<'a> {
    F32(OutPtr),
    Bf16 { out: OutPtr<bf16>, bias: &'a [f32], act: Activation },
}

fn check(set: KernelSet, a: &[u16], m: usize, w: &[u16], n: usize, k: usize, out_len: usize) {
    assert!(applies(set) && set <= cpu::detected().kernel_set(), "bf16_fma: kernel set {set} not on this CPU");
    assert!(m.checked_mul(k) == Some(a.len()), "bf16_fma: `a` has {} elements, expected m*k = {m}*{k}", a.len());
    assert!(n.checked_mul(k) == Some(w.len()), "bf16_fma: `w` has {} elements, expected n*k = {n}*{k}", w.len());
    assert!(m.checked_mul(n) == Some(out_len), "bf16_fma: output of {out_len} elements, expected m*n = {m}*{n}");
}

/// `out[i, j] = Σ_p a[i, p] · w[j, p]` (f32), with the kernels of `set` (which [`applies`] and this
/// CPU has: [`cpu::kernel_set`] of the calling thread, say). Panics when a slice does not match
/// its shape or the set is not on this CPU.
pub(crate) fn matmul(set: KernelSet, a: &[u16], m: usize, w: &[u16], n: usize, k: usize, out: &mut [f32]) {
    check(set, a, m, w, n, k, out.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    blocked(set, a, m, w, n, k, Out::F32(OutPtr::new(out)));
}

/// `out = act(A · Wᵀ + bias)` rounded to BF16 as [`super::fused::linear_output_bf16`] rounds the
/// f32 product of [`matmul`] (bit for bit), in the product's own pass. `bias`: empty or `[n]`.
/// Shapes and `set` as [`matmul`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_bf16_out(
    set: KernelSet,
    a: &[u16],
    m: usize,
    w: &[u16],
    n: usize,
    k: usize,
    bias: &[f32],
    act: Activation,
    out: &mut [bf16],
) {
    check(set, a, m, w, n, k, out.len());
    assert!(bias.is_empty() || bias.len() == n, "bf16_fma: bias of {} values for n = {n}", bias.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // The sums are zeros: what `finish_row` makes of them.
        let zeros = vec![0f32; n];
        for row in out.chunks_exact_mut(n) {
            finish_row(set, &zeros, bias, act, row);
        }
        return;
    }
    blocked(set, a, m, w, n, k, Out::Bf16 { out: OutPtr::new(out), bias, act });
}

/// The product for `k >= 1`, `m, n >= 1`, `set` checked; `out` holds `m * n` elements.
fn blocked(set: KernelSet, a: &[u16], m: usize, w: &[u16], n: usize, k: usize, out: Out) {
    let (mr, nr) = tile(set);
    let m_tiles = m.div_ceil(mr);
    let tile_len = k * mr;
    A_PACK.with(m_tiles * tile_len, 0.0, |apack| {
        apack.par_chunks_mut(tile_len).enumerate().for_each(|(t, dst)| {
            let r0 = t * mr;
            let rows = mr.min(m - r0);
            pack(set, &a[r0 * k..(r0 + rows) * k], k, mr, dst);
        });
        let grid = TaskGrid::new(n, nr, STRIPE / nr, m_tiles);
        let apack = &apack[..];
        grid.run(&SCRATCH, |j0, j1, t0, t1, buf| {
            // SAFETY: `set` is on this CPU (checked by the entry points); the task writes the rows
            // of tiles t0..t1, columns j0..j1 of `out` only, which no other task writes.
            unsafe { task(set, apack, m, t0, t1, w, n, k, j0, j1 - j0, out, buf) }
        });
    })
}

/// One task of [`blocked`]: row tiles `t0..t1` of the packed `apack`, columns `j0..j0 + cols`.
///
/// # Safety
/// `set` is on this CPU; `apack` holds `ceil(m / MR)` packed tiles of `k`; `out` has `m * n`
/// elements of which this task alone writes its rows and columns.
#[allow(clippy::too_many_arguments)]
unsafe fn task(
    set: KernelSet,
    apack: &[f32],
    m: usize,
    t0: usize,
    t1: usize,
    w: &[u16],
    n: usize,
    k: usize,
    j0: usize,
    cols: usize,
    out: Out,
    buf: &mut Vec<f32>,
) {
    let (mr, nr) = tile(set);
    let panels = cols.div_ceil(nr);
    let panel_len = k * nr;
    let width = panels * nr;
    let mc_tiles = (MC_ROWS / mr).max(1);
    let block_len = if matches!(out, Out::Bf16 { .. }) { mc_tiles * mr * width } else { 0 };
    // `panel_len` is a multiple of 16 f32, so the block starts on a cache line as well.
    let (wp, cblk) = aligned_mut(buf, panels * panel_len + block_len, 0.0).split_at_mut(panels * panel_len);
    for p in 0..panels {
        let c0 = j0 + p * nr;
        let valid = nr.min(j0 + cols - c0);
        pack(set, &w[c0 * k..(c0 + valid) * k], k, nr, &mut wp[p * panel_len..(p + 1) * panel_len]);
    }
    let mut tc = t0;
    while tc < t1 {
        let tc_end = t1.min(tc + mc_tiles);
        let mut pc = 0;
        while pc < k {
            let kc = KC.min(k - pc);
            // A micro-panel of `A` stays in L1 while the micro-panels of `W` stream from L2.
            for t in tc..tc_end {
                let rows = mr.min(m - t * mr);
                let at = &apack[t * k * mr + pc * mr..][..kc * mr];
                for p in 0..panels {
                    let b = &wp[p * panel_len + pc * nr..][..kc * nr];
                    let c0 = p * nr;
                    match out {
                        // SAFETY: the tile's `rows` rows and `nr.min(cols - c0)` columns lie inside
                        // `out` (rows < m, columns < n, this task's); `set` is on this CPU.
                        Out::F32(o) => unsafe {
                            let ct = o.get().add(t * mr * n + j0 + c0);
                            micro(set, rows, at, b, kc, ct, n, nr.min(cols - c0), pc > 0);
                        },
                        // SAFETY: the tile's rows and `nr` columns lie inside `cblk` (rows of this
                        // block, columns < width); `set` is on this CPU.
                        Out::Bf16 { .. } => unsafe {
                            let ct = cblk.as_mut_ptr().add((t - tc) * mr * width + c0);
                            micro(set, rows, at, b, kc, ct, width, nr, pc > 0);
                        },
                    }
                }
            }
            pc += kc;
        }
        if let Out::Bf16 { out, bias, act } = out {
            let b = if bias.is_empty() { bias } else { &bias[j0..j0 + cols] };
            for row in tc * mr..m.min(tc_end * mr) {
                // SAFETY: row `< m`, columns `j0..j0 + cols <= n` of `out`, which only this task
                // writes (caller's contract).
                let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(row * n + j0), cols) };
                finish_row(set, &cblk[(row - tc * mr) * width..][..cols], b, act, o);
            }
        }
        tc = tc_end;
    }
}

/// `dst[p * s + r] = widen(src[r * k + p])` for the rows `r` of `src` (`[rows, k]`, `rows <= s`),
/// zeros for `rows <= r < s`; `dst` holds at least `k * s` values.
fn pack(set: KernelSet, src: &[u16], k: usize, s: usize, dst: &mut [f32]) {
    #[inline(always)]
    fn body(src: &[u16], k: usize, s: usize, dst: &mut [f32]) {
        let rows = src.len() / k;
        let dst = &mut dst[..k * s];
        // 16 values of `k` at a time: each row's 32 bytes read once, the 16 × `s` values written
        // while in L1.
        for p0 in (0..k).step_by(16) {
            let pn = 16.min(k - p0);
            for (r, row) in src.chunks_exact(k).enumerate() {
                for (q, &b) in row[p0..p0 + pn].iter().enumerate() {
                    dst[(p0 + q) * s + r] = f32::from_bits((b as u32) << 16);
                }
            }
            if rows < s {
                for q in 0..pn {
                    dst[(p0 + q) * s + rows..(p0 + q + 1) * s].fill(0.0);
                }
            }
        }
    }
    /// `body` by 16×16 transposes: 16 values of `k` from each of 16 rows widened on 512-bit
    /// registers, then stored as 16 steps of those rows (a scalar `body` ran at ~0.6 ns a value,
    /// 12% of a 7B prefill's time on Ice Lake).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,avx2")]
    fn avx512(src: &[u16], k: usize, s: usize, dst: &mut [f32]) {
        use core::arch::x86_64::*;
        let rows = src.len() / k;
        assert!(rows <= s && dst.len() >= k * s);
        let d = dst.as_mut_ptr();
        let mut g0 = 0;
        while g0 < s {
            let lanes = 16.min(s - g0);
            let lane_mask: u16 = if lanes == 16 { 0xffff } else { ((1u32 << lanes) - 1) as u16 };
            let mut p0 = 0;
            while p0 < k {
                let count = 16.min(k - p0);
                let load_mask: u16 = if count == 16 { 0xffff } else { ((1u32 << count) - 1) as u16 };
                let mut v = [_mm512_setzero_si512(); 16];
                for (r, x) in v.iter_mut().enumerate().take(rows.saturating_sub(g0).min(16)) {
                    // SAFETY: row `g0 + r < rows`, values `p0..p0 + count` of it (the masked-off
                    // lanes are not read).
                    let h = unsafe {
                        _mm256_maskz_loadu_epi16(load_mask, src.as_ptr().add((g0 + r) * k + p0) as *const i16)
                    };
                    *x = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
                }
                let t = super::transpose::transpose16(v);
                for (q, x) in t.iter().enumerate().take(count) {
                    // SAFETY: `(p0 + q) * s + g0 + lanes <= k * s <= dst.len()` (asserted).
                    unsafe { _mm512_mask_storeu_epi32(d.add((p0 + q) * s + g0) as *mut i32, lane_mask, *x) };
                }
                p0 += 16;
            }
            g0 += 16;
        }
    }
    /// `body` by 8×8 transposes on 256-bit registers (8 values of `k` from each of 8 rows); the
    /// last `k % 8` values as `body` does them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn avx2(src: &[u16], k: usize, s: usize, dst: &mut [f32]) {
        use core::arch::x86_64::*;
        let rows = src.len() / k;
        assert!(rows <= s && dst.len() >= k * s);
        let d = dst.as_mut_ptr();
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let full = k - k % 8;
        let mut g0 = 0;
        while g0 < s {
            let lanes = 8.min(s - g0);
            let lane_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), lane);
            for p0 in (0..full).step_by(8) {
                let mut v = [_mm256_setzero_ps(); 8];
                for (r, x) in v.iter_mut().enumerate().take(rows.saturating_sub(g0).min(8)) {
                    // SAFETY: row `g0 + r < rows`, values `p0..p0 + 8 <= k` of it.
                    let h = unsafe { _mm_loadu_si128(src.as_ptr().add((g0 + r) * k + p0) as *const __m128i) };
                    *x = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
                }
                let t = [
                    _mm256_unpacklo_ps(v[0], v[1]),
                    _mm256_unpackhi_ps(v[0], v[1]),
                    _mm256_unpacklo_ps(v[2], v[3]),
                    _mm256_unpackhi_ps(v[2], v[3]),
                    _mm256_unpacklo_ps(v[4], v[5]),
                    _mm256_unpackhi_ps(v[4], v[5]),
                    _mm256_unpacklo_ps(v[6], v[7]),
                    _mm256_unpackhi_ps(v[6], v[7]),
                ];
                let u = [
                    _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                    _mm256_shuffle_ps::<0xee>(t[0], t[2]),
                    _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                    _mm256_shuffle_ps::<0xee>(t[1], t[3]),
                    _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                    _mm256_shuffle_ps::<0xee>(t[4], t[6]),
                    _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                    _mm256_shuffle_ps::<0xee>(t[5], t[7]),
                ];
                // Column q of the 8 rows: the low 128-bit halves give q = 0..4, the high 4..8.
                for q in 0..4 {
                    let lo = _mm256_permute2f128_ps::<0x20>(u[q], u[q + 4]);
                    let hi = _mm256_permute2f128_ps::<0x31>(u[q], u[q + 4]);
                    // SAFETY: `(p0 + q + 4) * s + g0 + lanes <= k * s <= dst.len()` (asserted);
                    // the lanes past `lanes` are masked off.
                    unsafe {
                        _mm256_maskstore_ps(d.add((p0 + q) * s + g0), lane_mask, lo);
                        _mm256_maskstore_ps(d.add((p0 + q + 4) * s + g0), lane_mask, hi);
                    }
                }
            }
            g0 += 8;
        }
        for p in full..k {
            let drow = &mut dst[p * s..(p + 1) * s];
            for (r, row) in src.chunks_exact(k).enumerate() {
                drow[r] = f32::from_bits((row[p] as u32) << 16);
            }
            drow[rows..].fill(0.0);
        }
    }
    match set {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the entry points checked that `set` is on this CPU.
        s2 if s2 >= KernelSet::Avx512 => unsafe { avx512(src, k, s, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 + FMA.
        s2 if s2 >= KernelSet::Avx2 => unsafe { avx2(src, k, s, dst) },
        _ => body(src, k, s, dst),
    }
}

/// `c[r, 0..valid] (+)= Σ_q a[q · MR + r] · b[q · NR + 0..valid]` for `r < rows`, `q < kc` (`+=`
/// where `load`), with the micro-kernel of `set`.
///
/// # Safety
/// `set` (≥ AVX2) is on this CPU; `a` holds `kc` steps of `MR` values and `b` of `NR` (the set's
/// tile); the `rows` rows (`ldc` apart) of `valid <= NR` columns from `c` are valid to read and write.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn micro(
    set: KernelSet,
    rows: usize,
    a: &[f32],
    b: &[f32],
    kc: usize,
    c: *mut f32,
    ldc: usize,
    valid: usize,
    load: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        debug_assert!(a.len() >= kc * tile(set).0 && b.len() >= kc * tile(set).1);
        let (a, b) = (a.as_ptr(), b.as_ptr());
        macro_rules! call {
            ($f:ident; $($r:literal)*) => {
                match rows {
                    // SAFETY: the caller's contract.
                    $($r => unsafe { x86::$f::<$r>(a, b, kc, c, ldc, valid, load) },)*
                    _ => unreachable!("bf16_fma: {rows} rows in a micro-tile"),
                }
            };
        }
        if set >= KernelSet::Avx512 {
            call!(micro512; 1 2 3 4 5 6 7 8 9 10 11 12 13 14);
        } else {
            call!(micro256; 1 2 3 4 5 6);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (set, rows, a, b, kc, c, ldc, valid, load);
        unreachable!("bf16_fma: x86-64 only (see `applies`)");
    }
}

#[cfg(target_arch = "x86_64")]
// Register-blocked kernels index their accumulator arrays by loop counters on purpose.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use super::{MR256, MR512};
    use core::arch::x86_64::*;

    /// AVX-512F `R`×32 micro-kernel ([`super::micro`]: `a` steps of [`MR512`], `b` of 32).
    ///
    /// # Safety
    /// As [`super::micro`], with AVX-512F on this CPU.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn micro512<const R: usize>(
        a: *const f32,
        b: *const f32,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        valid: usize,
        load: bool,
    ) {
        // SAFETY: this `unsafe fn`'s contract. (`wrapping_add`: the columns past `valid` may lie
        // past the end of `out`; a masked-off lane of a masked load or store never touches memory.)
        unsafe {
            let m0: u16 = if valid >= 16 { 0xffff } else { ((1u32 << valid) - 1) as u16 };
            let m1: u16 = if valid <= 16 { 0 } else { ((1u32 << (valid - 16)) - 1) as u16 };
            let mut c0 = [_mm512_setzero_ps(); R];
            let mut c1 = [_mm512_setzero_ps(); R];
            if load {
                for r in 0..R {
                    c0[r] = _mm512_maskz_loadu_ps(m0, c.wrapping_add(r * ldc));
                    c1[r] = _mm512_maskz_loadu_ps(m1, c.wrapping_add(r * ldc + 16));
                }
            }
            let (mut aq, mut bq) = (a, b);
            for _ in 0..kc {
                let b0 = _mm512_loadu_ps(bq);
                let b1 = _mm512_loadu_ps(bq.add(16));
                for r in 0..R {
                    let av = _mm512_set1_ps(*aq.add(r));
                    c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
                    c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
                }
                aq = aq.add(MR512);
                bq = bq.add(32);
            }
            for r in 0..R {
                _mm512_mask_storeu_ps(c.wrapping_add(r * ldc), m0, c0[r]);
                _mm512_mask_storeu_ps(c.wrapping_add(r * ldc + 16), m1, c1[r]);
            }
        }
    }

    /// AVX2 + FMA `R`×16 micro-kernel ([`super::micro`]: `a` steps of [`MR256`], `b` of 16).
    ///
    /// # Safety
    /// As [`super::micro`], with AVX2 and FMA on this CPU.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn micro256<const R: usize>(
        a: *const f32,
        b: *const f32,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        valid: usize,
        load: bool,
    ) {
        // SAFETY: this `unsafe fn`'s contract. (`wrapping_add` and masked loads and stores: as in
        // `micro512`.)
        unsafe {
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), lane);
            let m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32 - 8), lane);
            let mut c0 = [_mm256_setzero_ps(); R];
            let mut c1 = [_mm256_setzero_ps(); R];
            if load {
                for r in 0..R {
                    c0[r] = _mm256_maskload_ps(c.wrapping_add(r * ldc), m0);
                    c1[r] = _mm256_maskload_ps(c.wrapping_add(r * ldc + 8), m1);
                }
            }
            let (mut aq, mut bq) = (a, b);
            for _ in 0..kc {
                let b0 = _mm256_loadu_ps(bq);
                let b1 = _mm256_loadu_ps(bq.add(8));
                for r in 0..R {
                    let av = _mm256_broadcast_ss(&*aq.add(r));
                    c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
                    c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
                }
                aq = aq.add(MR256);
                bq = bq.add(16);
            }
            for r in 0..R {
                _mm256_maskstore_ps(c.wrapping_add(r * ldc), m0, c0[r]);
                _mm256_maskstore_ps(c.wrapping_add(r * ldc + 8), m1, c1[r]);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::fused::linear_output_bf16;
    use crate::kernels::testing::{bf16_values as values, check_gemm};

    fn widen64(b: u16) -> f64 {
        f32::from_bits((b as u32) << 16) as f64
    }

    fn sets() -> Vec<KernelSet> {
        cpu::available_sets().into_iter().filter(|&s| applies(s)).collect()
    }

    /// Every set this CPU has (AVX2 and AVX-512 tiles, whatever the kernel-set switch says) on
    /// shapes that cross tiles, panels, stripes and `k` blocks: within f32 rounding of the f64
    /// product, every element written, and the same bits on every set (one FMA chain per element).
    #[test]
    fn every_set_matches_reference_and_each_other() {
        let sets = sets();
        if sets.is_empty() {
            eprintln!("bf16_fma: no AVX2 on this CPU; nothing to test");
            return;
        }
        for &(m, n, k) in &[(1, 1, 1), (9, 17, 33), (15, 33, 300), (200, 300, 1101), (29, 520, 514), (130, 16, 257)] {
            let a = values(m * k, (m * 1000 + k) as u64);
            let w = values(n * k, (n * 7919 + k) as u64 + 1);
            let mut first: Option<(KernelSet, Vec<f32>)> = None;
            for &set in &sets {
                let mut out = vec![f32::NAN; m * n];
                matmul(set, &a, m, &w, n, k, &mut out);
                if let Err((i, j, got, want)) = check_gemm(&out, m, n, 1e-6, |i, j| {
                    (0..k)
                        .map(|p| widen64(a[i * k + p]) * widen64(w[j * k + p]))
                        .fold((0f64, 0f64), |(s, abs), v| (s + v, abs + v.abs()))
                }) {
                    panic!("m={m} n={n} k={k} set={set}: out[{i}, {j}] = {got}, want {want}");
                }
                match &first {
                    None => first = Some((set, out)),
                    Some((s0, o0)) => {
                        let differ = o0.iter().zip(&out).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                        assert_eq!(differ, 0, "m={m} n={n} k={k}: {set} differs from {s0} in {differ} values");
                    }
                }
            }
        }
    }

    /// The BF16 output (bias, each activation) is bit for bit the f32 product rounded by
    /// `linear_output_bf16`, on every set, with partial tiles and more rows than one f32 block.
    #[test]
    fn bf16_output_equals_rounding_the_f32_product() {
        for set in sets() {
            let _g = cpu::force(set);
            for &(m, n, k) in &[(7, 45, 70), (400, 290, 96), (169, 33, 513)] {
                let a = values(m * k, 5 + m as u64);
                let w = values(n * k, 6 + n as u64);
                let bias: Vec<f32> = values(n, 7).iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
                let mut y = vec![0f32; m * n];
                matmul(set, &a, m, &w, n, k, &mut y);
                for act in [Activation::Identity, Activation::QuickGelu, Activation::Scale(0.125)] {
                    for b in [&bias[..], &[]] {
                        let want = linear_output_bf16(&y, n, (!b.is_empty()).then_some(b), act);
                        let mut got = vec![bf16::from_bits(0x7fc1); m * n];
                        matmul_bf16_out(set, &a, m, &w, n, k, b, act, &mut got);
                        let differ = got.iter().zip(&want).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                        assert_eq!(
                            differ,
                            0,
                            "m={m} n={n} k={k} {set} {act:?} bias={}: {differ} values differ",
                            !b.is_empty()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn zero_k_and_bad_shapes() {
        for set in sets() {
            let mut out = vec![f32::NAN; 6];
            matmul(set, &[], 2, &[], 3, 0, &mut out);
            assert!(out.iter().all(|&v| v == 0.0));
            let mut o16 = vec![bf16::from_bits(0x7fc1); 6];
            matmul_bf16_out(set, &[], 2, &[], 3, 0, &[1.0, -2.0, 0.5], Activation::Identity, &mut o16);
            assert_eq!(o16.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), [1.0, -2.0, 0.5, 1.0, -2.0, 0.5]);
            let r = std::panic::catch_unwind(|| matmul(set, &[0; 5], 2, &[0; 6], 3, 3, &mut [0.0; 6]));
            assert!(r.is_err(), "a wrong `a` length must panic");
        }
    }
}
