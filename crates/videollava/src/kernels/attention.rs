//! Fused CPU attention (the decoder's and the vision towers').
//!
//! [`attention`] computes `softmax(q k^T * scale + mask) v` without materialising the mask or the
//! `[L, T]` score matrix: the masking *rules* (key validity per row, causal order from the first
//! query's cache index, optional sliding window) are applied while scoring, one task per
//! (batch row, key/value head, chunk of query rows), so no task holds more than `rows x T` f32
//! scores. Grouped-query attention reads each key/value head once for all the query heads that
//! share it (no `repeat_kv` copy).
//!
//! Numerics follow the previous candle path and transformers' eager attention: scores, softmax and
//! the output accumulation are f32 (bf16/f16 inputs are widened element by element); for bf16/f16
//! the probabilities are rounded to the input dtype before the weighted sum of the values, as
//! `softmax(..., dtype=float32).to(query.dtype)` does; the output is written in the input dtype.
//! On CPUs with AVX-512 BF16, bf16 inputs take the `bf16dot` kernels: both products on `vdpbf16ps` (bf16
//! products are exact in f32, f32 accumulation), the same f32 softmax; results differ from the
//! widening path by f32 summation order only (and the bf16 roundings that this may flip).

use candle_core::{DType, Device, Storage, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use super::fused::exp_f32 as exp;
use crate::error::{Error, Result};

/// Which keys each query may attend to. Key `j` (a cache index, `0..T`) is visible to query `i`
/// (`0..L`, at cache index `past + i`) iff `key_valid[b * T + j] != 0`, and, when `causal`,
/// `j <= past + i`, and, with `sliding_window = Some(w)`, `past + i < j + w` (the rule of
/// transformers' Mistral mask: the query's own position and the `w - 1` before it).
///
/// A query row that sees no key at all (a padding query in a left-padded batch) gets uniform
/// probabilities `1 / T` over all `T` keys, which is what adding an `f32::MIN` mask to every score
/// and taking the softmax produced on the previous path; such rows are never read.
#[derive(Debug, Clone, Copy)]
pub struct MaskRules<'a> {
    /// `[B, T]` row-major (u32 1/0): which cached positions are real tokens.
    pub key_valid: &'a [u32],
    /// Cache index of the first query; `past + L <= T`.
    pub past: usize,
    /// Whether query `i` is limited to keys `j <= past + i`.
    pub causal: bool,
    /// Mistral's `sliding_window`: keys more than `w - 1` positions before the query are hidden.
    pub sliding_window: Option<usize>,
}

/// Fused attention on the CPU.
///
/// - `q`: `[B, H, L, D]`; `k`, `v`: `[B, H_kv, T, D]`, possibly strided views (e.g.
///   the KV cache's buffers) as long as the last dimension is contiguous (otherwise they are copied);
/// - all three f32, bf16 or f16, the same dtype; `H` a multiple of `H_kv` (query head `hh` uses key/value
///   head `hh / (H / H_kv)`);
/// - `scale` multiplies the f32 dot products (`1 / sqrt(D)` for Llama).
///
/// Returns the attention output `[B, L, H * D]` in the input dtype (heads side by side, the layout
/// `o_proj` takes).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, rules: &MaskRules) -> Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    let (bk, hkv, t, dk) = k.dims4()?;
    if v.dims4()? != (bk, hkv, t, dk) || bk != b || dk != d {
        return Err(Error::Model(format!(
            "attention: q {:?}, k {:?} and v {:?} do not fit [B, H, L, D] / [B, H_kv, T, D]",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if hkv == 0 || h % hkv != 0 {
        return Err(Error::Model(format!("attention: {h} query heads cannot share {hkv} key/value heads")));
    }
    if rules.past + l > t || rules.key_valid.len() != b * t {
        return Err(Error::Model(format!(
            "attention: {l} queries after {} cached positions with {t} keys and a key mask of {} entries \
             for {b} rows",
            rules.past,
            rules.key_valid.len()
        )));
    }
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype {
        return Err(Error::Model(format!(
            "attention: q, k, v dtypes differ ({dtype:?}, {:?}, {:?})",
            k.dtype(),
            v.dtype()
        )));
    }
    if !q.device().is_cpu() || !k.device().is_cpu() || !v.device().is_cpu() {
        return Err(Error::Model("attention: the fused kernel runs on the CPU only".into()));
    }
    // The kernel reads rows of D contiguous elements.
    let last_contiguous = |x: &Tensor| -> Result<Tensor> {
        if x.stride()[3] == 1 || d <= 1 {
            Ok(x.clone())
        } else {
            Ok(x.contiguous()?)
        }
    };
    let (q, k, v) = (last_contiguous(q)?, last_contiguous(k)?, last_contiguous(v)?);
    let shape = Shape { b, h, l, hkv, t, d };
    match dtype {
        DType::F32 => run::<f32>(&q, &k, &v, scale, rules, shape),
        DType::BF16 => run::<bf16>(&q, &k, &v, scale, rules, shape),
        DType::F16 => run::<f16>(&q, &k, &v, scale, rules, shape),
        other => Err(Error::Model(format!("attention: unsupported dtype {other:?} (f32, bf16 or f16)"))),
    }
}

/// Element types the kernel reads and writes.
trait Elem: WithDType + Copy + Send + Sync {
    fn widen(self) -> f32;
    fn narrow(x: f32) -> Self;
    /// `x` rounded to this type's precision, back in f32 (identity for f32).
    fn round(x: f32) -> f32;
    /// The AVX-512 BF16 task (bf16 only; `None` for the other types). Only called when
    /// `p.bf16dot` is set, i.e. the CPU features were detected.
    #[cfg(target_arch = "x86_64")]
    fn bf16dot_task(_p: &Params<Self>, _bi: usize, _kvh: usize, _i0: usize, _cl: usize) -> Option<Vec<f32>> {
        None
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline(always)]
    fn round(x: f32) -> f32 {
        // Round to nearest even on the upper 16 bits (`x` is a finite probability here).
        let bits = x.to_bits();
        let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1));
        f32::from_bits(rounded & 0xFFFF_0000)
    }
    #[cfg(target_arch = "x86_64")]
    fn bf16dot_task(p: &Params<Self>, bi: usize, kvh: usize, i0: usize, cl: usize) -> Option<Vec<f32>> {
        debug_assert!(p.bf16dot && bf16dot_available());
        // SAFETY: `p.bf16dot` is only set when AVX-512 F/BW/BF16, AVX2 and FMA were detected.
        Some(unsafe { bf16dot::task(p, bi, kvh, i0, cl) })
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn round(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    b: usize,
    h: usize,
    l: usize,
    hkv: usize,
    t: usize,
    d: usize,
}

/// Everything a task reads: element slices with their offsets and `[b, head, position]` strides.
struct Params<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    q_at: Strides,
    k_at: Strides,
    v_at: Strides,
    shape: Shape,
    rep: usize,
    scale: f32,
    rules: MaskRules<'a>,
    /// AVX2 and FMA were detected at run time (and are wanted): the `task_avx2` kernels run.
    simd: bool,
    /// bf16 inputs, AVX-512 BF16 detected at run time (and wanted): the `bf16dot` kernels run.
    bf16dot: bool,
    /// With `bf16dot`: AMX BF16 tiles usable too, so tasks of 16 rows or more multiply on tiles.
    amx: bool,
}

#[derive(Debug, Clone, Copy)]
struct Strides {
    start: usize,
    b: usize,
    h: usize,
    pos: usize,
}

impl Strides {
    #[inline(always)]
    fn at(&self, b: usize, h: usize, pos: usize) -> usize {
        self.start + b * self.b + h * self.h + pos * self.pos
    }
}

/// Query rows (per key/value head) a task handles: `rep * chunk` rows of scores per task.
const TASK_ROWS: usize = 64;
/// The same on AMX tiles: more rows per task share the packing of the head's keys and values.
const TASK_ROWS_AMX: usize = 256;
/// From this many rows a task converts key/value tiles to f32 and uses the blocked kernels.
const TILE_ROWS: usize = 8;
/// Keys per tile.
const KT: usize = 16;

fn run<T: Elem>(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, rules: &MaskRules, shape: Shape) -> Result<Tensor> {
    let Shape { b, h, l, hkv, d, .. } = shape;
    let (q_guard, q_layout) = q.storage_and_layout();
    let (k_guard, k_layout) = k.storage_and_layout();
    let (v_guard, v_layout) = v.storage_and_layout();
    let strides = |layout: &candle_core::Layout| {
        let s = layout.stride();
        Strides { start: layout.start_offset(), b: s[0], h: s[1], pos: s[2] }
    };
    let rep = h / hkv;
    let params = Params {
        q: cpu_slice::<T>(&q_guard)?,
        k: cpu_slice::<T>(&k_guard)?,
        v: cpu_slice::<T>(&v_guard)?,
        q_at: strides(q_layout),
        k_at: strides(k_layout),
        v_at: strides(v_layout),
        shape,
        rep,
        scale,
        rules: *rules,
        simd: simd_available(),
        bf16dot: T::DTYPE == DType::BF16 && bf16dot_available(),
        amx: T::DTYPE == DType::BF16 && bf16dot_available() && super::cpu::features().amx_bf16,
    };
    if b * h * l * d == 0 {
        return Ok(Tensor::zeros((b, l, h * d), T::DTYPE, &Device::Cpu)?);
    }
    // Tasks: (batch row, kv head, first query, query count), in output order.
    let task_rows = if params.amx { TASK_ROWS_AMX } else { TASK_ROWS };
    let chunk = (task_rows / rep).clamp(1, l);
    let n_chunks = l.div_ceil(chunk);
    let mut tasks = Vec::with_capacity(b * hkv * n_chunks);
    for bi in 0..b {
        for kvh in 0..hkv {
            for c in 0..n_chunks {
                let i0 = c * chunk;
                tasks.push((bi, kvh, i0, chunk.min(l - i0)));
            }
        }
    }
    let results: Vec<Vec<f32>> =
        tasks.par_iter().map(|&(bi, kvh, i0, cl)| run_task(&params, bi, kvh, i0, cl)).collect();
    // Scatter into [B, L, H * D]: task rows are (group g, query ii) -> head kvh * rep + g.
    let mut out = vec![T::narrow(0.0); b * l * h * d];
    out.par_chunks_mut(h * d).enumerate().for_each(|(row, dst)| {
        let (bi, i) = (row / l, row % l);
        let (ci, ii) = (i / chunk, i % chunk);
        for (hh, dst) in dst.chunks_exact_mut(d).enumerate() {
            let (kvh, g) = (hh / rep, hh % rep);
            let task = (bi * hkv + kvh) * n_chunks + ci;
            let cl = tasks[task].3;
            let src = &results[task][(g * cl + ii) * d..][..d];
            for (o, &x) in dst.iter_mut().zip(src) {
                *o = T::narrow(x);
            }
        }
    });
    drop((q_guard, k_guard, v_guard));
    Ok(Tensor::from_vec(out, (b, l, h * d), &Device::Cpu)?)
}

fn cpu_slice<T: Elem>(s: &Storage) -> Result<&[T]> {
    match s {
        Storage::Cpu(cpu) => Ok(cpu.as_slice::<T>()?),
        _ => Err(Error::Model("attention: the fused kernel runs on the CPU only".into())),
    }
}

fn simd_available() -> bool {
    super::cpu::features().avx2
}

/// AVX-512 with BF16 dot products (`vdpbf16ps`) was detected at run time.
fn bf16dot_available() -> bool {
    super::cpu::features().avx512_bf16
}

fn run_task<T: Elem>(p: &Params<T>, bi: usize, kvh: usize, i0: usize, cl: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if p.bf16dot {
        if let Some(out) = T::bf16dot_task(p, bi, kvh, i0, cl) {
            return out;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if p.simd {
        // SAFETY: `p.simd` is only set when AVX2 and FMA were detected at run time.
        return unsafe { task_avx2(p, bi, kvh, i0, cl) };
    }
    task::<T, { cfg!(target_arch = "aarch64") }>(p, bi, kvh, i0, cl)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2<T: Elem>(p: &Params<T>, bi: usize, kvh: usize, i0: usize, cl: usize) -> Vec<f32> {
    task::<T, true>(p, bi, kvh, i0, cl)
}

/// `a * b + c`, fused where the target has FMA (an unfused `mul_add` is a slow library call).
#[inline(always)]
fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
pub(crate) fn hsum(acc: &[f32; 16]) -> f32 {
    let mut s = [0f32; 4];
    for i in 0..4 {
        s[i] = (acc[i] + acc[i + 4]) + (acc[i + 8] + acc[i + 12]);
    }
    (s[0] + s[2]) + (s[1] + s[3])
}

/// `sum_i a[i] * b[i]` in f32; `a.len() == b.len()`.
#[inline(always)]
fn dot<T: Elem, const FMA: bool>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] = fma::<FMA>(x[i], y[i].widen(), acc[i]);
        }
    }
    let mut tail = 0f32;
    for (&x, &y) in ar.iter().zip(br) {
        tail = fma::<FMA>(x, y.widen(), tail);
    }
    hsum(&acc) + tail
}

/// `out += p * x`; `out.len() == x.len()`.
#[inline(always)]
fn axpy<T: Elem, const FMA: bool>(out: &mut [f32], p: f32, x: &[T]) {
    let mut oc = out.chunks_exact_mut(16);
    let xc = x.chunks_exact(16);
    let xr = xc.remainder();
    for (o, y) in (&mut oc).zip(xc) {
        for i in 0..16 {
            o[i] = fma::<FMA>(p, y[i].widen(), o[i]);
        }
    }
    for (o, &y) in oc.into_remainder().iter_mut().zip(xr) {
        *o = fma::<FMA>(p, y.widen(), *o);
    }
}

/// Softmax of one row of raw dot products in place: `row[j] * scale` where `valid[j] != 0`,
/// excluded (probability 0) elsewhere; probabilities rounded to `T`. Returns false, leaving
/// zeros, when no entry is visible.
#[inline(always)]
fn softmax_row<T: Elem>(row: &mut [f32], valid: &[u32], scale: f32) -> bool {
    softmax_row_with(row, valid, scale, T::round)
}

/// [`softmax_row`] with the probabilities rounded by `round`: the reference of the vector forms
/// that the 8-bit KV cache's decode kernel runs ([`super::softmax`], which round to its query's
/// dtype).
#[cfg(test)]
pub(crate) fn softmax_probs(row: &mut [f32], valid: &[u32], scale: f32, round: fn(f32) -> f32) -> bool {
    softmax_row_with(row, valid, scale, round)
}

#[inline(always)]
fn softmax_row_with(row: &mut [f32], valid: &[u32], scale: f32, round: impl Fn(f32) -> f32) -> bool {
    let mut m = [f32::NEG_INFINITY; 16];
    let mut rc = row.chunks_exact_mut(16);
    let vc = valid.chunks_exact(16);
    let vr = vc.remainder();
    for (s, ok) in (&mut rc).zip(vc) {
        for i in 0..16 {
            let x = if ok[i] != 0 { s[i] * scale } else { f32::NEG_INFINITY };
            s[i] = x;
            m[i] = m[i].max(x);
        }
    }
    let mut max = f32::NEG_INFINITY;
    for (s, &ok) in rc.into_remainder().iter_mut().zip(vr) {
        *s = if ok != 0 { *s * scale } else { f32::NEG_INFINITY };
        max = max.max(*s);
    }
    for x in m {
        max = max.max(x);
    }
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return false;
    }
    let mut acc = [0f32; 16];
    let mut rc = row.chunks_exact_mut(16);
    for s in &mut rc {
        for i in 0..16 {
            let e = exp(s[i] - max);
            s[i] = e;
            acc[i] += e;
        }
    }
    let mut sum = 0f32;
    for s in rc.into_remainder() {
        *s = exp(*s - max);
        sum += *s;
    }
    sum += hsum(&acc);
    for s in row.iter_mut() {
        *s = round(*s / sum);
    }
    true
}

