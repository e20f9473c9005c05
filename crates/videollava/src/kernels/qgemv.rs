//! Quantized matrix-vector products that read GGML blocks in place (decode-time linear layers).
//!
//! Conventions (all shapes row-major):
//! - `x`: f32 activations `[rows, k]`, `1 <= rows <= 8`.
//! - `w`: the weight as raw GGML blocks, `n` rows of `k` values; row `j` is the byte range
//!   `[j * row_bytes, (j + 1) * row_bytes)` with `row_bytes = k / block_values * block_bytes`
//!   (exactly the bytes of a candle `QTensor` of shape `[n, k]`, `QTensor::data()`).
//! - `out`: f32 `[rows, n]`, `out[r, j] = sum_p x[r, p] * W[j, p]` (the `x @ W^T` of a linear
//!   layer).
//!
//! Why this exists: token-by-token decoding of a 7B Llama with 4-bit weights is bound by
//! streaming every weight byte once per token. candle 0.11's quantized matmul on x86 repacks
//! Q4K/Q8_0 into expanded tiles, which makes an `m = 1` product read more bytes than the compact
//! blocks hold and reach only about 14 GB/s of compact weight. These kernels read the compact
//! blocks directly (AVX-512 VNNI where the CPU has it, else AVX2 `maddubs`/`madd` or their
//! AVX-VNNI forms, else a portable scalar loop; picked by [`super::cpu::features`]), split
//! the output rows over rayon tasks and reuse each weight block for all `rows` activation rows,
//! so the weight streams through once per call at close to memory bandwidth.
//!
//! Numerics follow candle's CPU quantized matmul: each activation row is quantized once per call
//! (to Q8K, 256-value blocks with an f32 scale and 16-value sums, for Q4K/Q6K weights; to Q8_0,
//! 32-value blocks with an f16 scale, for Q8_0 weights), the per-block dot products are exact
//! integers, and only the order of the final f32 sums differs from candle.

use half::f16;
use rayon::prelude::*;

const QK_K: usize = 256;
const QK8_0: usize = 32;

/// Weight bytes per rayon task; tasks of a few tens of KiB keep scheduling overhead small while
/// leaving enough tasks to balance the threads.
const TASK_BYTES: usize = 96 * 1024;

/// The GGML block formats handled. Block layouts exactly as ggml / candle-core 0.11 `k_quants.rs`:
/// Q8_0: 32 values = { d: f16, qs: [i8; 32] } (34 bytes); Q4K: 256 values = { d: f16, dmin: f16,
/// scales: [u8; 12], qs: [u8; 128] } (144 bytes); Q6K: 256 values = { ql: [u8;128], qh: [u8;64],
/// scales: [i8;16], d: f16 } (210 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q8_0,
    Q4K,
    Q6K,
}

impl QFormat {
    /// Values per block.
    pub const fn block_values(self) -> usize {
        match self {
            QFormat::Q8_0 => QK8_0,
            QFormat::Q4K | QFormat::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QFormat::Q8_0 => 34,
            QFormat::Q4K => 144,
            QFormat::Q6K => 210,
        }
    }

    /// Bytes of one weight row of `k` values (`k` a multiple of `block_values`).
    pub const fn row_bytes(self, k: usize) -> usize {
        k / self.block_values() * self.block_bytes()
    }
}

/// out[r, j] = sum_p x[r, p] * W[j, p] for r < rows (rows 1..=8), W = n rows of k values stored as
/// consecutive blocks (row j = bytes [j*row_bytes, (j+1)*row_bytes)), x row-major [rows, k] f32,
/// out row-major [rows, n] f32. k must be a multiple of the block size (32 or 256).
///
/// Panics when `rows` is outside 1..=8, `k` is not a multiple of the block size, or a slice
/// length does not match the shapes.
pub fn qgemv(format: QFormat, x: &[f32], rows: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    qgemv_with(Kernel::detect(), format, x, rows, w, n, k, out)
}

/// Which inner loops run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Portable Rust, any CPU.
    Scalar,
    /// AVX2 + FMA + F16C (Haswell and later, Zen 1 and later).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// [`Kernel::Avx2`]'s loops with the AVX-VNNI dot products (`vpdpbusd`, `vpdpwssd` on ymm:
    /// Alder Lake and later).
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    /// AVX-512 F/BW/VL/VNNI (Ice Lake and later, Zen 4 and later).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// The best kernel the calling thread may use now ([`super::cpu::features`]).
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let f = super::cpu::features();
            if f.avx512_vnni {
                return Kernel::Avx512;
            }
            if f.avx2 && f.avx_vnni {
                return Kernel::AvxVnni;
            }
            if f.avx2 {
                return Kernel::Avx2;
            }
        }
        Kernel::Scalar
    }
}

#[allow(clippy::too_many_arguments)]
fn qgemv_with(kernel: Kernel, format: QFormat, x: &[f32], rows: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    assert!((1..=8).contains(&rows), "qgemv: rows must be in 1..=8, got {rows}");
    let bv = format.block_values();
    assert!(k.is_multiple_of(bv), "qgemv: k = {k} is not a multiple of the {format:?} block size {bv}");
    assert_eq!(x.len(), rows * k, "qgemv: x has {} values, expected rows * k = {rows} * {k}", x.len());
    let row_bytes = format.row_bytes(k);
    assert_eq!(
        w.len(),
        n * row_bytes,
        "qgemv: weight has {} bytes, expected n * row_bytes = {n} * {row_bytes} ({format:?}, k = {k})",
        w.len()
    );
    assert_eq!(out.len(), rows * n, "qgemv: out has {} values, expected rows * n = {rows} * {n}", out.len());
    if n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let nb = k / bv;
    match format {
        QFormat::Q4K | QFormat::Q6K => {
            #[cfg(target_arch = "x86_64")]
            let permute = kernel == Kernel::Avx512 && format == QFormat::Q4K;
            #[cfg(not(target_arch = "x86_64"))]
            let permute = false;
            let act = ActQ8K::quantize(kernel, x, rows, nb, permute);
            for_row_chunks(n, rows, row_bytes, w, out, |wc, nw, oc| match (kernel, format) {
                (Kernel::Scalar, QFormat::Q4K) => {
                    scalar_rows(wc, nw, rows, row_bytes, oc, |wr, r| dot_q4k_scalar(wr, &act, r))
                }
                (Kernel::Scalar, _) => scalar_rows(wc, nw, rows, row_bytes, oc, |wr, r| dot_q6k_scalar(wr, &act, r)),
                // SAFETY: Kernel::Avx2 is only chosen when the CPU has AVX2, FMA and F16C,
                // Kernel::AvxVnni when it also has AVX-VNNI.
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx2 | Kernel::AvxVnni, QFormat::Q4K) => unsafe {
                    avx2::q4k(kernel == Kernel::AvxVnni, wc, nw, rows, &act, oc)
                },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx2 | Kernel::AvxVnni, _) => unsafe {
                    avx2::q6k(kernel == Kernel::AvxVnni, wc, nw, rows, &act, oc)
                },
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx512, QFormat::Q4K) => {
                    // SAFETY: Kernel::Avx512 is only chosen after runtime detection of every
                    // feature the kernel enables; slice lengths are checked inside.
                    unsafe { avx512::q4k(wc, nw, rows, &act, oc) }
                }
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx512, _) => unsafe { avx512::q6k(wc, nw, rows, &act, oc) },
            });
        }
        QFormat::Q8_0 => {
            let act = ActQ80::quantize(kernel, x, rows, nb);
            for_row_chunks(n, rows, row_bytes, w, out, |wc, nw, oc| match kernel {
                Kernel::Scalar => scalar_rows(wc, nw, rows, row_bytes, oc, |wr, r| dot_q8_0_scalar(wr, &act, r)),
                // SAFETY: Kernel::Avx2 is only chosen when the CPU has AVX2, FMA and F16C,
                // Kernel::AvxVnni when it also has AVX-VNNI.
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 | Kernel::AvxVnni => unsafe {
                    avx2::q8_0(kernel == Kernel::AvxVnni, wc, nw, rows, &act, oc)
                },
                // SAFETY: Kernel::Avx512 is only chosen after runtime detection of every feature
                // the kernel enables; slice lengths are checked inside.
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => unsafe { avx512::q8_0(wc, nw, rows, &act, oc) },
            });
        }
    }
}

/// Splits the `n` weight rows into rayon tasks. `f(w_chunk, nw, out_chunk)` computes the
/// `[nw, rows]` (weight-row major) block of results for the `nw` weight rows of `w_chunk`.
fn for_row_chunks<F>(n: usize, rows: usize, row_bytes: usize, w: &[u8], out: &mut [f32], f: F)
where
    F: Fn(&[u8], usize, &mut [f32]) + Sync,
{
    let task = (TASK_BYTES / row_bytes.max(1)).clamp(4, 1024);
    let run = |out_t: &mut [f32]| {
        out_t.par_chunks_mut(task * rows).enumerate().for_each(|(i, oc)| {
            let nw = oc.len() / rows;
            let j0 = i * task;
            f(&w[j0 * row_bytes..(j0 + nw) * row_bytes], nw, oc)
        })
    };
    if rows == 1 {
        run(out);
    } else {
        // Tasks write [n, rows] tiles; transpose once into [rows, n].
        let mut out_t = vec![0f32; n * rows];
        run(&mut out_t);
        for (j, vals) in out_t.chunks_exact(rows).enumerate() {
            for (r, &v) in vals.iter().enumerate() {
                out[r * n + j] = v;
            }
        }
    }
}