/// Scores of 4 query rows (`q`: 4 x D f32) against a tile of 16 keys transposed (`kt`: D x 16).
#[inline(always)]
fn qk_block<const FMA: bool>(q: &[f32], d: usize, kt: &[[f32; KT]]) -> [[f32; KT]; 4] {
    let (q0, rest) = q.split_at(d);
    let (q1, rest) = rest.split_at(d);
    let (q2, q3) = rest.split_at(d);
    let mut acc = [[0f32; KT]; 4];
    for ((((kr, &a), &b), &c), &e) in kt.iter().zip(q0).zip(q1).zip(q2).zip(&q3[..d]) {
        for x in 0..KT {
            acc[0][x] = fma::<FMA>(a, kr[x], acc[0][x]);
            acc[1][x] = fma::<FMA>(b, kr[x], acc[1][x]);
            acc[2][x] = fma::<FMA>(c, kr[x], acc[2][x]);
            acc[3][x] = fma::<FMA>(e, kr[x], acc[3][x]);
        }
    }
    acc
}

/// One task: query rows `i0..i0 + cl` of every query head sharing key/value head `kvh` in batch
/// row `bi`. Returns the f32 outputs, row `g * cl + ii` for head `kvh * rep + g`, query
/// `i0 + ii` (`rep * cl` rows of D).
#[inline(always)]
fn task<T: Elem, const FMA: bool>(p: &Params<T>, bi: usize, kvh: usize, i0: usize, cl: usize) -> Vec<f32> {
    let Shape { t, d, .. } = p.shape;
    let rules = &p.rules;
    let rows = p.rep * cl;
    let valid = &rules.key_valid[bi * t..(bi + 1) * t];
    // Each row's candidate keys [lo, hi) by position; validity is applied in the softmax.
    let range = |r: usize| {
        let qa = rules.past + i0 + r % cl;
        let hi = if rules.causal { (qa + 1).min(t) } else { t };
        let lo = rules.sliding_window.map_or(0, |w| (qa + 1).saturating_sub(w)).min(hi);
        (lo, hi)
    };
    let ranges: Vec<(usize, usize)> = (0..rows).map(range).collect();
    let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
    let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    let w = hi - lo;
    let tiled = rows >= TILE_ROWS;
    let rpad = if tiled { rows.next_multiple_of(4) } else { rows };

    let mut qf = vec![0f32; rpad * d];
    for (r, dst) in qf.chunks_exact_mut(d).take(rows).enumerate() {
        let at = p.q_at.at(bi, kvh * p.rep + r / cl, i0 + r % cl);
        for (o, &x) in dst.iter_mut().zip(&p.q[at..at + d]) {
            *o = x.widen();
        }
    }
    let key = |j: usize| {
        let at = p.k_at.at(bi, kvh, j);
        &p.k[at..at + d]
    };
    let value = |j: usize| {
        let at = p.v_at.at(bi, kvh, j);
        &p.v[at..at + d]
    };
    // Key range of each block of 4 rows (tiled path).
    let blocks: Vec<(usize, usize)> = (0..rpad / 4)
        .map(|bk| {
            let rs = &ranges[4 * bk..(4 * bk + 4).min(rows)];
            let blo = rs.iter().map(|r| r.0).min().unwrap_or(0);
            let bhi = rs.iter().map(|r| r.1).max().unwrap_or(0);
            (blo, bhi)
        })
        .collect();

    // Scores.
    let mut s = vec![0f32; rows * w];
    if tiled {
        let mut kt = vec![[0f32; KT]; d];
        let mut j0 = lo;
        while j0 < hi {
            let jn = (hi - j0).min(KT);
            for jj in 0..KT {
                if jj < jn {
                    for (dst, &x) in kt.iter_mut().zip(key(j0 + jj)) {
                        dst[jj] = x.widen();
                    }
                } else {
                    kt.iter_mut().for_each(|dst| dst[jj] = 0.0);
                }
            }
            for (bk, &(blo, bhi)) in blocks.iter().enumerate() {
                if bhi <= j0 || blo >= j0 + jn {
                    continue;
                }
                let acc = qk_block::<FMA>(&qf[4 * bk * d..(4 * bk + 4) * d], d, &kt);
                for (r, a) in (4 * bk..(4 * bk + 4).min(rows)).zip(&acc) {
                    s[r * w + j0 - lo..][..jn].copy_from_slice(&a[..jn]);
                }
            }
            j0 += jn;
        }
    } else {
        let elem = std::mem::size_of::<T>();
        for j in lo..hi {
            let kr = key(j);
            super::prefetch::prefetch_ahead(kr.as_ptr() as *const u8, elem * p.k_at.pos, elem * d);
            for (r, &(rlo, rhi)) in ranges.iter().enumerate() {
                if rlo <= j && j < rhi {
                    s[r * w + j - lo] = dot::<T, FMA>(&qf[r * d..(r + 1) * d], kr);
                }
            }
        }
    }

    // Probabilities.
    let mut empty = vec![false; rows];
    for (r, &(rlo, rhi)) in ranges.iter().enumerate() {
        let row = &mut s[r * w..(r + 1) * w];
        row[..rlo - lo].fill(0.0);
        row[rhi - lo..].fill(0.0);
        empty[r] = !softmax_row::<T>(&mut row[rlo - lo..rhi - lo], &valid[rlo..rhi], p.scale);
    }

    // Weighted sum of the values.
    let mut out = vec![0f32; rows * d];
    if tiled {
        let nc = d.div_ceil(16);
        let mut o = vec![[0f32; 16]; rpad * nc];
        let mut vt = vec![[0f32; 16]; KT * nc];
        let mut j0 = lo;
        while j0 < hi {
            let jn = (hi - j0).min(KT);
            for (jj, dst) in vt.chunks_exact_mut(nc).enumerate() {
                dst.iter_mut().for_each(|c| *c = [0.0; 16]);
                if jj < jn {
                    for (c, src) in dst.iter_mut().zip(value(j0 + jj).chunks(16)) {
                        for (o, &x) in c.iter_mut().zip(src) {
                            *o = x.widen();
                        }
                    }
                }
            }
            for (bk, &(blo, bhi)) in blocks.iter().enumerate() {
                if bhi <= j0 || blo >= j0 + jn {
                    continue;
                }
                let mut pb = [[0f32; KT]; 4];
                for (r, pr) in (4 * bk..(4 * bk + 4).min(rows)).zip(pb.iter_mut()) {
                    pr[..jn].copy_from_slice(&s[r * w + j0 - lo..][..jn]);
                }
                let ob = &mut o[4 * bk * nc..(4 * bk + 4) * nc];
                for c in 0..nc {
                    let mut acc = [ob[c], ob[nc + c], ob[2 * nc + c], ob[3 * nc + c]];
                    for jj in 0..KT {
                        let vv = &vt[jj * nc + c];
                        for (a, pr) in acc.iter_mut().zip(&pb) {
                            let pj = pr[jj];
                            for x in 0..16 {
                                a[x] = fma::<FMA>(pj, vv[x], a[x]);
                            }
                        }
                    }
                    ob[c] = acc[0];
                    ob[nc + c] = acc[1];
                    ob[2 * nc + c] = acc[2];
                    ob[3 * nc + c] = acc[3];
                }
            }
            j0 += jn;
        }
        for (dst, src) in out.chunks_exact_mut(d).zip(o.chunks_exact(nc)) {
            for (i, x) in dst.iter_mut().enumerate() {
                *x = src[i / 16][i % 16];
            }
        }
    } else {
        let elem = std::mem::size_of::<T>();
        for j in lo..hi {
            let vr = value(j);
            super::prefetch::prefetch_ahead(vr.as_ptr() as *const u8, elem * p.v_at.pos, elem * d);
            for r in 0..rows {
                let pj = s[r * w + j - lo];
                if pj != 0.0 {
                    axpy::<T, FMA>(&mut out[r * d..(r + 1) * d], pj, vr);
                }
            }
        }
    }
    // Rows that see no key: uniform over all T keys (see `MaskRules`).
    if empty.iter().any(|&e| e) {
        let pu = T::round(1.0 / t as f32);
        for (r, dst) in out.chunks_exact_mut(d).enumerate() {
            if empty[r] {
                for j in 0..t {
                    axpy::<T, FMA>(dst, pu, value(j));
                }
            }
        }
    }
    out
}

/// The AVX-512 BF16 task for bf16 inputs: the same rows, key ranges, masking and softmax as
/// [`task`], with both products on `vdpbf16ps` (per 32-bit lane: two bf16 products, exact in f32,
/// added to an f32 accumulator; bf16 denormal inputs read as zero, denormal results flushed).
///
/// - Scores `q kᵀ` reduce over `D`: query rows are read as pairs of consecutive `D` values (their
///   natural layout) and broadcast; each tile of `KS` keys is packed as `[D/2][KS]` pairs (16×16
///   transposes of 32-bit pairs), once per task for all its rows (`rep` heads × query chunk).
/// - The softmax is [`softmax_row`] on f32 scores (probabilities rounded to bf16, as before).
/// - The output `p v` reduces over keys: each row's probabilities are read as pairs of
///   consecutive keys (from the task's first key `lo`, a bf16 row) and broadcast; each tile of
///   `KV` values is packed as `[KV/2][D]` pairs of consecutive keys, once per task.
///
/// Register tiles: blocks of 8 (4, 2, 1) rows × 32 keys for the scores and × 32 columns for the
/// output (16 zmm accumulators). Blocks skip the key tiles outside their rows' ranges.
#[cfg(target_arch = "x86_64")]
pub(crate) use bf16dot::{mask16, reduce16};

#[cfg(target_arch = "x86_64")]
mod bf16dot {
    use std::arch::x86_64::*;
    use std::mem::transmute;

    use half::bf16;

    use super::{axpy, Elem, Params, Shape};
    use crate::kernels::pack_cache::Aligned;
    use crate::kernels::transpose::transpose16;
    use crate::kernels::vexp::exp16;

    /// Keys per score tile (two zmm of scores per row).
    const KS: usize = 64;
    /// Keys per value tile (`KV / 2` pairs).
    const KV: usize = 64;
    /// Up to this many rows per task (decoding), [`direct`] reads keys and values in place.
    const DIRECT_ROWS: usize = 4;
    /// Largest head dimension [`direct`] handles (its accumulators live in registers).
    const DIRECT_MAX_D: usize = 256;
    /// From this many rows per task (with `d % 32 == 0`) [`task_amx`] runs, where AMX is usable.
    const AMX_MIN_ROWS: usize = 16;

    #[inline(always)]
    fn bh(v: __m512i) -> __m512bh {
        // SAFETY: same size, plain bits.
        unsafe { transmute(v) }
    }