fn scalar_rows(
    w: &[u8],
    nw: usize,
    rows: usize,
    row_bytes: usize,
    out_t: &mut [f32],
    dot: impl Fn(&[u8], usize) -> f32,
) {
    for j in 0..nw {
        let wr = &w[j * row_bytes..(j + 1) * row_bytes];
        for r in 0..rows {
            out_t[j * rows + r] = dot(wr, r);
        }
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// `v.round()` (half away from zero) without the libm call that baseline x86_64 makes for it.
/// Floats of magnitude >= 2^23 are already integers, NaN stays NaN.
#[inline(always)]
fn round_half_away(v: f32) -> f32 {
    if v.abs() < 8_388_608.0 {
        let t = v as i32;
        let frac = v - t as f32; // exact: t is v truncated
        (t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32) as f32
    } else {
        v
    }
}

/// Activation rows quantized to Q8K exactly as candle's `BlockQ8K::from_float`.
struct ActQ8K {
    /// Blocks per row.
    nb: usize,
    /// Scale per block, `[rows, nb]`.
    d: Vec<f32>,
    /// Quantized values, `[rows, nb, 256]`; natural order, or for the AVX-512 Q4K kernel each
    /// block reordered as value ranges 0..32, 64..96, 32..64, 96..128, 128..160, 192..224,
    /// 160..192, 224..256 to match the nibble order of the Q4K `qs` bytes.
    qs: Vec<i8>,
    /// Sums of each 16 consecutive (natural order) values, `[rows, nb, 16]`.
    bsums: Vec<i16>,
    /// For the AVX-512 Q4K kernel (empty otherwise), per group of [`Q4K_GROUP`] blocks in the
    /// kernel's lane order (lane `e` = block [`q4k_lane_block`]`(e)` of the group; zeros past
    /// the row's end): the block scales `d`, `[rows, groups, 16]`, ...
    group_d: Vec<f32>,
    /// ... and the 32-value sums as i16 pairs `(sum(2k), sum(2k + 1))`, `[rows, groups, 4, 16]`.
    group_sums: Vec<u32>,
}

/// Blocks whose headers the AVX-512 Q4K kernel decodes together.
const Q4K_GROUP: usize = 16;

/// The block of a group held by lane `e` of the AVX-512 Q4K kernel's header vectors (headers
/// are loaded four per vector and transposed: lane `4L + z` holds block `4z + L`).
#[inline(always)]
const fn q4k_lane_block(e: usize) -> usize {
    4 * (e % 4) + e / 4
}

impl ActQ8K {
    fn quantize(kernel: Kernel, x: &[f32], rows: usize, nb: usize, permute_q4k: bool) -> Self {
        let mut d = vec![0f32; rows * nb];
        let mut qs = vec![0i8; rows * nb * QK_K];
        let mut bsums = vec![0i16; rows * nb * 16];
        let mut q = [0i8; QK_K];
        for (bi, xs) in x.chunks_exact(QK_K).enumerate() {
            let bs = &mut bsums[bi * 16..(bi + 1) * 16];
            d[bi] = match kernel {
                Kernel::Scalar => q8k_block_scalar(xs, &mut q, bs),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 | Kernel::AvxVnni => q8k_block_scalar(xs, &mut q, bs),
                // SAFETY: features detected before Kernel::Avx512 is chosen.
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => unsafe { avx512::q8k_block(xs, &mut q, bs) },
            };
            let dst = &mut qs[bi * QK_K..(bi + 1) * QK_K];
            if permute_q4k {
                const SRC: [usize; 8] = [0, 64, 32, 96, 128, 192, 160, 224];
                for (c, &s) in SRC.iter().enumerate() {
                    dst[c * 32..(c + 1) * 32].copy_from_slice(&q[s..s + 32]);
                }
            } else {
                dst.copy_from_slice(&q);
            }
        }
        let (mut group_d, mut group_sums) = (Vec::new(), Vec::new());
        if permute_q4k {
            let ng = nb.div_ceil(Q4K_GROUP);
            group_d = vec![0f32; rows * ng * 16];
            group_sums = vec![0u32; rows * ng * 64];
            for r in 0..rows {
                for g in 0..ng {
                    let at = r * ng + g;
                    for e in 0..16 {
                        let b = g * Q4K_GROUP + q4k_lane_block(e);
                        if b >= nb {
                            continue;
                        }
                        let o = r * nb + b;
                        group_d[at * 16 + e] = d[o];
                        let bs = &bsums[o * 16..(o + 1) * 16];
                        for k in 0..4 {
                            // Each 32-value sum is at most 32 * 128 in magnitude: an i16.
                            let lo = bs[4 * k] + bs[4 * k + 1];
                            let hi = bs[4 * k + 2] + bs[4 * k + 3];
                            group_sums[(at * 4 + k) * 16 + e] = lo as u16 as u32 | (hi as u16 as u32) << 16;
                        }
                    }
                }
            }
        }
        Self { nb, d, qs, bsums, group_d, group_sums }
    }
}

/// One 256-value block to Q8K as candle's `BlockQ8K::from_float`; returns the scale `d`.
fn q8k_block_scalar(xs: &[f32], q: &mut [i8; QK_K], bs: &mut [i16]) -> f32 {
    // candle keeps the first value of largest magnitude (NaNs never compare larger).
    let amax = xs.iter().fold(0f32, |m, &v| if m < v.abs() { v.abs() } else { m });
    if amax == 0.0 {
        q.fill(0);
        bs.fill(0);
        return 0.0;
    }
    let max = xs.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0);
    let iscale = -127f32 / max;
    for (qv, &v) in q.iter_mut().zip(xs) {
        *qv = round_half_away(iscale * v).clamp(-128.0, 127.0) as i8;
    }
    for (s, g) in bs.iter_mut().zip(q.chunks_exact(16)) {
        *s = g.iter().map(|&v| v as i32).sum::<i32>() as i16;
    }
    1.0 / iscale
}

/// One 32-value block to Q8_0 as candle's `BlockQ8_0::from_float`; returns the f32 scale
/// (before its rounding to f16).
pub(crate) fn q8_0_block_scalar(xs: &[f32], q: &mut [i8]) -> f32 {
    let amax = xs.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(xs) {
        *q = round_half_away(v * id) as i8;
    }
    d
}

/// Activation rows quantized to Q8_0 exactly as candle's `BlockQ8_0::from_float` (x86).
pub(crate) struct ActQ80 {
    /// Blocks per row, and the row stride in blocks (`nb` rounded up to even, zero padded).
    pub(crate) nb: usize,
    pub(crate) nb_pad: usize,
    /// f16-rounded scale per block, repeated 8 times, `[rows, nb_pad, 8]`.
    pub(crate) dvec: Vec<f32>,
    /// Quantized values, `[rows, nb_pad, 32]`.
    pub(crate) qs: Vec<i8>,
}

impl ActQ80 {
    pub(crate) fn quantize(kernel: Kernel, x: &[f32], rows: usize, nb: usize) -> Self {
        let nb_pad = nb + (nb & 1);
        let mut dvec = vec![0f32; rows * nb_pad * 8];
        let mut qs = vec![0i8; rows * nb_pad * QK8_0];
        for r in 0..rows {
            for b in 0..nb {
                let xs = &x[(r * nb + b) * QK8_0..(r * nb + b + 1) * QK8_0];
                let o = r * nb_pad + b;
                let q = &mut qs[o * QK8_0..(o + 1) * QK8_0];
                let d = match kernel {
                    Kernel::Scalar => q8_0_block_scalar(xs, q),
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 | Kernel::AvxVnni => q8_0_block_scalar(xs, q),
                    // SAFETY: features detected before Kernel::Avx512 is chosen.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512 => unsafe { avx512::q8_0_block(xs, q) },
                };
                dvec[o * 8..(o + 1) * 8].fill(f16::from_f32(d).to_f32());
            }
        }
        Self { nb, nb_pad, dvec, qs }
    }
}

/// Q4K scale/min decoding (candle `vec_dot_q4k_q8k`): returns the 8 six-bit scales and the 8
/// six-bit mins, each packed little-endian in a u64.
#[inline(always)]
pub(crate) fn q4k_scales_mins(s: &[u8]) -> (u64, u64) {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let u0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let u1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let u2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let m1 = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let m0 = u1 & KMASK1;
    let s1 = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let s0 = u0 & KMASK1;
    (s0 as u64 | (s1 as u64) << 32, m0 as u64 | (m1 as u64) << 32)
}

fn dot_q4k_scalar(wr: &[u8], act: &ActQ8K, r: usize) -> f32 {
    let nb = act.nb;
    let mut sumf = 0f32;
    for (b, blk) in wr.chunks_exact(144).enumerate() {
        let ab = r * nb + b;
        let q8 = &act.qs[ab * QK_K..(ab + 1) * QK_K];
        let bsums = &act.bsums[ab * 16..(ab + 1) * 16];
        let (sc, mn) = q4k_scales_mins(&blk[4..16]);
        let sc = sc.to_le_bytes();
        let mn = mn.to_le_bytes();
        let qs = &blk[16..144];
        let mut summ = 0i32;
        for j in 0..16 {
            summ += bsums[j] as i32 * mn[j / 2] as i32;
        }
        let mut sumi = 0i32;
        for s in 0..8 {
            let (c, shift) = (s / 2, 4 * (s % 2));
            let mut dot = 0i32;
            for l in 0..32 {
                dot += ((qs[32 * c + l] >> shift) & 0xF) as i32 * q8[32 * s + l] as i32;
            }
            sumi += sc[s] as i32 * dot;
        }
        let yd = act.d[ab];
        let d = yd * f16_at(blk, 0);
        let dmin = yd * f16_at(blk, 2);
        sumf += d * sumi as f32 - dmin * summ as f32;
    }
    sumf
}

fn dot_q6k_scalar(wr: &[u8], act: &ActQ8K, r: usize) -> f32 {
    let nb = act.nb;
    let mut sumf = 0f32;
    let mut q = [0i8; QK_K];
    for (b, blk) in wr.chunks_exact(210).enumerate() {
        let ab = r * nb + b;
        let q8 = &act.qs[ab * QK_K..(ab + 1) * QK_K];
        let (ql, qh) = (&blk[0..128], &blk[128..192]);
        for h in 0..2 {
            let (ql, qh, q) = (&ql[64 * h..], &qh[32 * h..], &mut q[128 * h..]);
            for l in 0..32 {
                q[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                q[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                q[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                q[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            }
        }
        let mut sumi = 0i32;
        for g in 0..16 {
            let sc = blk[192 + g] as i8 as i32;
            let mut dot = 0i32;
            for l in 16 * g..16 * (g + 1) {
                dot += q[l] as i32 * q8[l] as i32;
            }
            sumi += sc * dot;
        }
        sumf += f16_at(blk, 208) * act.d[ab] * sumi as f32;
    }
    sumf
}

fn dot_q8_0_scalar(wr: &[u8], act: &ActQ80, r: usize) -> f32 {
    let mut sumf = 0f32;
    for (b, blk) in wr.chunks_exact(34).enumerate() {
        let o = r * act.nb_pad + b;
        let q8 = &act.qs[o * QK8_0..(o + 1) * QK8_0];
        let mut sumi = 0i32;
        for l in 0..QK8_0 {
            sumi += blk[2 + l] as i8 as i32 * q8[l] as i32;
        }
        sumf += sumi as f32 * f16_at(blk, 0) * act.dvec[o * 8];
    }
    sumf
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    //! AVX-512 VNNI inner loops. Each processes `nw` consecutive weight rows against all
    //! activation rows (`R` of them, a compile-time constant so the accumulators stay in
    //! registers) and writes `out_t[j * R + r]`.

    use super::{ActQ80, ActQ8K, QK8_0, QK_K};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support avx512f/bw/vl/vnni, avx2, fma and f16c.
    pub(super) unsafe fn q4k(w: &[u8], nw: usize, rows: usize, act: &ActQ8K, out_t: &mut [f32]) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            assert_eq!(w.len(), nw * act.nb * 144, "q4k: weight chunk size");
            assert_eq!(out_t.len(), nw * rows, "q4k: output chunk size");
            assert_eq!(act.qs.len(), rows * act.nb * QK_K, "q4k: activation size");
            by_rows!(rows, q4k_r(w, nw, act, out_t))
        }
    }

    /// # Safety
    /// As [`q4k`].
    pub(super) unsafe fn q6k(w: &[u8], nw: usize, rows: usize, act: &ActQ8K, out_t: &mut [f32]) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            assert_eq!(w.len(), nw * act.nb * 210, "q6k: weight chunk size");
            assert_eq!(out_t.len(), nw * rows, "q6k: output chunk size");
            assert_eq!(act.qs.len(), rows * act.nb * QK_K, "q6k: activation size");
            by_rows!(rows, q6k_r(w, nw, act, out_t))
        }
    }

    /// # Safety
    /// As [`q4k`].
    pub(super) unsafe fn q8_0(w: &[u8], nw: usize, rows: usize, act: &ActQ80, out_t: &mut [f32]) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            assert_eq!(w.len(), nw * act.nb * 34, "q8_0: weight chunk size");
            assert_eq!(out_t.len(), nw * rows, "q8_0: output chunk size");
            assert_eq!(act.qs.len(), rows * act.nb_pad * QK8_0, "q8_0: activation size");
            assert_eq!(act.dvec.len(), rows * act.nb_pad * 8, "q8_0: activation scale size");
            by_rows!(rows, q8_0_r(w, nw, act, out_t))
        }
    }

    /// [`super::q8k_block_scalar`] vectorised; bit-identical for finite inputs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q8k_block(xs: &[f32], q: &mut [i8; QK_K], bs: &mut [i16]) -> f32 {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            assert!(xs.len() == QK_K && bs.len() == 16, "q8k_block: block size");
            let p = xs.as_ptr();
            let mut m = _mm512_setzero_ps();
            for i in 0..16 {
                // max_ps returns the second operand when the first is NaN: NaNs are skipped.
                m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(p.add(16 * i))), m);
            }
            let amax = _mm512_reduce_max_ps(m);
            if amax == 0.0 {
                q.fill(0);
                bs.fill(0);
                return 0.0;
            }
            // The first value of largest magnitude, as candle picks it.
            let vamax = _mm512_set1_ps(amax);
            let mut max = 0f32;
            for i in 0..16 {
                let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(_mm512_loadu_ps(p.add(16 * i))), vamax);
                if hit != 0 {
                    max = xs[16 * i + hit.trailing_zeros() as usize];
                    break;
                }
            }
            let iscale = -127f32 / max;
            let vs = _mm512_set1_ps(iscale);
            for (i, s) in bs.iter_mut().enumerate() {
                let iv = round_to_i32(_mm512_mul_ps(vs, _mm512_loadu_ps(p.add(16 * i))));
                let iv = _mm512_max_epi32(_mm512_min_epi32(iv, _mm512_set1_epi32(127)), _mm512_set1_epi32(-128));
                _mm_storeu_si128(q.as_mut_ptr().add(16 * i) as *mut _, _mm512_cvtepi32_epi8(iv));
                *s = _mm512_reduce_add_epi32(iv) as i16;
            }
            1.0 / iscale
        }
    }

    /// [`super::q8_0_block_scalar`] vectorised; bit-identical for finite inputs.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(crate) unsafe fn q8_0_block(xs: &[f32], q: &mut [i8]) -> f32 {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            assert!(xs.len() == QK8_0 && q.len() == QK8_0, "q8_0_block: block size");
            let v0 = _mm512_loadu_ps(xs.as_ptr());
            let v1 = _mm512_loadu_ps(xs.as_ptr().add(16));
            let m = _mm512_max_ps(_mm512_abs_ps(v1), _mm512_max_ps(_mm512_abs_ps(v0), _mm512_setzero_ps()));
            let d = _mm512_reduce_max_ps(m) / 127.0;
            let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            for (i, v) in [v0, v1].into_iter().enumerate() {
                // Saturating narrowing, as Rust's `f32 as i8`.
                let b = _mm512_cvtsepi32_epi8(round_to_i32(_mm512_mul_ps(v, id)));
                _mm_storeu_si128(q.as_mut_ptr().add(16 * i) as *mut _, b);
            }
            d
        }
    }

    /// Round half away from zero (`f32::round`) and convert to i32.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn round_to_i32(v: __m512) -> __m512i {
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let f = _mm512_sub_ps(v, t); // exact
        let one = _mm512_set1_ps(1.0);
        let t = _mm512_mask_add_ps(t, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(f, _mm512_set1_ps(0.5)), t, one);
        let t = _mm512_mask_sub_ps(t, _mm512_cmp_ps_mask::<_CMP_LE_OQ>(f, _mm512_set1_ps(-0.5)), t, one);
        _mm512_cvttps_epi32(t)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load(p: *const u8) -> __m512i {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe { _mm512_loadu_si512(p as *const _) }
    }

    /// The f16 at `p` (unaligned, little-endian) as f32, via F16C.
    #[target_feature(enable = "f16c")]
    #[inline]
    unsafe fn f16_at(p: *const u8) -> f32 {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let bits = u16::from_le_bytes([*p, *p.add(1)]);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }
    }

    /// Q4K: the two 64-byte halves of `qs` give four 64-lane u8 operands (low/high nibbles),
    /// each covering two 32-value sub-blocks, matched by the reordered activation. `maddubs`
    /// (u8 x i8 -> i16 pairs, at most 2*15*128, no saturation) then `dpwssd` with the sub-block
    /// scale as i16 accumulates exact i32 sums.
    ///
    /// Block headers (`d`, `dmin`, the 12 bytes of packed scales and mins) are decoded 16 blocks
    /// at a time: four 16-byte headers per vector, transposed so that each of four vectors holds
    /// one header word of all 16 blocks (lane order [`super::q4k_lane_block`]); scales, mins and
    /// both f16 factors are then unpacked with vector operations for the whole group, and the
    /// min term `dmin * Σ min_s * sum_s` of all 16 blocks is one `dpwssd` chain against the
    /// activation's 32-value sums in the same lane order (`group_sums`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn q4k_r<const R: usize>(w: &[u8], nw: usize, act: &ActQ8K, out_t: &mut [f32]) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            const G: usize = super::Q4K_GROUP;
            let nb = act.nb;
            let ng = nb.div_ceil(G);
            assert_eq!(act.group_d.len(), R * ng * 16, "q4k: group scales");
            assert_eq!(act.group_sums.len(), R * ng * 64, "q4k: group sums");
            let row_bytes = nb * 144;
            let m4 = _mm512_set1_epi8(0x0F);
            // vpshufb controls: i16 lanes 0..15 take scale byte `a`, lanes 16..31 scale byte `b`,
            // for the operand pairs (a, b) = (0,2), (1,3), (4,6), (5,7).
            let mut ctl = [_mm512_setzero_si512(); 4];
            for (c, (a, b)) in ctl.iter_mut().zip([(0u8, 2u8), (1, 3), (4, 6), (5, 7)]) {
                let mut bytes = [0x80u8; 64];
                for (i, v) in bytes.iter_mut().enumerate().step_by(2) {
                    *v = if i < 32 { a } else { b };
                }
                *c = load(bytes.as_ptr());
            }
            // vpshufb controls spreading the bytes (0, 1) / (2, 3) of each dword into i16 pairs.
            let mut spread = [_mm512_setzero_si512(); 2];
            for (h, c) in spread.iter_mut().enumerate() {
                let mut bytes = [0x80u8; 64];
                for i in 0..16 {
                    bytes[4 * i] = ((4 * i) % 16 + 2 * h) as u8;
                    bytes[4 * i + 2] = ((4 * i) % 16 + 2 * h + 1) as u8;
                }
                *c = load(bytes.as_ptr());
            }
            let (k1, k2, k3) =
                (_mm512_set1_epi32(0x3f3f3f3f), _mm512_set1_epi32(0x0f0f0f0f), _mm512_set1_epi32(0x03030303));
            let wp = w.as_ptr();
            let aq = act.qs.as_ptr() as *const u8;
            // Per group: the scale bytes of each block as a u64 (by block, see below), and per row
            // `d * yd` by lane.
            let mut sc = [0u64; 16];
            let mut dd = [[0f32; 16]; R];
            for j in 0..nw {
                let row = wp.add(j * row_bytes);
                let mut acc = [_mm512_setzero_ps(); R];
                for g in 0..ng {
                    let m = (nb - g * G).min(G);
                    let base = row.add(g * G * 144);
                    // Headers: vector z holds blocks 4z..4z+3 (zeros past the row's end).
                    let hdr = |b: usize| -> __m128i {
                        if b < m {
                            _mm_loadu_si128(base.add(b * 144) as *const _)
                        } else {
                            _mm_setzero_si128()
                        }
                    };
                    let mut hv = [_mm512_setzero_si512(); 4];
                    for (z, v) in hv.iter_mut().enumerate() {
                        let x = _mm512_castsi128_si512(hdr(4 * z));
                        let x = _mm512_inserti32x4::<1>(x, hdr(4 * z + 1));
                        let x = _mm512_inserti32x4::<2>(x, hdr(4 * z + 2));
                        *v = _mm512_inserti32x4::<3>(x, hdr(4 * z + 3));
                    }
                    let t0 = _mm512_unpacklo_epi32(hv[0], hv[1]);
                    let t1 = _mm512_unpackhi_epi32(hv[0], hv[1]);
                    let t2 = _mm512_unpacklo_epi32(hv[2], hv[3]);
                    let t3 = _mm512_unpackhi_epi32(hv[2], hv[3]);
                    // Word w of the headers of all 16 blocks (lane e = block 4 * (e % 4) + e / 4).
                    let w0 = _mm512_unpacklo_epi64(t0, t2);
                    let u0 = _mm512_unpackhi_epi64(t0, t2);
                    let u1 = _mm512_unpacklo_epi64(t1, t3);
                    let u2 = _mm512_unpackhi_epi64(t1, t3);
                    let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w0));
                    let dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(w0)));
                    // `q4k_scales_mins`, lane-wise.
                    let s0 = _mm512_and_si512(u0, k1);
                    let s1 = _mm512_or_si512(
                        _mm512_and_si512(u2, k2),
                        _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(u0), k3)),
                    );
                    let m0 = _mm512_and_si512(u1, k1);
                    let m1 = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi32::<4>(u2), k2),
                        _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(u1), k3)),
                    );
                    // Scale bytes as u64 per lane: lanes (4L, 4L+1) in `lo`, (4L+2, 4L+3) in `hi`.
                    _mm512_storeu_si512(sc.as_mut_ptr() as *mut _, _mm512_unpacklo_epi32(s0, s1));
                    _mm512_storeu_si512(sc.as_mut_ptr().add(8) as *mut _, _mm512_unpackhi_epi32(s0, s1));
                    let mins = [
                        _mm512_shuffle_epi8(m0, spread[0]),
                        _mm512_shuffle_epi8(m0, spread[1]),
                        _mm512_shuffle_epi8(m1, spread[0]),
                        _mm512_shuffle_epi8(m1, spread[1]),
                    ];
                    for r in 0..R {
                        let at = r * ng + g;
                        let yd = _mm512_loadu_ps(act.group_d.as_ptr().add(at * 16));
                        _mm512_storeu_ps(dd[r].as_mut_ptr(), _mm512_mul_ps(dw, yd));
                        let gs = act.group_sums.as_ptr().add(at * 64) as *const u8;
                        let mut sm = _mm512_setzero_si512();
                        for (k, mk) in mins.iter().enumerate() {
                            sm = _mm512_dpwssd_epi32(sm, *mk, load(gs.add(64 * k)));
                        }
                        acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(sm), _mm512_mul_ps(dmin, yd), acc[r]);
                    }
                    for b in 0..m {
                        let blk = base.add(b * 144);
                        // The same block of the next group: its header is read at the group's start.
                        let ahead = blk.add(G * 144) as *const i8;
                        _mm_prefetch::<_MM_HINT_T0>(ahead);
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(64));
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(128));
                        // Block b = 4z + L sits in lane e = 4L + z; its u64 of scale bytes at
                        // 2L + z (z < 2) or 8 + 2L + z - 2.
                        let (z, l) = (b / 4, b % 4);
                        let e = 4 * l + z;
                        let si_at = if z < 2 { 2 * l + z } else { 6 + 2 * l + z };
                        let sb = _mm512_set1_epi64(sc[si_at] as i64);
                        let q0 = load(blk.add(16));
                        let q1 = load(blk.add(80));
                        let v = [
                            _mm512_and_si512(q0, m4),
                            _mm512_and_si512(_mm512_srli_epi16::<4>(q0), m4),
                            _mm512_and_si512(q1, m4),
                            _mm512_and_si512(_mm512_srli_epi16::<4>(q1), m4),
                        ];
                        let s = [
                            _mm512_shuffle_epi8(sb, ctl[0]),
                            _mm512_shuffle_epi8(sb, ctl[1]),
                            _mm512_shuffle_epi8(sb, ctl[2]),
                            _mm512_shuffle_epi8(sb, ctl[3]),
                        ];
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let a = aq.add((r * nb + g * G + b) * QK_K);
                            let mut si = _mm512_setzero_si512();
                            for z in 0..4 {
                                let p = _mm512_maddubs_epi16(v[z], load(a.add(64 * z)));
                                si = _mm512_dpwssd_epi32(si, p, s[z]);
                            }
                            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), _mm512_set1_ps(dd[r][e]), *acc);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    out_t[j * R + r] = _mm512_reduce_add_ps(*acc);
                }
            }
        }
    }

    /// Q6K: values are rebuilt as unsigned `q + 32` (0..63) in natural order, four 64-lane
    /// operands per block; `maddubs` + `dpwssd` with the signed 16-value scales give exact i32
    /// sums, and the `-32` offset is removed with `dpwssd(-32 * scales, bsums)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn q6k_r<const R: usize>(w: &[u8], nw: usize, act: &ActQ8K, out_t: &mut [f32]) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let nb = act.nb;
            let row_bytes = nb * 210;
            let m4 = _mm512_set1_epi8(0x0F);
            let m30 = _mm512_set1_epi8(0x30);
            let neg32 = _mm256_set1_epi16(-32);
            // vpermw indices: i16 lane L of operand z takes scale 4z + L/8.
            let mut idx = [_mm512_setzero_si512(); 4];
            for (z, c) in idx.iter_mut().enumerate() {
                let mut lanes = [0u16; 32];
                for (l, v) in lanes.iter_mut().enumerate() {
                    *v = (4 * z + l / 8) as u16;
                }
                *c = load(lanes.as_ptr() as *const u8);
            }
            let wp = w.as_ptr();
            let aq = act.qs.as_ptr() as *const u8;
            let ab = act.bsums.as_ptr() as *const u8;
            let ad = act.d.as_ptr();
            for j in 0..nw {
                let mut acc = [_mm512_setzero_ps(); R];
                for b in 0..nb {
                    let blk = wp.add(j * row_bytes + b * 210);
                    if b + 2 < nb {
                        _mm_prefetch::<_MM_HINT_T0>(blk.add(2 * 210) as *const i8);
                        _mm_prefetch::<_MM_HINT_T0>(blk.add(2 * 210 + 192) as *const i8);
                    }
                    let vdw = _mm512_set1_ps(f16_at(blk.add(208)));
                    let ql0 = load(blk);
                    let ql1 = load(blk.add(64));
                    let qh = load(blk.add(128));
                    let qh_s2 = _mm512_srli_epi16::<2>(qh);
                    // [qh[0..32], qh[0..32] >> 2] and [qh[32..64], qh[32..64] >> 2].
                    let h0 = _mm512_shuffle_i64x2::<0x44>(qh, qh_s2);
                    let h1 = _mm512_shuffle_i64x2::<0xEE>(qh, qh_s2);
                    // (ql & 0x0F) | high bits, via ternary logic 0xEA = (A & B) | C.
                    let v = [
                        _mm512_ternarylogic_epi32::<0xEA>(ql0, m4, _mm512_and_si512(_mm512_slli_epi16::<4>(h0), m30)),
                        _mm512_ternarylogic_epi32::<0xEA>(_mm512_srli_epi16::<4>(ql0), m4, _mm512_and_si512(h0, m30)),
                        _mm512_ternarylogic_epi32::<0xEA>(ql1, m4, _mm512_and_si512(_mm512_slli_epi16::<4>(h1), m30)),
                        _mm512_ternarylogic_epi32::<0xEA>(_mm512_srli_epi16::<4>(ql1), m4, _mm512_and_si512(h1, m30)),
                    ];
                    let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192) as *const _));
                    let scz = _mm512_zextsi256_si512(sc16);
                    let s = [
                        _mm512_permutexvar_epi16(idx[0], scz),
                        _mm512_permutexvar_epi16(idx[1], scz),
                        _mm512_permutexvar_epi16(idx[2], scz),
                        _mm512_permutexvar_epi16(idx[3], scz),
                    ];
                    let scn = _mm512_zextsi256_si512(_mm256_mullo_epi16(sc16, neg32));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let o = r * nb + b;
                        let a = aq.add(o * QK_K);
                        let bs = _mm512_zextsi256_si512(_mm256_loadu_si256(ab.add(o * 32) as *const _));
                        let mut si = _mm512_madd_epi16(scn, bs);
                        for z in 0..4 {
                            let p = _mm512_maddubs_epi16(v[z], load(a.add(64 * z)));
                            si = _mm512_dpwssd_epi32(si, p, s[z]);
                        }
                        let yd = _mm512_set1_ps(*ad.add(o));
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), _mm512_mul_ps(yd, vdw), *acc);
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    out_t[j * R + r] = _mm512_reduce_add_ps(*acc);
                }
            }
        }
    }

    /// Q8_0: two 32-value blocks per 64-lane operand. Signed x signed products use
    /// `dpbusd(|w|, sign(w) * a)`; `|w|` is exact as u8 even for -128, and activations lie in
    /// -127..=127 so negating them cannot overflow.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn q8_0_r<const R: usize>(w: &[u8], nw: usize, act: &ActQ80, out_t: &mut [f32]) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let (nb, nb_pad) = (act.nb, act.nb_pad);
            let row_bytes = nb * 34;
            let dup = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
            let zero = _mm512_setzero_si512();
            let wp = w.as_ptr();
            let aq = act.qs.as_ptr() as *const u8;
            let ad = act.dvec.as_ptr();
            for j in 0..nw {
                let row = wp.add(j * row_bytes);
                let mut acc = [_mm512_setzero_ps(); R];
                let mut b = 0;
                while b < nb {
                    let blk = row.add(b * 34);
                    crate::kernels::prefetch::prefetch_ahead(blk, 34, 2 * 34);
                    let (wv, dbits) = if b + 1 < nb {
                        let lo = _mm256_loadu_si256(blk.add(2) as *const _);
                        let hi = _mm256_loadu_si256(blk.add(36) as *const _);
                        let d0 = u16::from_le_bytes([*blk, *blk.add(1)]) as u32;
                        let d1 = u16::from_le_bytes([*blk.add(34), *blk.add(35)]) as u32;
                        (_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi), d0 | d1 << 16)
                    } else {
                        // Odd tail block: the upper half stays zero, as does its scale.
                        let lo = _mm256_loadu_si256(blk.add(2) as *const _);
                        let d0 = u16::from_le_bytes([*blk, *blk.add(1)]) as u32;
                        (_mm512_zextsi256_si512(lo), d0)
                    };
                    let dw = _mm512_permutexvar_ps(
                        dup,
                        _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(dbits as i32))),
                    );
                    let absw = _mm512_abs_epi8(wv);
                    let neg = _mm512_movepi8_mask(wv);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let o = r * nb_pad + b;
                        let a = load(aq.add(o * QK8_0));
                        let sa = _mm512_mask_sub_epi8(a, neg, zero, a);
                        let p = _mm512_dpbusd_epi32(zero, absw, sa);
                        let sv = _mm512_mul_ps(dw, _mm512_loadu_ps(ad.add(o * 8)));
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sv, *acc);
                    }
                    b += 2;
                }
                for (r, acc) in acc.iter().enumerate() {
                    out_t[j * R + r] = _mm512_reduce_add_ps(*acc);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! AVX2 inner loops (Haswell and later, Zen 1 and later; no VNNI needed): `maddubs` (u8 × i8
    //! -> i16 pairs) then `madd` (i16 × i16 -> i32 pairs) give each block's exact integer dot
    //! products, as the scalar loops; only the order of the f32 sums differs. Each processes
    //! `nw` consecutive weight rows against all activation rows (`R`, a compile-time constant)
    //! and writes `out_t[j * R + r]`. Activations are quantized by the scalar quantizers.
    //!
    //! Where the CPU has AVX-VNNI (Intel since Alder Lake) the same loops run with its fused
    //! forms: `vpdpbusd` for `madd(maddubs(u, s), 1)` (+ add) and `vpdpwssd` for `madd` + add
    //! ([`dpbusd`], [`dpwssd`]; a const generic `VNNI`, compiled twice by [`avx2_forms`]). The
    //! loops never let `maddubs` saturate (each says why), so both forms give the same exact
    //! integers and, with the same f32 arithmetic after them, the same bits.
    //!
    //! Memory is read through bounds-checked slices.

    use super::{q4k_scales_mins, ActQ80, ActQ8K, QK8_0, QK_K};
    use std::arch::x86_64::*;

    /// Defines `unsafe fn $name(vnni: bool, rows: usize, args…)`, which runs the row kernel
    /// `$kernel::<VNNI, R>(args…)` (an `#[inline(always)]` body) with `R = rows`: the kernel is
    /// compiled once for AVX2 + FMA + F16C and once more with AVX-VNNI, and `vnni` picks one.
    /// The generated function's contract: the CPU has AVX2, FMA and F16C, and AVX-VNNI when
    /// `vnni`; `rows` is in 1..=8; the arguments meet the kernel's contract.
    macro_rules! avx2_forms {
        ($(#[$doc:meta])* $vis:vis fn $name:ident => $kernel:ident($($arg:ident: $ty:ty),* $(,)?)) => {
            $(#[$doc])*
            ///
            /// # Safety
            /// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `vnni`; `rows` is in 1..=8; the
            /// arguments meet the row kernel's contract.
            #[allow(clippy::too_many_arguments)]
            $vis unsafe fn $name(vnni: bool, rows: usize, $($arg: $ty),*) {
                #[target_feature(enable = "avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn plain(rows: usize, $($arg: $ty),*) {
                    // SAFETY: the features are enabled here; the rest is the caller's contract.
                    unsafe { by_rows!(rows, $kernel::<false>($($arg),*)) }
                }
                #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn with_vnni(rows: usize, $($arg: $ty),*) {
                    // SAFETY: as for `plain`.
                    unsafe { by_rows!(rows, $kernel::<true>($($arg),*)) }
                }
                // SAFETY: the caller's contract (the features `vnni` names, and the arguments).
                unsafe {
                    if vnni {
                        with_vnni(rows, $($arg),*)
                    } else {
                        plain(rows, $($arg),*)
                    }
                }
            }
        };
    }

    /// `acc + Σ u · s` over the 4 bytes of each 32-bit lane (`u` unsigned, `s` signed): AVX-VNNI
    /// `vpdpbusd`, else `maddubs` (adjacent pairs to i16, saturating) then `madd` with ones.
    /// Both are exact where no pair sum `u₀s₀ + u₁s₁` leaves the i16 range (the callers' bound).
    ///
    /// # Safety
    /// The CPU has AVX2, and AVX-VNNI when `VNNI`.
    #[inline(always)]
    pub(crate) unsafe fn dpbusd<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: the caller's contract.
        unsafe {
            if VNNI {
                _mm256_dpbusd_avx_epi32(acc, u, s)
            } else {
                _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
            }
        }
    }

    /// `acc + a₀b₀ + a₁b₁` per 32-bit lane (i16 pairs): AVX-VNNI `vpdpwssd`, else `madd` then add
    /// (the same exact integers: a pair's sum only leaves i32 for `a = b = -32768`).
    ///
    /// # Safety
    /// The CPU has AVX2, and AVX-VNNI when `VNNI`.
    #[inline(always)]
    unsafe fn dpwssd<const VNNI: bool>(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the caller's contract.
        unsafe {
            if VNNI {
                _mm256_dpwssd_avx_epi32(acc, a, b)
            } else {
                _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
            }
        }
    }

    /// Q4K rows; lengths are checked here.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `vnni`.
    pub(super) unsafe fn q4k(vnni: bool, w: &[u8], nw: usize, rows: usize, act: &ActQ8K, out_t: &mut [f32]) {
        assert!((1..=8).contains(&rows), "q4k: rows");
        assert_eq!(w.len(), nw * act.nb * 144, "q4k: weight chunk size");
        assert_eq!(out_t.len(), nw * rows, "q4k: output chunk size");
        assert_eq!(act.qs.len(), rows * act.nb * QK_K, "q4k: activation size");
        // SAFETY: the caller's contract; the lengths the kernel relies on are checked above.
        unsafe { q4k_rows(vnni, rows, w, nw, act, out_t) }
    }

    /// Q6K rows; lengths are checked here.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `vnni`.
    pub(super) unsafe fn q6k(vnni: bool, w: &[u8], nw: usize, rows: usize, act: &ActQ8K, out_t: &mut [f32]) {
        assert!((1..=8).contains(&rows), "q6k: rows");
        assert_eq!(w.len(), nw * act.nb * 210, "q6k: weight chunk size");
        assert_eq!(out_t.len(), nw * rows, "q6k: output chunk size");
        assert_eq!(act.qs.len(), rows * act.nb * QK_K, "q6k: activation size");
        // SAFETY: as for `q4k`.
        unsafe { q6k_rows(vnni, rows, w, nw, act, out_t) }
    }

    /// Q8_0 rows; lengths are checked here.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `vnni`.
    pub(super) unsafe fn q8_0(vnni: bool, w: &[u8], nw: usize, rows: usize, act: &ActQ80, out_t: &mut [f32]) {
        assert_eq!(w.len(), nw * act.nb * 34, "q8_0: weight chunk size");
        // SAFETY: the caller's contract; `q8_0_slices` checks the rest.
        unsafe { q8_0_slices(vnni, w, nw, rows, &act.qs, &act.dvec, act.nb_pad, out_t) }
    }

    /// [`q8_0`] over borrowed activation rows: `qs` `[rows, nb_pad, 32]`, `dvec` `[rows, nb_pad,
    /// 8]` (an [`ActQ80`]'s fields, or a range of its rows); `nb = w.len() / (nw * 34)`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `vnni`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn q8_0_slices(
        vnni: bool,
        w: &[u8],
        nw: usize,
        rows: usize,
        qs: &[i8],
        dvec: &[f32],
        nb_pad: usize,
        out_t: &mut [f32],
    ) {
        assert!((1..=8).contains(&rows), "q8_0: rows");
        assert!(nw > 0 && w.len().is_multiple_of(nw * 34), "q8_0: weight chunk size");
        let nb = w.len() / (nw * 34);
        assert!(nb <= nb_pad, "q8_0: activation stride");
        assert_eq!(out_t.len(), nw * rows, "q8_0: output chunk size");
        assert_eq!(qs.len(), rows * nb_pad * QK8_0, "q8_0: activation size");
        assert_eq!(dvec.len(), rows * nb_pad * 8, "q8_0: activation scale size");
        // SAFETY: the caller's contract; the lengths the kernel relies on are checked above.
        unsafe { q8_0_rows(vnni, rows, w, nw, nb, nb_pad, qs, dvec, out_t) }
    }

    avx2_forms!(
        /// [`q4k_r`] for `rows` activation rows.
        fn q4k_rows => q4k_r(w: &[u8], nw: usize, act: &ActQ8K, out_t: &mut [f32])
    );
    avx2_forms!(
        /// [`q6k_r`] for `rows` activation rows.
        fn q6k_rows => q6k_r(w: &[u8], nw: usize, act: &ActQ8K, out_t: &mut [f32])
    );
    avx2_forms!(
        /// [`q8_0_r`] for `rows` activation rows.
        fn q8_0_rows => q8_0_r(
            w: &[u8],
            nw: usize,
            nb: usize,
            nb_pad: usize,
            qs: &[i8],
            dvec: &[f32],
            out_t: &mut [f32],
        )
    );

    /// The first 32 bytes of `s` (panics when shorter).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn load_u8(s: &[u8]) -> __m256i {
        let s: &[u8; 32] = s[..32].try_into().expect("32 bytes");
        // SAFETY: `s` is 32 readable bytes; `loadu` has no alignment requirement.
        unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
    }

    /// The first 32 values of `s` (panics when shorter).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn load_i8(s: &[i8]) -> __m256i {
        let s: &[i8; 32] = s[..32].try_into().expect("32 values");
        // SAFETY: `s` is 32 readable bytes; `loadu` has no alignment requirement.
        unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
    }

    /// The first 16 values of `s` (panics when shorter).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn load_i16(s: &[i16]) -> __m256i {
        let s: &[i16; 16] = s[..16].try_into().expect("16 values");
        // SAFETY: `s` is 32 readable bytes; `loadu` has no alignment requirement.
        unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
    }

    /// The little-endian f16 in `b[0..2]` as f32, via F16C.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub(crate) fn f16_at(b: &[u8]) -> f32 {
        let bits = u16::from_le_bytes([b[0], b[1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// The 8 values of `s` (panics when shorter).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn load_f32(s: &[f32]) -> __m256 {
        let s: &[f32; 8] = s[..8].try_into().expect("8 values");
        // SAFETY: `s` is 32 readable bytes; `loadu` has no alignment requirement.
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }

    /// 8 f16 bit patterns as f32, via F16C.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub(crate) fn f16x8(bits: &[u16; 8]) -> __m256 {
        // SAFETY: `bits` is 16 readable bytes; `loadu` has no alignment requirement.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(bits.as_ptr().cast()) })
    }

    /// The exact i32 sum of the 8 lanes (wrapping, as the scalar sums never overflow).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)))
    }

    /// Lane `t` of the result is the sum of the 8 lanes of `p[t]` (exact integers).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn reduce8(p: &[__m256i; 8]) -> __m256i {
        let t0 = _mm256_hadd_epi32(p[0], p[1]);
        let t1 = _mm256_hadd_epi32(p[2], p[3]);
        let t2 = _mm256_hadd_epi32(p[4], p[5]);
        let t3 = _mm256_hadd_epi32(p[6], p[7]);
        let u0 = _mm256_hadd_epi32(t0, t1);
        let u1 = _mm256_hadd_epi32(t2, t3);
        _mm256_add_epi32(_mm256_permute2x128_si256::<0x20>(u0, u1), _mm256_permute2x128_si256::<0x31>(u0, u1))
    }

    /// The sum of the 8 lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// Q4K: the 128 `qs` bytes give eight 32-lane u8 operands (low / high nibbles of each 32
    /// bytes: sub-blocks 2c and 2c + 1), `maddubs` against the activation (at most 2 · 15 · 128
    /// per i16, no saturation), `madd` with the sub-block scale (fused with the sum as
    /// [`dpwssd`]; two sums, for a shorter dependency chain); the min term is one `madd` of the
    /// 16 activation sums with the mins (each repeated for its two 16-value halves).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `VNNI` (it runs inlined into a
    /// function compiled for them: [`avx2_forms`]).
    #[inline(always)]
    unsafe fn q4k_r<const VNNI: bool, const R: usize>(w: &[u8], nw: usize, act: &ActQ8K, out_t: &mut [f32]) {
        // SAFETY: the features are the caller's contract (this body runs inlined into a
        // function compiled for them); memory is read through bounds-checked slices.
        unsafe {
            let nb = act.nb;
            let row_bytes = nb * 144;
            let m4 = _mm256_set1_epi8(0x0F);
            let dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
            for (j, row) in w.chunks_exact(row_bytes).take(nw).enumerate() {
                let mut acc = [0f32; R];
                for (b, blk) in row.chunks_exact(144).enumerate() {
                    crate::kernels::prefetch::prefetch_ahead(blk.as_ptr(), 144, 144);
                    let (dw, dminw) = (f16_at(&blk[0..2]), f16_at(&blk[2..4]));
                    let (sc, mn) = q4k_scales_mins(&blk[4..16]);
                    let sc = sc.to_le_bytes();
                    let mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_cvtsi64_si128(mn as i64), dup));
                    let qs = &blk[16..144];
                    let mut v = [_mm256_setzero_si256(); 8];
                    for c in 0..4 {
                        let q = load_u8(&qs[32 * c..]);
                        v[2 * c] = _mm256_and_si256(q, m4);
                        v[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                    }
                    let mut s = [_mm256_setzero_si256(); 8];
                    for (s, &b) in s.iter_mut().zip(&sc) {
                        *s = _mm256_set1_epi16(b as i16);
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let ab = r * nb + b;
                        let q8 = &act.qs[ab * QK_K..(ab + 1) * QK_K];
                        let mut si = [_mm256_setzero_si256(); 2];
                        for z in 0..8 {
                            let p = _mm256_maddubs_epi16(v[z], load_i8(&q8[32 * z..]));
                            si[z % 2] = dpwssd::<VNNI>(si[z % 2], p, s[z]);
                        }
                        let si = _mm256_add_epi32(si[0], si[1]);
                        let sm = _mm256_madd_epi16(mins, load_i16(&act.bsums[ab * 16..]));
                        // The scalar loop's f32 arithmetic on the same exact integers.
                        let yd = act.d[ab];
                        let (d, dmin) = (yd * dw, yd * dminw);
                        *acc += d * hsum_i32(si) as f32 - dmin * hsum_i32(sm) as f32;
                    }
                }
                out_t[j * R..(j + 1) * R].copy_from_slice(&acc);
            }
        }
    }

    /// Q6K: values rebuilt as unsigned `q + 32` (0..63) in natural order, eight 32-lane
    /// operands; `maddubs` (at most 2 · 63 · 128 per i16) and `madd` with the 16-value scales
    /// (fused with the sum as [`dpwssd`]; two sums) give exact i32 sums, and the `+32` is
    /// removed with `madd(-32 · scales, bsums)`.
    ///
    /// # Safety
    /// As for [`q4k_r`].
    #[inline(always)]
    unsafe fn q6k_r<const VNNI: bool, const R: usize>(w: &[u8], nw: usize, act: &ActQ8K, out_t: &mut [f32]) {
        // SAFETY: the features are the caller's contract (this body runs inlined into a
        // function compiled for them); memory is read through bounds-checked slices.
        unsafe {
            let nb = act.nb;
            let row_bytes = nb * 210;
            let m4 = _mm256_set1_epi8(0x0F);
            let m3 = _mm256_set1_epi8(0x03);
            for (j, row) in w.chunks_exact(row_bytes).take(nw).enumerate() {
                let mut acc = [0f32; R];
                for (b, blk) in row.chunks_exact(210).enumerate() {
                    crate::kernels::prefetch::prefetch_ahead(blk.as_ptr(), 210, 210);
                    let dw = f16_at(&blk[208..210]);
                    let mut v = [_mm256_setzero_si256(); 8];
                    for h in 0..2 {
                        let l0 = load_u8(&blk[64 * h..]);
                        let l1 = load_u8(&blk[64 * h + 32..]);
                        let hb = load_u8(&blk[128 + 32 * h..]);
                        // Bits 4 and 5 of each value: 2 bits of `qh` moved up (at most 0x30 per byte).
                        let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(hb, m3));
                        let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(hb, _mm256_slli_epi16::<2>(m3)));
                        let h2 = _mm256_and_si256(hb, _mm256_slli_epi16::<4>(m3));
                        let h3 = _mm256_and_si256(_mm256_srli_epi16::<2>(hb), _mm256_slli_epi16::<4>(m3));
                        v[4 * h] = _mm256_or_si256(_mm256_and_si256(l0, m4), h0);
                        v[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), h1);
                        v[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4), h2);
                        v[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4), h3);
                    }
                    let scales = &blk[192..208];
                    let mut s = [_mm256_setzero_si256(); 8];
                    for (z, s) in s.iter_mut().enumerate() {
                        let (lo, hi) = (scales[2 * z] as i8 as i16, scales[2 * z + 1] as i8 as i16);
                        *s = _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo));
                    }
                    let sc16: [i16; 16] = std::array::from_fn(|g| -32 * scales[g] as i8 as i16);
                    let scn = load_i16(&sc16);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let ab = r * nb + b;
                        let q8 = &act.qs[ab * QK_K..(ab + 1) * QK_K];
                        let mut si = [_mm256_madd_epi16(scn, load_i16(&act.bsums[ab * 16..])), _mm256_setzero_si256()];
                        for z in 0..8 {
                            let p = _mm256_maddubs_epi16(v[z], load_i8(&q8[32 * z..]));
                            si[z % 2] = dpwssd::<VNNI>(si[z % 2], p, s[z]);
                        }
                        let si = _mm256_add_epi32(si[0], si[1]);
                        // The scalar loop's f32 arithmetic on the same exact integer.
                        *acc += dw * act.d[ab] * hsum_i32(si) as f32;
                    }
                }
                out_t[j * R..(j + 1) * R].copy_from_slice(&acc);
            }
        }
    }

    /// Q8_0: signed × signed products as `maddubs(|w|, sign(w) · a)` (`|w|` exact as u8 even
    /// for -128; activations lie in -127..=127, so at most 2 · 128 · 127 per i16), then `madd`
    /// with ones (together one [`dpbusd`]); eight blocks' sums are reduced together into one vector of exact block sums
    /// (lane = block), scaled by `d_w · d_a` lane-wise.
    ///
    /// # Safety
    /// As for [`q4k_r`].
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn q8_0_r<const VNNI: bool, const R: usize>(
        w: &[u8],
        nw: usize,
        nb: usize,
        nb_pad: usize,
        qs: &[i8],
        dvec: &[f32],
        out_t: &mut [f32],
    ) {
        // SAFETY: the features are the caller's contract (this body runs inlined into a
        // function compiled for them); memory is read through bounds-checked slices.
        unsafe {
            let row_bytes = nb * 34;
            let zero = _mm256_setzero_si256();
            for (j, row) in w.chunks_exact(row_bytes).take(nw).enumerate() {
                let mut acc = [_mm256_setzero_ps(); R];
                // Eight blocks at a time: each block's integer sum lands exact in one lane.
                for b0 in (0..nb).step_by(8) {
                    let cnt = 8.min(nb - b0);
                    crate::kernels::prefetch::prefetch_ahead(row.as_ptr().wrapping_add(b0 * 34), 34, 8 * 34);
                    let (mut wv, mut absw, mut dbits) = ([zero; 8], [zero; 8], [0u16; 8]);
                    for t in 0..cnt {
                        let blk = &row[(b0 + t) * 34..(b0 + t + 1) * 34];
                        dbits[t] = u16::from_le_bytes([blk[0], blk[1]]);
                        wv[t] = load_u8(&blk[2..]);
                        absw[t] = _mm256_sign_epi8(wv[t], wv[t]);
                    }
                    let dw = f16x8(&dbits);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let mut p = [zero; 8];
                        let mut da = [0f32; 8];
                        for t in 0..cnt {
                            let o = r * nb_pad + b0 + t;
                            let sa = _mm256_sign_epi8(load_i8(&qs[o * QK8_0..]), wv[t]);
                            p[t] = dpbusd::<VNNI>(zero, absw[t], sa);
                            da[t] = dvec[o * 8];
                        }
                        let isum = _mm256_cvtepi32_ps(reduce8(&p));
                        *acc = _mm256_fmadd_ps(isum, _mm256_mul_ps(dw, load_f32(&da)), *acc);
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    out_t[j * R + r] = hsum(*acc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Deterministic values in roughly [-1, 1) with some larger outliers.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        crate::kernels::testing::values_with_outliers(len, seed, 4.0)
    }

    fn gdtype(f: QFormat) -> GgmlDType {
        match f {
            QFormat::Q8_0 => GgmlDType::Q8_0,
            QFormat::Q4K => GgmlDType::Q4K,
            QFormat::Q6K => GgmlDType::Q6K,
        }
    }

    /// candle's generic CPU quantized matmul (`k_quants::matmul`, per-block `vec_dot`), the
    /// numerics this module reproduces; `apply_op1_no_bwd` may instead take candle's x86 tiled
    /// path, which quantizes activations to Q8K even for Q8_0 weights.
    fn candle_generic(format: QFormat, x: &[f32], rows: usize, bytes: &[u8], n: usize, k: usize) -> Vec<f32> {
        use candle_core::quantized::k_quants::{self, BlockQ4K, BlockQ6K, BlockQ8_0, GgmlType};
        fn run<T: GgmlType>(x: &[f32], rows: usize, bytes: &[u8], n: usize, k: usize) -> Vec<f32> {
            let size = std::mem::size_of::<T>();
            assert_eq!(bytes.len() % size, 0);
            let mut blocks = vec![T::zeros(); bytes.len() / size];
            // SAFETY: the GGML block structs are repr(C) plain data of exactly these bytes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, bytes.len()) };
            let mut dst = vec![0f32; rows * n];
            k_quants::matmul::<T>((rows, k, n), x, &blocks, &mut dst).unwrap();
            dst
        }
        match format {
            QFormat::Q4K => run::<BlockQ4K>(x, rows, bytes, n, k),
            QFormat::Q6K => run::<BlockQ6K>(x, rows, bytes, n, k),
            QFormat::Q8_0 => run::<BlockQ8_0>(x, rows, bytes, n, k),
        }
    }

    /// Checks every kernel against candle's generic quantized matmul (tight: same integer block
    /// dot products, only the f32 summation order differs), candle's `apply_op1_no_bwd`, and an
    /// f64 product with the dequantized weight (bounded by the 8-bit activation rounding).
    fn check(format: QFormat, rows: usize, n: usize, k: usize) {
        let dev = Device::Cpu;
        let wv = values(n * k, (n * 31 + k) as u64);
        let xv = values(rows * k, (rows * 7 + k * 3 + n) as u64 + 1);
        let wt = Tensor::from_vec(wv, (n, k), &dev).unwrap();
        let qt = QTensor::quantize(&wt, gdtype(format)).unwrap();
        let bytes = qt.data().unwrap().into_owned();
        assert_eq!(bytes.len(), n * format.row_bytes(k));
        let xt = Tensor::from_vec(xv.clone(), (rows, k), &dev).unwrap();
        let op: Vec<f32> = xt.apply_op1_no_bwd(&qt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let generic = candle_generic(format, &xv, rows, &bytes, n, k);
        let wd: Vec<f32> = qt.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // Activation quantization block: Q8_0 activations for Q8_0 weights, Q8K otherwise.
        let ab = if format == QFormat::Q8_0 { QK8_0 } else { QK_K };
        cpu::for_each_set(|set| {
            let kernel = Kernel::detect();
            let mut out = vec![f32::NAN; rows * n];
            qgemv(format, &xv, rows, &bytes, n, k, &mut out);
            for r in 0..rows {
                let xr = &xv[r * k..(r + 1) * k];
                for j in 0..n {
                    let wr = &wd[j * k..(j + 1) * k];
                    let exact: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let abs: f64 = xr.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                    // Rounding x to 8 bits moves each value by at most amax(block) / 254.
                    let qerr: f64 = xr
                        .chunks(ab)
                        .zip(wr.chunks(ab))
                        .map(|(xb, wb)| {
                            let amax = xb.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
                            amax / 254.0 * wb.iter().map(|&v| (v as f64).abs()).sum::<f64>()
                        })
                        .sum();
                    let got = out[r * n + j] as f64;
                    let ctx = format!("{format:?} {set} {kernel:?} rows={rows} n={n} k={k} r={r} j={j}");
                    let want = generic[r * n + j] as f64;
                    let tol = 1e-5 * abs + 1e-30;
                    assert!((got - want).abs() <= tol, "{ctx}: ours {got} vs candle generic {want} (tol {tol})");
                    let want = op[r * n + j] as f64;
                    // Q8_0 through candle's tiles uses Q8K activations: compare loosely.
                    let tol = if format == QFormat::Q8_0 { 2.0 * qerr + 2e-3 * abs } else { 1e-4 * abs } + 1e-30;
                    assert!((got - want).abs() <= tol, "{ctx}: ours {got} vs candle op {want} (tol {tol})");
                    // Plus f16 rounding of the Q8_0 activation scale (2^-11 relative).
                    let tol = 1.01 * qerr + 1e-3 * abs + 1e-30;
                    assert!((got - exact).abs() <= tol, "{ctx}: ours {got} vs f64 {exact} (tol {tol})");
                }
            }
        });
    }

    #[test]
    fn q4k_matches_candle() {
        for rows in [1, 2, 3, 8] {
            for n in [1, 5, 16, 33, 100] {
                for k in [256, 512, 768, 4096, 4352] {
                    check(QFormat::Q4K, rows, n, k);
                }
            }
        }
    }

    #[test]
    fn q6k_matches_candle() {
        for rows in [1, 2, 3, 8] {
            for n in [1, 5, 16, 33, 100] {
                for k in [256, 512, 4096] {
                    check(QFormat::Q6K, rows, n, k);
                }
            }
        }
    }

    #[test]
    fn q8_0_matches_candle() {
        for rows in [1, 2, 3, 8] {
            for n in [1, 5, 16, 33, 100] {
                for k in [32, 64, 96, 256, 512, 4096] {
                    check(QFormat::Q8_0, rows, n, k);
                }
            }
        }
    }

    #[test]
    fn all_row_counts_and_large_n() {
        // Every row count (each has its own compiled kernel) and enough rows for many tasks.
        for rows in 1..=8 {
            check(QFormat::Q4K, rows, 300, 1024);
        }
        check(QFormat::Q6K, 5, 700, 512);
        check(QFormat::Q8_0, 7, 500, 288);
    }

    /// Zero activation blocks (zero scale) and a single dominant value.
    #[test]
    fn zero_and_spiky_inputs() {
        let (n, k) = (9, 512);
        let wv = values(n * k, 5);
        let wt = Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap();
        for format in [QFormat::Q4K, QFormat::Q6K, QFormat::Q8_0] {
            let qt = QTensor::quantize(&wt, gdtype(format)).unwrap();
            let bytes = qt.data().unwrap().into_owned();
            let mut x = vec![0f32; 2 * k];
            x[k + 300] = -3.0;
            let want = candle_generic(format, &x, 2, &bytes, n, k);
            cpu::for_each_set(|set| {
                let mut out = vec![f32::NAN; 2 * n];
                qgemv(format, &x, 2, &bytes, n, k, &mut out);
                for (i, (&g, &e)) in out.iter().zip(&want).enumerate() {
                    assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{format:?} {set} {i}: {g} vs {e}");
                }
                assert!(out[..n].iter().all(|&v| v == 0.0), "{format:?} {set}: zero row");
            });
        }
    }

    /// The vectorised activation quantizers give the scalar ones' bytes, ties included.
    #[test]
    fn simd_quantizers_match_scalar() {
        let mut x = values(8 * 4096, 99);
        // A block whose max is -127 quantizes with iscale = 1: exact .5 ties.
        for (i, v) in x[..QK_K].iter_mut().enumerate() {
            *v = (i as f32 - 128.0) * 0.5;
        }
        x[7] = -127.0;
        x[QK_K..2 * QK_K].fill(0.0);
        for v in &mut x[2 * QK_K..2 * QK_K + 32] {
            *v *= 127.0; // Q8_0 block with ties around multiples of 0.5 after scaling
        }
        x[2 * QK_K + 5] = 127.0;
        let kernel = Kernel::detect();
        if kernel == Kernel::Scalar {
            return;
        }
        for rows in [1, 8] {
            let x = &x[..rows * 4096];
            for permute in [false, true] {
                let a = ActQ8K::quantize(Kernel::Scalar, x, rows, 16, permute);
                let b = ActQ8K::quantize(kernel, x, rows, 16, permute);
                assert_eq!(a.qs, b.qs);
                assert_eq!(a.bsums, b.bsums);
                assert_eq!(
                    a.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
            let a = ActQ80::quantize(Kernel::Scalar, x, rows, 128);
            let b = ActQ80::quantize(kernel, x, rows, 128);
            assert_eq!(a.qs, b.qs);
            assert_eq!(
                a.dvec.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.dvec.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    /// The AVX2 Q4K and Q6K kernels, in both forms (`maddubs` + `madd`, AVX-VNNI), do the
    /// scalar loop's f32 arithmetic on the same exact integers, block by block: their results
    /// equal the scalar path's bit for bit.
    #[test]
    fn avx2_k_quants_equal_scalar_bitwise() {
        if !cpu::available_sets().contains(&cpu::KernelSet::Avx2) {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        for format in [QFormat::Q4K, QFormat::Q6K] {
            for (rows, n, k) in [(1, 37, 768), (3, 64, 256), (8, 19, 4096)] {
                let w = Tensor::from_vec(values(n * k, 11 + n as u64), (n, k), &Device::Cpu).unwrap();
                let bytes = QTensor::quantize(&w, gdtype(format)).unwrap().data().unwrap().into_owned();
                let x = values(rows * k, 5 + k as u64);
                let portable = run_bits(cpu::KernelSet::Portable, format, &x, rows, &bytes, n, k);
                for set in [cpu::KernelSet::Avx2, cpu::KernelSet::AvxVnni] {
                    let got = run_bits(set, format, &x, rows, &bytes, n, k);
                    assert_eq!(got, portable, "{format:?} {set} rows={rows} n={n} k={k}");
                }
            }
        }
    }

    /// `qgemv` with the kernel set forced to `set`, as output bits (with `AvxVnni`, checked to
    /// run the AVX-VNNI forms where they are reachable).
    fn run_bits(
        set: cpu::KernelSet,
        format: QFormat,
        x: &[f32],
        rows: usize,
        w: &[u8],
        n: usize,
        k: usize,
    ) -> Vec<u32> {
        let _g = cpu::force(set);
        #[cfg(target_arch = "x86_64")]
        if set == cpu::KernelSet::AvxVnni && crate::kernels::testing::avx_vnni_reachable() {
            assert_eq!(Kernel::detect(), Kernel::AvxVnni);
        }
        let mut out = vec![f32::NAN; rows * n];
        qgemv(format, x, rows, w, n, k, &mut out);
        out.iter().map(|v| v.to_bits()).collect()
    }

    /// The AVX-VNNI forms (`vpdpbusd`, `vpdpwssd`) give the same exact integers as `maddubs` +
    /// `madd`, and the same f32 arithmetic follows: the same bits as the AVX2 path for every
    /// format, also at the extremes of the i16 pair sums (Q8_0 weights of -128 and 127 against
    /// activations quantized to ±127; Q4K/Q6K activations of ±1 that quantize to -128..127).
    #[test]
    fn avx_vnni_equals_avx2_bitwise() {
        if !crate::kernels::testing::avx_vnni_reachable() {
            eprintln!("no AVX-VNNI on this CPU (or VIDEOLLAVA_KERNELS caps it): nothing to compare");
            return;
        }
        for format in [QFormat::Q8_0, QFormat::Q4K, QFormat::Q6K] {
            for (rows, n, k) in [(1, 37, 768), (3, 64, 256), (8, 19, 4096), (5, 33, 512)] {
                let w = Tensor::from_vec(values(n * k, 3 + n as u64), (n, k), &Device::Cpu).unwrap();
                let mut bytes = QTensor::quantize(&w, gdtype(format)).unwrap().data().unwrap().into_owned();
                if format == QFormat::Q8_0 {
                    // Every other block: bytes of -128 and 127 only.
                    for blk in bytes.chunks_exact_mut(34).step_by(2) {
                        for (l, q) in blk[2..].iter_mut().enumerate() {
                            *q = if l % 3 == 0 { 0x7f } else { 0x80 };
                        }
                    }
                }
                let signs: Vec<f32> = (0..rows * k).map(|t| if (t / 3) % 2 == 0 { 1.0 } else { -1.0 }).collect();
                for x in [values(rows * k, 9 + k as u64), signs] {
                    let avx2 = run_bits(cpu::KernelSet::Avx2, format, &x, rows, &bytes, n, k);
                    let vnni = run_bits(cpu::KernelSet::AvxVnni, format, &x, rows, &bytes, n, k);
                    assert_eq!(vnni, avx2, "{format:?} rows={rows} n={n} k={k}");
                }
            }
        }
    }

    #[test]
    fn rounding_matches_std() {
        let mut v = -300.0f32;
        while v <= 300.0 {
            for x in [v, f32::from_bits(v.to_bits() + 1), f32::from_bits(v.to_bits().wrapping_sub(1))] {
                if x.is_nan() {
                    continue; // the neighbour below +0.0 in bits
                }
                assert_eq!(round_half_away(x), x.round(), "{x}");
            }
            v += 0.125;
        }
        for x in [0.49999997f32, -0.49999997, 2.5, -2.5, 1e9, -1e9, 8388607.5, f32::MAX] {
            assert_eq!(round_half_away(x), x.round(), "{x}");
        }
        assert!(round_half_away(f32::NAN).is_nan());
    }

    #[test]
    #[should_panic(expected = "not a multiple")]
    fn rejects_bad_k() {
        let mut out = vec![0f32; 1];
        qgemv(QFormat::Q4K, &[0.0; 100], 1, &[0u8; 144], 1, 100, &mut out);
    }

    #[test]
    #[should_panic(expected = "weight has")]
    fn rejects_short_weight() {
        let mut out = vec![0f32; 2];
        qgemv(QFormat::Q8_0, &[0.0; 32], 1, &[0u8; 34], 2, 32, &mut out);
    }

    /// One decode step's worth of Q4K matrix-vector products at the 7B shapes (4 matrices of
    /// each kind, so that the weights come from memory): GB/s of compact blocks. `cargo test
    /// --release -p videollava --lib qgemv::tests::bench_q4k -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_q4k_decode() {
        // `BENCH_FORMAT=q8_0` or `q6k` for the other formats.
        let (format, ggml) = match std::env::var("BENCH_FORMAT").as_deref() {
            Ok("q8_0") => (QFormat::Q8_0, GgmlDType::Q8_0),
            Ok("q6k") => (QFormat::Q6K, GgmlDType::Q6K),
            _ => (QFormat::Q4K, GgmlDType::Q4K),
        };
        for (n, k) in [(64, 4096), (4096, 4096), (11008, 4096), (4096, 11008)] {
            let mats: Vec<Vec<u8>> = (0..4)
                .map(|m| {
                    let w = Tensor::from_vec(values(n * k, 7 + m), (n, k), &Device::Cpu).unwrap();
                    QTensor::quantize(&w, ggml).unwrap().data().unwrap().to_vec()
                })
                .collect();
            let x = values(k, 3);
            let mut out = vec![0f32; n];
            let mut times = Vec::new();
            for it in 0..40 {
                let t0 = std::time::Instant::now();
                qgemv(format, &x, 1, &mats[it % 4], n, k, &mut out);
                times.push(t0.elapsed().as_secs_f64());
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let med = times[times.len() / 2];
            eprintln!("{format:?} {n}x{k}: {:.3} ms, {:.1} GB/s", med * 1e3, mats[0].len() as f64 / med / 1e9);
        }
    }
}