    /// The lowest `n` of 16 lanes (all for `n >= 16`).
    #[inline(always)]
    pub(crate) fn mask16(n: usize) -> u16 {
        if n >= 16 {
            u16::MAX
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    #[inline(always)]
    fn mask32(n: usize) -> u32 {
        if n >= 32 {
            u32::MAX
        } else {
            (1u32 << n) - 1
        }
    }

    /// Row blocks `(first row, rows (4, 2 or 1), lowest key, end key)` covering `ranges`.
    fn row_blocks(ranges: &[(usize, usize)]) -> Vec<(usize, usize, usize, usize)> {
        let mut blocks = Vec::with_capacity(ranges.len() / 4 + 2);
        let mut r0 = 0;
        while r0 < ranges.len() {
            let left = ranges.len() - r0;
            let nr = if left >= 4 {
                4
            } else if left >= 2 {
                2
            } else {
                1
            };
            let rs = &ranges[r0..r0 + nr];
            let blo = rs.iter().map(|r| r.0).min().unwrap_or(0);
            let bhi = rs.iter().map(|r| r.1).max().unwrap_or(0);
            blocks.push((r0, nr, blo, bhi));
            r0 += nr;
        }
        blocks
    }

    /// See the module documentation. Returns what [`super::task`] returns.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    pub(super) unsafe fn task(p: &Params<bf16>, bi: usize, kvh: usize, i0: usize, cl: usize) -> Vec<f32> {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let Shape { t, d, .. } = p.shape;
            let rules = &p.rules;
            let rows = p.rep * cl;
            let valid = &rules.key_valid[bi * t..(bi + 1) * t];
            // Each row's candidate keys [lo, hi) by position; validity is applied in the softmax.
            let range = |r: usize| {
                let qa = rules.past + i0 + r % cl;
                let hi = if rules.causal { (qa + 1).min(t) } else { t };
                let lo = rules.sliding_window.map_or(0, |w| (qa + 1).saturating_sub(w)).min(hi);
                (lo, hi)
            };
            let ranges: Vec<(usize, usize)> = (0..rows).map(range).collect();
            let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
            let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
            let w = hi - lo;
            let blocks = row_blocks(&ranges);
            let key_row = |j: usize| p.k.as_ptr().add(p.k_at.at(bi, kvh, j)) as *const i16;
            let value_row = |j: usize| p.v.as_ptr().add(p.v_at.at(bi, kvh, j)) as *const i16;
            if rows <= DIRECT_ROWS && d.is_multiple_of(32) && d <= DIRECT_MAX_D {
                return direct(p, bi, kvh, i0, cl, &ranges, lo, hi, &key_row, &value_row);
            }
            if p.amx && rows >= AMX_MIN_ROWS && d.is_multiple_of(32) {
                return task_amx(p, bi, kvh, i0, cl, &ranges, lo, hi, &key_row, &value_row);
            }

            // Query rows as pairs of consecutive D values (odd D: a zero high half last).
            let dp = d.div_ceil(2);
            let mut qp = vec![0u32; rows * dp];
            for (r, dst) in qp.chunks_exact_mut(dp).enumerate() {
                let at = p.q_at.at(bi, kvh * p.rep + r / cl, i0 + r % cl);
                for (i, &x) in p.q[at..at + d].iter().enumerate() {
                    dst[i / 2] |= (x.to_bits() as u32) << (16 * (i % 2));
                }
            }

            // Scores.
            let mut s = vec![0f32; rows * w];
            let mut kp = vec![0u32; dp * KS];
            let mut j0 = lo;
            while j0 < hi {
                let jn = (hi - j0).min(KS);
                pack_keys(&key_row, j0, jn, d, &mut kp);
                for &(r0, nr, blo, bhi) in &blocks {
                    if bhi <= j0 || blo >= j0 + jn {
                        continue;
                    }
                    let (q, dst) = (qp.as_ptr().add(r0 * dp), s.as_mut_ptr().add(r0 * w + j0 - lo));
                    match nr {
                        4 => qk::<4>(q, dp, kp.as_ptr(), dst, w, jn),
                        2 => qk::<2>(q, dp, kp.as_ptr(), dst, w, jn),
                        _ => qk::<1>(q, dp, kp.as_ptr(), dst, w, jn),
                    }
                }
                j0 += jn;
            }

            // Probabilities (exactly as in `task`).
            let mut empty = vec![false; rows];
            for (r, &(rlo, rhi)) in ranges.iter().enumerate() {
                let row = &mut s[r * w..(r + 1) * w];
                row[..rlo - lo].fill(0.0);
                row[rhi - lo..].fill(0.0);
                empty[r] = !softmax_row_bf16(&mut row[rlo - lo..rhi - lo], &valid[rlo..rhi], p.scale, rlo % 16);
            }
            // As bf16 pairs of consecutive keys from `lo` (the probabilities are bf16 values already;
            // odd `w`: a zero high half last).
            let wp = w.div_ceil(2);
            let mut pp = vec![0u32; rows * wp];
            for (src, dst) in s.chunks_exact(w.max(1)).zip(pp.chunks_exact_mut(wp.max(1))) {
                let pairs = src.chunks_exact(2);
                let last = pairs.remainder().first().map(|x| x.to_bits() >> 16);
                for (x, pr) in dst.iter_mut().zip(pairs) {
                    *x = (pr[0].to_bits() >> 16) | (pr[1].to_bits() & 0xFFFF_0000);
                }
                if let Some(l) = last {
                    dst[wp - 1] = l;
                }
            }
            drop(s);

            // Weighted sum of the values: `o` rows of `ds` f32 (columns padded to 64).
            let ds = d.next_multiple_of(64);
            let mut o = vec![0f32; rows * ds];
            let mut vp = vec![0u32; KV / 2 * ds];
            let mut j0 = lo;
            while j0 < hi {
                let jn = (hi - j0).min(KV);
                let np = jn.div_ceil(2);
                pack_values(&value_row, j0, jn, d, ds, &mut vp);
                let m0 = (j0 - lo) / 2;
                for &(r0, nr, blo, bhi) in &blocks {
                    if bhi <= j0 || blo >= j0 + jn {
                        continue;
                    }
                    for c0 in (0..d).step_by(64) {
                        let pr = pp.as_ptr().add(r0 * wp + m0);
                        let (v, dst) = (vp.as_ptr().add(c0), o.as_mut_ptr().add(r0 * ds + c0));
                        match nr {
                            4 => pv::<4>(pr, wp, v, ds, np, dst),
                            2 => pv::<2>(pr, wp, v, ds, np, dst),
                            _ => pv::<1>(pr, wp, v, ds, np, dst),
                        }
                    }
                }
                j0 += jn;
            }
            let mut out = vec![0f32; rows * d];
            for (dst, src) in out.chunks_exact_mut(d).zip(o.chunks_exact(ds)) {
                dst.copy_from_slice(&src[..d]);
            }
            uniform_rows(p, bi, kvh, &empty, &mut out);
            out
        }
    }

    /// [`task`] on AMX tiles (`d % 32 == 0`, at least [`AMX_MIN_ROWS`] rows): the same steps
    /// (scores, the same softmax, probabilities rounded to bf16, weighted values) with both
    /// products as 16×16 tile products, two row tiles by two column tiles at a time
    /// ([`bf16_amx::run_2x2`]). Layouts: queries row-major `[rows32][d]` bf16; keys in blocks of
    /// [`KS`], each `[d/2 pairs][KS keys]`; scores and probabilities row-major with the key axis
    /// padded to [`KS`] (zeros past each row's keys); values `[keys/2 pairs][d]`. Rows are padded
    /// to a multiple of 32 with zeros (their results are dropped).
    ///
    /// # Safety
    /// As [`task`], and AMX BF16 usable by this process (`p.amx`).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    unsafe fn task_amx(
        p: &Params<bf16>,
        bi: usize,
        kvh: usize,
        i0: usize,
        cl: usize,
        ranges: &[(usize, usize)],
        lo: usize,
        hi: usize,
        key_row: &impl Fn(usize) -> *const i16,
        value_row: &impl Fn(usize) -> *const i16,
    ) -> Vec<f32> {
        use crate::kernels::bf16_amx;
        let Shape { t, d, .. } = p.shape;
        let rows = ranges.len();
        let rows_pad = rows.next_multiple_of(32);
        let dp = d / 2;
        let w = hi - lo;
        let wpad = w.next_multiple_of(KS);
        let wp = wpad / 2;
        let valid = &p.rules.key_valid[bi * t..(bi + 1) * t];
        // The key range of each pair of row tiles (rows past `rows` see nothing).
        let group = |g: usize| {
            let rs = &ranges[g..rows.min(g + 32)];
            (rs.iter().map(|r| r.0).min().unwrap_or(lo), rs.iter().map(|r| r.1).max().unwrap_or(lo))
        };
        let mut qp = Aligned::new(rows_pad * dp, 0u32);
        for (r, dst) in qp.chunks_exact_mut(dp).take(rows).enumerate() {
            let at = p.q_at.at(bi, kvh * p.rep + r / cl, i0 + r % cl);
            for (x, pr) in dst.iter_mut().zip(p.q[at..at + d].chunks_exact(2)) {
                *x = pr[0].to_bits() as u32 | (pr[1].to_bits() as u32) << 16;
            }
        }
        let nb = wpad / KS;
        let mut kp = Aligned::new(nb * dp * KS, 0u32);
        let mut vp = Aligned::new(wp * d, 0u32);
        for (b, (kb, vb)) in kp.chunks_exact_mut(dp * KS).zip(vp.chunks_exact_mut(KS / 2 * d)).enumerate() {
            let j0 = lo + b * KS;
            let jn = (hi - j0).min(KS);
            // SAFETY: the CPU has AVX-512 (caller's contract); rows `j0..j0 + jn` are keys and
            // values of this head; `kb` holds `dp * KS` pairs, `vb` `KS / 2 * d`.
            unsafe {
                pack_keys(key_row, j0, jn, d, kb);
                pack_values(value_row, j0, jn, d, d, vb);
            }
        }
        // One group of 32 rows at a time: its scores, their softmax and the weighted values,
        // while the group's scores (32 x `wpad` f32) and probabilities are still in L1/L2.
        let mut s = Aligned::new(32 * wpad, 0f32);
        let mut pp = Aligned::new(32 * wp, 0u32);
        let mut o = vec![0f32; rows_pad * d];
        let mut empty = vec![false; rows];
        let (sp, op) = (s.as_mut_ptr(), o.as_mut_ptr());
        // SAFETY: AMX usable (caller's contract); released below.
        unsafe { bf16_amx::configure() };
        for g in (0..rows_pad).step_by(32) {
            let (glo, ghi) = group(g);
            if ghi <= glo {
                // No row of the group sees a key (uniform rows below).
                empty[g.min(rows)..rows.min(g + 32)].fill(true);
                continue;
            }
            let (qa, qb) = (qp[g * dp..].as_ptr(), qp[(g + 16) * dp..].as_ptr());
            for b in (glo - lo) / KS..(ghi - lo).div_ceil(KS) {
                for kt in (0..KS).step_by(32) {
                    let kb = kp[b * dp * KS + kt..].as_ptr();
                    let c = |rr: usize, kk: usize| sp.wrapping_add(16 * rr * wpad + b * KS + kt + 16 * kk);
                    // SAFETY: query tiles: rows g..g + 32 of `qp`, `d` values each (dp / 16 steps
                    // of 64 bytes); key tiles: 16 pair rows of 256 bytes per step within block `b`;
                    // score tiles: the group's 32 rows, columns of block `b` of `s`.
                    unsafe {
                        bf16_amx::run_2x2::<0>(
                            [qa.cast(), qb.cast()],
                            dp * 4,
                            [kb.cast(), kb.wrapping_add(16).cast()],
                            KS * 4,
                            16 * KS * 4,
                            [c(0, 0), c(0, 1), c(1, 0), c(1, 1)],
                            wpad * 4,
                            dp / 16,
                            true,
                        )
                    };
                }
            }
            // Probabilities (exactly as in `task`), then as bf16 pairs of consecutive keys. Blocks
            // outside a row's keys hold another group's scores: zeroed here.
            for (r, &(rlo, rhi)) in ranges.iter().enumerate().take(rows.min(g + 32)).skip(g) {
                let row = &mut s[(r - g) * wpad..(r - g + 1) * wpad];
                row[..rlo - lo].fill(0.0);
                row[rhi - lo..].fill(0.0);
                // SAFETY: the CPU has AVX-512 (caller's contract).
                empty[r] =
                    !unsafe { softmax_row_bf16(&mut row[rlo - lo..rhi - lo], &valid[rlo..rhi], p.scale, rlo % 16) };
                for (x, pr) in pp[(r - g) * wp..(r - g + 1) * wp].iter_mut().zip(row.chunks_exact(2)) {
                    *x = (pr[0].to_bits() >> 16) | (pr[1].to_bits() & 0xFFFF_0000);
                }
            }
            // Steps of 32 keys (16 pairs) covering the group's keys. Rows past `rows` read stale
            // probabilities; their results are dropped.
            let (s0, s1) = ((glo - lo) / 32, (ghi - lo).div_ceil(32));
            let (pa, pb) = (pp[s0 * 16..].as_ptr(), pp[16 * wp + s0 * 16..].as_ptr());
            for c0 in (0..d).step_by(32) {
                let vb = vp[s0 * 16 * d + c0..].as_ptr();
                let c = |rr: usize, cc: usize| op.wrapping_add((g + 16 * rr) * d + c0 + 16 * cc);
                // SAFETY: probability tiles: the group's 32 rows of `pp`, pairs s0 * 16..s1 * 16
                // <= wp; value tiles: pair rows s0 * 16..s1 * 16 <= wp of `vp`, columns c0..c0 + 32
                // <= d; output tiles: rows g..g + 32, columns c0..c0 + 32 of `o`.
                unsafe {
                    bf16_amx::run_2x2::<0>(
                        [pa.cast(), pb.cast()],
                        wp * 4,
                        [vb.cast(), vb.wrapping_add(16).cast()],
                        d * 4,
                        16 * d * 4,
                        [c(0, 0), c(0, 1), c(1, 0), c(1, 1)],
                        d * 4,
                        s1 - s0,
                        true,
                    )
                };
            }
        }
        // SAFETY: AMX usable; no tile is used after this.
        unsafe { bf16_amx::release() };
        o.truncate(rows * d);
        uniform_rows(p, bi, kvh, &empty, &mut o);
        o
    }

    /// Rows that see no key: uniform over all T keys (see `MaskRules`), as in `task`.
    fn uniform_rows(p: &Params<bf16>, bi: usize, kvh: usize, empty: &[bool], out: &mut [f32]) {
        let Shape { t, d, .. } = p.shape;
        if empty.iter().any(|&e| e) {
            let pu = bf16::round(1.0 / t as f32);
            for (r, dst) in out.chunks_exact_mut(d).enumerate() {
                if empty[r] {
                    for j in 0..t {
                        let at = p.v_at.at(bi, kvh, j);
                        axpy::<bf16, true>(dst, pu, &p.v[at..at + d]);
                    }
                }
            }
        }
    }

    /// The sums of each of 16 vectors, as one vector (`out[i] = Σ_lanes v[i]`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn reduce16(v: [__m512; 16]) -> __m512 {
        // Pairs (2i, 2i + 1): within each 128-bit lane, [a0 + a2, b0 + b2, a1 + a3, b1 + b3].
        let mut r = [_mm512_setzero_ps(); 8];
        for (i, x) in r.iter_mut().enumerate() {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            *x = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
        // Quads: each 128-bit lane holds its part of the sums of 4 vectors, in order.
        let mut q = [_mm512_setzero_ps(); 4];
        for (i, x) in q.iter_mut().enumerate() {
            let (a, b) = (r[2 * i], r[2 * i + 1]);
            *x = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b));
        }
        // Across the four 128-bit lanes.
        let u0 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(q[0], q[1]), _mm512_shuffle_f32x4::<0xEE>(q[0], q[1]));
        let u1 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(q[2], q[3]), _mm512_shuffle_f32x4::<0xEE>(q[2], q[3]));
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(u0, u1), _mm512_shuffle_f32x4::<0xDD>(u0, u1))
    }

    /// [`super::softmax_row`] for bf16 on 16 lanes (masked tails, no scalar loop): scores
    /// scaled, invisible keys excluded, `exp(x - max)`, then multiplied by `1 / sum` (as
    /// PyTorch's CPU softmax does) and rounded to bf16. `phase`: the key index of `row[0]`
    /// modulo 16 (the sum's lanes follow the key index). Returns false, leaving zeros, when no
    /// entry is visible.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn softmax_row_bf16(row: &mut [f32], valid: &[u32], scale: f32, phase: usize) -> bool {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            debug_assert!(row.len() == valid.len() && phase < 16);
            let n = row.len();
            let (rp, vp) = (row.as_mut_ptr(), valid.as_ptr());
            let vs = _mm512_set1_ps(scale);
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut m = ninf;
            let mut i = 0;
            while i < n {
                let k = mask16(n - i);
                let ok = _mm512_mask_cmpneq_epi32_mask(
                    k,
                    _mm512_maskz_loadu_epi32(k, vp.add(i) as *const i32),
                    _mm512_setzero_si512(),
                );
                let x = _mm512_mask_blend_ps(ok, ninf, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, rp.add(i)), vs));
                _mm512_mask_storeu_ps(rp.add(i), k, x);
                m = _mm512_max_ps(m, x);
                i += 16;
            }
            let max = _mm512_reduce_max_ps(m);
            if max == f32::NEG_INFINITY {
                row.fill(0.0);
                return false;
            }
            let vmax = _mm512_set1_ps(max);
            // The sum in PyTorch's order (`vec::reduce_all` over the whole row of keys, where the
            // invisible ones add exact zeros): key j in lane j % 16, so the first chunk starts at
            // lane `phase`.
            let mut acc = _mm512_setzero_ps();
            let first = (16 - phase).min(n);
            let mut i = 0;
            while i < n {
                let (k, at, len) = if i == 0 {
                    (mask16(first) << phase, rp.wrapping_sub(phase), first)
                } else {
                    (mask16(n - i), rp.add(i), (n - i).min(16))
                };
                // SAFETY (pointer): masked-off lanes, including those before the row, are never
                // accessed.
                let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, at), vmax));
                let e = _mm512_maskz_mov_ps(k, e);
                _mm512_mask_storeu_ps(at, k, e);
                acc = _mm512_add_ps(acc, e);
                i += len;
            }
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(acc));
            // Round to nearest even on the upper 16 bits (finite, non-negative values).
            let (half, one) = (_mm512_set1_epi32(0x7FFF), _mm512_set1_epi32(1));
            let keep = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
            let mut i = 0;
            while i < n {
                let k = mask16(n - i);
                let bits = _mm512_castps_si512(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, rp.add(i)), inv));
                let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), one);
                let r = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(half, lsb)), keep);
                _mm512_mask_storeu_ps(rp.add(i), k, _mm512_castsi512_ps(r));
                i += 16;
            }
            true
        }
    }

    /// Few query rows (decoding): keys and values are read in place, once per row, with no
    /// packing (which for one row costs more than the products). Scores: 16 keys at a time,
    /// `vdpbf16ps` over `d / 32` chunks per key, the 16 partial vectors reduced together; the
    /// softmax as in [`task`]; output: each value row widened to f32 (exact) and accumulated with
    /// an FMA by its bf16-rounded probability. Same results as [`task`] up to f32 summation order.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    unsafe fn direct(
        p: &Params<bf16>,
        bi: usize,
        kvh: usize,
        i0: usize,
        cl: usize,
        ranges: &[(usize, usize)],
        lo: usize,
        hi: usize,
        key_row: &impl Fn(usize) -> *const i16,
        value_row: &impl Fn(usize) -> *const i16,
    ) -> Vec<f32> {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let Shape { t, d, .. } = p.shape;
            let (rows, w, nc, nf) = (ranges.len(), hi - lo, d / 32, d / 16);
            let valid = &p.rules.key_valid[bi * t..(bi + 1) * t];
            let mut s = vec![0f32; rows * w];
            for (r, &(rlo, rhi)) in ranges.iter().enumerate() {
                let qp = p.q.as_ptr().add(p.q_at.at(bi, kvh * p.rep + r / cl, i0 + r % cl)) as *const i16;
                let mut qv = [bh(_mm512_setzero_si512()); DIRECT_MAX_D / 32];
                for (c, x) in qv.iter_mut().enumerate().take(nc) {
                    *x = bh(_mm512_loadu_si512(qp.add(32 * c) as *const _));
                }
                let mut j0 = rlo;
                while j0 < rhi {
                    let jn = (rhi - j0).min(16);
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for (kk, a) in acc.iter_mut().enumerate().take(jn) {
                        let kr = key_row(j0 + kk);
                        for (c, &qc) in qv.iter().enumerate().take(nc) {
                            *a = _mm512_dpbf16_ps(*a, qc, bh(_mm512_loadu_si512(kr.add(32 * c) as *const _)));
                        }
                    }
                    _mm512_mask_storeu_ps(s.as_mut_ptr().add(r * w + j0 - lo), mask16(jn), reduce16(acc));
                    j0 += jn;
                }
            }
            let mut empty = vec![false; rows];
            for (r, &(rlo, rhi)) in ranges.iter().enumerate() {
                let row = &mut s[r * w..(r + 1) * w];
                empty[r] = !softmax_row_bf16(&mut row[rlo - lo..rhi - lo], &valid[rlo..rhi], p.scale, rlo % 16);
            }
            let mut out = vec![0f32; rows * d];
            for (r, &(rlo, rhi)) in ranges.iter().enumerate() {
                let pr = &s[r * w..(r + 1) * w];
                let mut acc = [_mm512_setzero_ps(); DIRECT_MAX_D / 16];
                for j in rlo..rhi {
                    let pj = _mm512_set1_ps(pr[j - lo]);
                    let vr = value_row(j);
                    for (f, a) in acc.iter_mut().enumerate().take(nf) {
                        let x = _mm512_cvtpbh_ps(transmute::<__m256i, __m256bh>(_mm256_loadu_si256(
                            vr.add(16 * f) as *const _
                        )));
                        *a = _mm512_fmadd_ps(pj, x, *a);
                    }
                }
                for (f, a) in acc.iter().enumerate().take(nf) {
                    _mm512_storeu_ps(out.as_mut_ptr().add(r * d + 16 * f), *a);
                }
            }
            uniform_rows(p, bi, kvh, &empty, &mut out);
            out
        }
    }

    /// Packs keys `j0..j0 + jn` (`jn <= KS`) as `kp[i * KS + jj] = k[j0 + jj, 2i] | k[j0 + jj,
    /// 2i + 1] << 16` for `i < ceil(d / 2)`; missing keys and the odd-`d` last high half are zeros.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pack_keys(key_row: &impl Fn(usize) -> *const i16, j0: usize, jn: usize, d: usize, kp: &mut [u32]) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let dp = d.div_ceil(2);
            debug_assert!(jn <= KS && kp.len() >= dp * KS);
            let dst = kp.as_mut_ptr();
            for g0 in (0..KS).step_by(16) {
                let mut i0 = 0;
                while i0 < dp {
                    let load_mask = mask32(d - 2 * i0);
                    let mut v = [_mm512_setzero_si512(); 16];
                    for (r, x) in v.iter_mut().enumerate() {
                        if g0 + r < jn {
                            *x = _mm512_maskz_loadu_epi16(load_mask, key_row(j0 + g0 + r).add(2 * i0));
                        }
                    }
                    let tr = transpose16(v);
                    for (ii, x) in tr.iter().enumerate().take(16.min(dp - i0)) {
                        _mm512_storeu_si512(dst.add((i0 + ii) * KS + g0) as *mut _, *x);
                    }
                    i0 += 16;
                }
            }
        }
    }

    /// Packs values `j0..j0 + jn` (`jn <= KV`) as `vp[m * ds + c] = v[j0 + 2m, c] | v[j0 + 2m + 1,
    /// c] << 16` for `m < ceil(jn / 2)`, `c < ds` (`ds` a multiple of 32); missing keys and
    /// columns are zeros.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pack_values(
        value_row: &impl Fn(usize) -> *const i16,
        j0: usize,
        jn: usize,
        d: usize,
        ds: usize,
        vp: &mut [u32],
    ) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            debug_assert!(jn <= KV && ds.is_multiple_of(32) && ds >= d && vp.len() >= jn.div_ceil(2) * ds);
            // Lane 2c takes element c of the first row, lane 2c + 1 element c of the second.
            let idx_lo = _mm512_set_epi16(
                47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2,
                33, 1, 32, 0,
            );
            let idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
            let dst = vp.as_mut_ptr();
            for m in 0..jn.div_ceil(2) {
                let (ja, jb) = (2 * m, 2 * m + 1);
                for c0 in (0..ds).step_by(32) {
                    let load_mask = if c0 < d { mask32(d - c0) } else { 0 };
                    let a = _mm512_maskz_loadu_epi16(load_mask, value_row(j0 + ja).add(c0));
                    let b = if jb < jn {
                        _mm512_maskz_loadu_epi16(load_mask, value_row(j0 + jb).add(c0))
                    } else {
                        _mm512_setzero_si512()
                    };
                    let at = dst.add(m * ds + c0);
                    _mm512_storeu_si512(at as *mut _, _mm512_permutex2var_epi16(a, idx_lo, b));
                    _mm512_storeu_si512(at.add(16) as *mut _, _mm512_permutex2var_epi16(a, idx_hi, b));
                }
            }
        }
    }

    /// Scores of `R` rows (`q`: `R` rows of `dp` pairs) against a packed key tile (`kp`: `dp`
    /// pairs × `KS` keys, four vectors of 16): writes the first `jn` of each row at `s + r * w`.
    /// Each broadcast query pair feeds four `vdpbf16ps`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn qk<const R: usize>(q: *const u32, dp: usize, kp: *const u32, s: *mut f32, w: usize, jn: usize) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let mut a = [[_mm512_setzero_ps(); 4]; R];
            for i in 0..dp {
                let k: [__m512bh; 4] =
                    std::array::from_fn(|v| bh(_mm512_loadu_si512(kp.add(i * KS + 16 * v) as *const _)));
                for (r, ar) in a.iter_mut().enumerate() {
                    let qv = bh(_mm512_set1_epi32(*q.add(r * dp + i) as i32));
                    for v in 0..4 {
                        ar[v] = _mm512_dpbf16_ps(ar[v], qv, k[v]);
                    }
                }
            }
            for (r, ar) in a.iter().enumerate() {
                for (v, x) in ar.iter().enumerate() {
                    // `wrapping_add`: with `jn <= 16 * v` this quarter may lie past the end of the
                    // scores; a masked-off lane never faults.
                    _mm512_mask_storeu_ps(s.wrapping_add(r * w + 16 * v), mask16(jn.saturating_sub(16 * v)), *x);
                }
            }
        }
    }

    /// `o[r, 0..64] += Σ_m pp[r, m] · vp[m, 0..64]` for `R` rows, `m < np` (`pp`: row stride `wp`
    /// pairs; `vp`, `o`: row stride `ds`). Each broadcast probability pair feeds four `vdpbf16ps`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pv<const R: usize>(pp: *const u32, wp: usize, vp: *const u32, ds: usize, np: usize, o: *mut f32) {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe {
            let mut a: [[__m512; 4]; R] =
                std::array::from_fn(|r| std::array::from_fn(|v| _mm512_loadu_ps(o.add(r * ds + 16 * v))));
            for m in 0..np {
                let x: [__m512bh; 4] =
                    std::array::from_fn(|v| bh(_mm512_loadu_si512(vp.add(m * ds + 16 * v) as *const _)));
                for (r, ar) in a.iter_mut().enumerate() {
                    let pv = bh(_mm512_set1_epi32(*pp.add(r * wp + m) as i32));
                    for v in 0..4 {
                        ar[v] = _mm512_dpbf16_ps(ar[v], pv, x[v]);
                    }
                }
            }
            for (r, ar) in a.iter().enumerate() {
                for (v, x) in ar.iter().enumerate() {
                    _mm512_storeu_ps(o.add(r * ds + 16 * v), *x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::{self, KernelSet};
    use candle_core::Device;

    /// `x` `[B, H, T, D]` as the first `T` positions of a buffer with spare capacity: a strided
    /// view, as the KV cache hands keys and values over.
    fn strided_view(x: &Tensor) -> Tensor {
        let (b, h, t, d) = x.dims4().unwrap();
        let buf = Tensor::zeros((b, h, t + 256, d), x.dtype(), x.device()).unwrap();
        buf.slice_set(x, 2, 0).unwrap();
        let view = buf.narrow(2, 0, t).unwrap();
        assert!(b * h == 1 || !view.is_contiguous());
        view
    }

    /// The previous candle path: `repeat_kv`, an additive f32 mask `[B, 1, L, T]` built with
    /// `f32::MIN`, f32 scores and softmax, probabilities cast to the input dtype, matmul with V.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, rules: &MaskRules) -> Tensor {
        let (b, h, l, d) = q.dims4().unwrap();
        let (_, hkv, t, _) = k.dims4().unwrap();
        let rep = h / hkv;
        let rep_kv = |x: &Tensor| {
            x.unsqueeze(2).unwrap().broadcast_as((b, hkv, rep, t, d)).unwrap().reshape((b, h, t, d)).unwrap()
        };
        let mut mask = vec![0f32; b * l * t];
        for bi in 0..b {
            for qi in 0..l {
                let qa = rules.past + qi;
                for j in 0..t {
                    let visible = (!rules.causal || j <= qa)
                        && rules.key_valid[bi * t + j] != 0
                        && rules.sliding_window.is_none_or(|w| qa < j + w);
                    if !visible {
                        mask[(bi * l + qi) * t + j] = f32::MIN;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, l, t), &Device::Cpu).unwrap();
        // f32 scores (the kernel does not round the dot products to the input dtype).
        let qf = q.to_dtype(DType::F32).unwrap();
        let kf = rep_kv(k).to_dtype(DType::F32).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (qf.matmul(&kf.t().unwrap()).unwrap() * scale).unwrap().broadcast_add(&mask).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap().to_dtype(q.dtype()).unwrap();
        let vf = rep_kv(v).to_dtype(DType::F32).unwrap();
        let out = probs.to_dtype(DType::F32).unwrap().matmul(&vf).unwrap();
        out.transpose(1, 2).unwrap().reshape((b, l, h * d)).unwrap()
    }

    struct Case {
        b: usize,
        h: usize,
        hkv: usize,
        l: usize,
        t: usize,
        d: usize,
        /// Left padding per row (positions `0..pad` are masked).
        pad: Vec<usize>,
        window: Option<usize>,
    }

    fn check(case: &Case, dtype: DType, tol: f32, strided: bool) {
        check_with(case, dtype, tol, strided, KernelSet::Avx512)
    }

    /// One case on the kernel set `set` (capped at what the CPU has) against the reference.
    fn check_with(case: &Case, dtype: DType, tol: f32, strided: bool, set: KernelSet) {
        let _forced = cpu::force(set);
        let Case { b, h, hkv, l, t, d, .. } = *case;
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap().to_dtype(dtype).unwrap();
        let kv = |seed: f32| {
            (Tensor::randn(0f32, 1.0, (b, hkv, t, d), &dev).unwrap() * seed as f64).unwrap().to_dtype(dtype).unwrap()
        };
        let (k, v) = (kv(1.5), kv(1.0));
        let (k, v) = if strided {
            // Strided views of larger buffers, as the KV cache hands them over.
            (strided_view(&k), strided_view(&v))
        } else {
            (k, v)
        };
        let mut key_valid = vec![1u32; b * t];
        for (bi, &p) in case.pad.iter().enumerate() {
            key_valid[bi * t..bi * t + p].fill(0);
        }
        let rules = MaskRules { key_valid: &key_valid, past: t - l, causal: true, sliding_window: case.window };
        let scale = 1.0 / (d as f32).sqrt();
        let got = attention(&q, &k, &v, scale, &rules).unwrap();
        assert_eq!(got.dims(), &[b, l, h * d]);
        assert_eq!(got.dtype(), dtype);
        let want = reference(&q, &k, &v, &rules);
        let got = got.to_dtype(DType::F32).unwrap();
        let diff = (&got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        let nan = got.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().any(|x| !x.is_finite());
        assert!(!nan, "non-finite output");
        assert!(diff <= tol, "{dtype:?} b={b} h={h}/{hkv} l={l} t={t} d={d}: max abs diff {diff} > {tol}");
    }

    fn cases() -> Vec<Case> {
        vec![
            // Prefill with left padding (padding query rows see nothing), GQA, d = 64.
            Case { b: 2, h: 4, hkv: 2, l: 37, t: 37, d: 64, pad: vec![0, 5], window: None },
            // Single-token decode after a cache, padded row.
            Case { b: 2, h: 4, hkv: 4, l: 1, t: 53, d: 32, pad: vec![3, 0], window: None },
            // Decode with GQA (rows per task = rep) and d not a multiple of 16.
            Case { b: 1, h: 8, hkv: 2, l: 1, t: 70, d: 40, pad: vec![0], window: None },
            // Chunked prefill continuation (l > 1 with past), several tasks per head.
            Case { b: 2, h: 2, hkv: 1, l: 150, t: 211, d: 24, pad: vec![7, 0], window: None },
            // Sliding window smaller than t, prefill and continuation.
            Case { b: 2, h: 4, hkv: 2, l: 90, t: 90, d: 16, pad: vec![0, 11], window: Some(13) },
            Case { b: 1, h: 4, hkv: 2, l: 5, t: 60, d: 20, pad: vec![2], window: Some(9) },
            Case { b: 1, h: 2, hkv: 2, l: 1, t: 40, d: 8, pad: vec![0], window: Some(6) },
            // Few rows per task (direct path) with l > 1.
            Case { b: 1, h: 1, hkv: 1, l: 3, t: 9, d: 7, pad: vec![1], window: None },
        ]
    }

    #[test]
    fn f32_matches_the_materialised_mask_path() {
        for case in cases() {
            check(&case, DType::F32, 1e-5, false);
            check(&case, DType::F32, 1e-5, true);
        }
    }

    #[test]
    fn bf16_and_f16_match_the_materialised_mask_path() {
        for case in cases() {
            check(&case, DType::BF16, 2e-2, true);
            check(&case, DType::F16, 4e-3, false);
        }
    }

    /// Every kernel set this CPU has, each forced in turn (the AVX-512 BF16 one also below).
    #[test]
    fn every_kernel_set_matches_too() {
        for set in cpu::available_sets() {
            for case in cases() {
                check_with(&case, DType::F32, 1e-5, true, set);
                check_with(&case, DType::BF16, 2e-2, set == KernelSet::Avx2, set);
                check_with(&case, DType::F16, 4e-3, false, set);
            }
        }
    }

    /// bf16 cases for the AVX-512 BF16 path against the f32-widening path.
    fn bf16dot_cases() -> Vec<Case> {
        let mut cases = cases();
        cases.extend([
            // Prefill, left padding (one row all padding), GQA 8/2, d = 128, odd key count.
            Case { b: 2, h: 8, hkv: 2, l: 37, t: 37, d: 128, pad: vec![0, 37], window: None },
            // Longer prefill, several tasks per head, d = 80 (not a multiple of 32), padding.
            Case { b: 2, h: 4, hkv: 2, l: 150, t: 150, d: 80, pad: vec![9, 0], window: None },
            // Decode l = 1 after a cache, GQA 8/2, d = 128 and 64, odd t.
            Case { b: 2, h: 8, hkv: 2, l: 1, t: 37, d: 128, pad: vec![4, 0], window: None },
            Case { b: 1, h: 4, hkv: 4, l: 1, t: 301, d: 64, pad: vec![0], window: None },
            // Decode as Video-LLaVA-7B does (MHA, d = 128) and GQA 2 rows per task, padding,
            // key counts not a multiple of 16; a sliding window cutting the decode row's range.
            Case { b: 2, h: 4, hkv: 4, l: 1, t: 517, d: 128, pad: vec![0, 13], window: None },
            Case { b: 1, h: 8, hkv: 4, l: 1, t: 250, d: 128, pad: vec![7], window: None },
            Case { b: 1, h: 4, hkv: 2, l: 2, t: 90, d: 256, pad: vec![0], window: Some(41) },
            // l > 1 with past (chunked prefill), d = 128 and 80.
            Case { b: 1, h: 8, hkv: 2, l: 29, t: 97, d: 128, pad: vec![3], window: None },
            Case { b: 2, h: 2, hkv: 1, l: 70, t: 133, d: 80, pad: vec![0, 21], window: None },
            // Sliding window, prefill and continuation, d = 64 / 128.
            Case { b: 1, h: 8, hkv: 2, l: 100, t: 100, d: 64, pad: vec![5], window: Some(17) },
            Case { b: 2, h: 4, hkv: 1, l: 7, t: 77, d: 128, pad: vec![0, 2], window: Some(30) },
            // Odd head dimension.
            Case { b: 1, h: 2, hkv: 1, l: 21, t: 37, d: 33, pad: vec![1], window: None },
            // The AMX tasks (16 rows or more, d % 32 == 0): CLIP's frames (257 tokens, d = 64,
            // row counts not a multiple of 16) and a long prefill chunk after a cache, d = 128.
            Case { b: 2, h: 2, hkv: 2, l: 257, t: 257, d: 64, pad: vec![0, 0], window: None },
            Case { b: 1, h: 2, hkv: 2, l: 200, t: 300, d: 128, pad: vec![3], window: None },
            Case { b: 1, h: 4, hkv: 2, l: 90, t: 90, d: 96, pad: vec![0], window: Some(70) },
        ]);
        cases
    }

    /// bf16 ulp of `x` (spacing of the bf16 values at `|x|`; the smallest normal's below).
    fn bf16_ulp(x: f32) -> f32 {
        let e = (x.abs().max(f32::MIN_POSITIVE).to_bits() >> 23) as i32 - 127;
        2f32.powi(e - 7)
    }

    /// The AVX-512 BF16 kernels against the f32-widening ones on the same bf16 inputs. The
    /// products are exact in f32 on both paths, so the f32 scores and output sums differ only
    /// by summation order (relative ~1e-6); what remains visible is the bf16 rounding:
    /// - a probability `p_j` near a rounding boundary may round the other way, by one bf16 ulp
    ///   (at most `2^-7 p_j`), which moves output column `c` by at most `2^-7 Σ_j p_j |v_jc|`;
    ///   that sum is computed by the same (f32-widening) kernel run on `|v|`;
    /// - each output is rounded to bf16 (half an ulp each side: together at most 1 ulp).
    ///
    /// Bound per element: `1 ulp(max(|x|, |y|)) + 2^-7 (1 + 2^-7) Σ_j p_j |v_jc| + 1e-6` (the
    /// last term for f32 summation order and values that cancel to ~0). Flips are rare, so in
    /// addition at least 99% of the elements must agree within 1 bf16 ulp.
    #[test]
    fn bf16dot_kernels_match_the_f32_widening_ones() {
        if !bf16dot_available() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return;
        }
        let dev = Device::Cpu;
        let mut worst = 0f32;
        let (mut over1, mut total) = (0usize, 0usize);
        for (ci, case) in bf16dot_cases().iter().enumerate() {
            let Case { b, h, hkv, l, t, d, .. } = *case;
            let q = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let kv = |s: f64| {
                (Tensor::randn(0f32, 1.0, (b, hkv, t, d), &dev).unwrap() * s).unwrap().to_dtype(DType::BF16).unwrap()
            };
            let (k, v) = (kv(1.5), kv(1.0));
            // Strided views (as the KV cache hands them over) for every other case.
            let (k, v) = if ci % 2 == 0 { (strided_view(&k), strided_view(&v)) } else { (k, v) };
            let mut key_valid = vec![1u32; b * t];
            for (bi, &p) in case.pad.iter().enumerate() {
                key_valid[bi * t..bi * t + p].fill(0);
            }
            let rules = MaskRules { key_valid: &key_valid, past: t - l, causal: true, sliding_window: case.window };
            let scale = 1.0 / (d as f32).sqrt();
            let run = |v: &Tensor, set| {
                let _forced = cpu::force(set);
                let out = attention(&q, &k, v, scale, &rules).unwrap();
                assert_eq!((out.dims(), out.dtype()), (&[b, l, h * d][..], DType::BF16));
                out.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let wide = run(&v, KernelSet::Avx2);
            let weight = run(&v.abs().unwrap(), KernelSet::Avx2);
            // The AVX-512 BF16 kernels, and the AMX ones where this CPU has them.
            let fast_sets = cpu::available_sets().into_iter().filter(|&s| s >= KernelSet::Avx512);
            let fast: Vec<f32> = fast_sets.flat_map(|set| run(&v, set)).collect();
            for ((&x, &y), &m) in fast.iter().zip(wide.iter().cycle()).zip(weight.iter().cycle()) {
                assert!(x.is_finite(), "non-finite output");
                let ulp = bf16_ulp(x.abs().max(y.abs()));
                let diff = (x - y).abs();
                let bound = ulp + m * (1.0 + 1.0 / 128.0) / 128.0 + 1e-6;
                assert!(diff <= bound, "b={b} h={h}/{hkv} l={l} t={t} d={d}: {x} vs {y} (bound {bound})");
                let ulps = (diff - 1e-6).max(0.0) / ulp;
                worst = worst.max(ulps);
                over1 += (ulps > 1.0) as usize;
                total += 1;
            }
        }
        assert!(over1 * 100 <= total, "{over1} of {total} outputs differ by more than 1 bf16 ulp");
        eprintln!("bf16dot vs f32 widening: worst {worst} bf16 ulp, {over1} of {total} above 1 ulp");
    }

    #[test]
    fn bf16dot_kernels_match_the_materialised_mask_path() {
        for case in bf16dot_cases() {
            check_with(&case, DType::BF16, 2e-2, true, KernelSet::Avx512);
            check_with(&case, DType::BF16, 2e-2, false, KernelSet::Amx);
        }
    }

    #[test]
    fn rows_with_no_visible_key_average_all_values() {
        // Row 1 is all padding: its queries see nothing; the previous path gave 1/T weights.
        let case = Case { b: 2, h: 2, hkv: 1, l: 20, t: 20, d: 16, pad: vec![0, 20], window: None };
        check(&case, DType::F32, 1e-5, false);
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 0.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want.max(f32::MIN_POSITIVE)).abs());
            x += 0.0137;
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    /// Decode attention at Video-LLaVA-7B's shapes (32 heads of 128, 2,074 cached positions,
    /// BF16): time per call and the KV bytes read per second. `cargo test --release -p
    /// videollava --lib attention::tests::bench_decode -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_decode() {
        let dev = Device::Cpu;
        let (h, t, d) = (32, 2074, 128);
        let kv = |s: f64| {
            (Tensor::randn(0f32, 1.0, (1, h, t, d), &dev).unwrap() * s).unwrap().to_dtype(DType::BF16).unwrap()
        };
        let (k, v) = (strided_view(&kv(1.0)), strided_view(&kv(1.0)));
        let q = Tensor::randn(0f32, 1.0, (1, h, 1, d), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let valid = vec![1u32; t];
        let rules = MaskRules { key_valid: &valid, past: t - 1, causal: true, sliding_window: None };
        let mut times = Vec::new();
        for _ in 0..300 {
            let t0 = std::time::Instant::now();
            let out = attention(&q, &k, &v, 0.088, &rules).unwrap();
            std::hint::black_box(out);
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = times[times.len() / 2];
        let bytes = (2 * h * t * d * 2) as f64;
        eprintln!("decode attention: median {:.3} ms, {:.1} GB/s of keys and values", med * 1e3, bytes / med / 1e9);
    }

    #[test]
    fn vector_exp_and_softmax_match_the_scalar_ones() {
        if !bf16dot_available() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return;
        }
        use std::arch::x86_64::*;
        // exp: the same bits as the scalar version, over [-120, 100] and at the edges.
        let mut xs: Vec<f32> = (0..2_200_000).map(|i| -120.0 + i as f32 * 1e-4).collect();
        xs.extend([f32::NEG_INFINITY, f32::INFINITY, 0.0, -0.0, 88.722_83, -103.97, 1e-30, -1e-30]);
        for c in xs.chunks(16) {
            let mut buf = [0f32; 16];
            buf[..c.len()].copy_from_slice(c);
            let mut out = [0f32; 16];
            // SAFETY: AVX-512 BF16 (and so F) detected above.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), crate::kernels::vexp::exp16(_mm512_loadu_ps(buf.as_ptr()))) };
            for (x, y) in buf.iter().zip(out) {
                assert_eq!(y.to_bits(), exp(*x).to_bits(), "exp({x})");
            }
        }
        // softmax: within one bf16 step of the scalar row (sum order, and x * (1 / sum) against
        // x / sum), masks and tails of every length.
        let mut state = 7u64;
        for n in [1usize, 2, 15, 16, 17, 31, 33, 100, 517, 2074] {
            let row: Vec<f32> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 40.0 - 20.0
                })
                .collect();
            let valid: Vec<u32> = (0..n).map(|i| u32::from(i % 7 != 3)).collect();
            let (mut a, mut b) = (row.clone(), row.clone());
            let sa = softmax_row::<half::bf16>(&mut a, &valid, 0.3);
            // SAFETY: as above.
            let sb = unsafe { bf16dot::softmax_row_bf16(&mut b, &valid, 0.3, n % 16) };
            assert_eq!(sa, sb);
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(y.to_bits() & 0xFFFF, 0, "bf16 values");
                assert!((x - y).abs() <= bf16_ulp(x.max(*y)), "n {n}, entry {i}: {x} vs {y}");
            }
        }
        let (mut none, valid) = (vec![1.0f32; 20], vec![0u32; 20]);
        // SAFETY: as above.
        assert!(!unsafe { bf16dot::softmax_row_bf16(&mut none, &valid, 1.0, 3) });
        assert!(none.iter().all(|&x| x == 0.0));
    }

    /// One layer's prefill attention at the 7B shapes (32 heads, a 2,074-token prompt, causal):
    /// GFLOP/s of the causal products (2 * 2 * L^2 / 2 * D per head). `cargo test --release -p
    /// videollava --lib attention::tests::bench_prefill -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_prefill() {
        let dev = Device::Cpu;
        // Llama-7B's prefill of a video prompt (causal, one batch row), then CLIP-L's 8 frames
        // (full attention over 257 tokens, 16 heads of 64).
        for (b, h, t, d, causal) in [(1, 32, 2074, 128, true), (8, 16, 257, 64, false)] {
            let x = || Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let (q, k, v) = (x(), x(), x());
            let valid = vec![1u32; b * t];
            let rules = MaskRules { key_valid: &valid, past: 0, causal, sliding_window: None };
            let pairs = if causal { (t * t) as f64 / 2.0 } else { (t * t) as f64 };
            let flop = 2.0 * 2.0 * pairs * d as f64 * (b * h) as f64;
            let only = std::env::var("BENCH_SET").ok();
            for set in cpu::available_sets().into_iter().filter(|&s| s >= KernelSet::Avx2) {
                if only.as_deref().is_some_and(|o| o != set.name()) {
                    continue;
                }
                let _g = cpu::force(set);
                let mut best = f64::MAX;
                for _ in 0..3 {
                    let t0 = std::time::Instant::now();
                    std::hint::black_box(attention(&q, &k, &v, 0.088, &rules).unwrap());
                    best = best.min(t0.elapsed().as_secs_f64());
                }
                eprintln!(
                    "b={b} h={h} t={t} d={d} causal={causal} {set}: {:.1} ms, {:.0} GFLOP/s",
                    best * 1e3,
                    flop / best / 1e9
                );
            }
        }
    }
}
