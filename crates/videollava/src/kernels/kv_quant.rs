//! The 8-bit key/value cache (`--kv-cache q8_0`): keys and values stored as signed 8-bit codes
//! with one f32 scale per block, and the decode attention that reads them in place.
//!
//! Format (per cached position and key/value head, a row of `D` values): blocks of
//! [`block_len`]`(D)` values (32 when `D` is a multiple of 32, else 16 when it is a multiple of
//! 16, else the whole row), each stored as
//! `scale = max|x| / 127` (f32) and `code = round(x / scale)` in `-127..=127` (i8), as GGML's
//! Q8_0 does but with an f32 scale. A value reads back as `code * scale`. Codes live in a U8
//! tensor `[B, kv_heads, capacity, D]` (the bits of the i8), scales in an F32 tensor
//! `[B, kv_heads, capacity, D / block_len]`: 144 bytes per row of 128 against 256 in BF16, so a
//! decode step reads 56% of the bytes a BF16 cache costs (the 2,074-token video context of the 7B
//! model: 0.61 GB per token instead of 1.09 GB).
//!
//! [`attention`] is the decode path (few query rows per key/value head): scores, softmax and the
//! weighted sum in f32, each block's integer dot product multiplied by its scale — the same
//! numbers as dequantizing the cache to f32 and running [`super::attention::attention`], up to f32
//! summation order and, for blocks of 32, the query taken as i16 (one `vpmaddwd` per block of
//! keys; a step of 2^-15 of the row's largest |q|, far below bf16's 2^-8); probabilities are
//! rounded to the query's dtype in both. It needs AVX-512 F/BW, or
//! AVX2 + FMA (the i16 query for every block size), on x86-64,
//! and `D` a multiple of 16 up to 256; otherwise callers dequantize ([`dequantize`]) and run the
//! dense kernel. Batch rows holding the same bits over their first positions (questions about one
//! video: [`SharedPrefix`]) read those positions once, from one row, for all of them; the softmax
//! runs on vectors ([`super::softmax`]). Both keep each row's bits.

use std::str::FromStr;

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::attention::MaskRules;
use super::softmax::round_prob;
use crate::error::{Error, Result};

/// How the decoder keeps its keys and values between forward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheFormat {
    /// In the compute dtype (what transformers does).
    #[default]
    Model,
    /// 8-bit codes with an f32 scale per 32 values (see the module documentation).
    Q8_0,
}

impl FromStr for KvCacheFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "model" | "auto" => Ok(Self::Model),
            "q8_0" | "q8" | "int8" => Ok(Self::Q8_0),
            other => Err(Error::Input(format!("unknown KV cache format `{other}` (model or q8_0)"))),
        }
    }
}

impl std::fmt::Display for KvCacheFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Model => "model",
            Self::Q8_0 => "q8_0",
        })
    }
}

/// Values per scale for rows of `d` values.
pub fn block_len(d: usize) -> usize {
    if d.is_multiple_of(32) {
        32
    } else if d.is_multiple_of(16) {
        16
    } else {
        d.max(1)
    }
}

/// Quantizes one block: codes into `codes`, returns the scale.
#[inline]
fn quantize_block(x: &[f32], codes: &mut [u8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
    }
    scale
}

/// Quantizes `x` `[B, H, L, D]` (any float dtype) into codes (U8 `[B, H, L, D]`) and scales (F32
/// `[B, H, L, D / block_len(D)]`).
pub fn quantize(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, h, l, d) = x.dims4()?;
    let bl = block_len(d);
    let nb = d / bl;
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut codes = vec![0u8; xs.len()];
    let mut scales = vec![0f32; b * h * l * nb];
    if d > 0 {
        codes.par_chunks_mut(d).zip(scales.par_chunks_mut(nb)).zip(xs.par_chunks(d)).for_each(|((c, s), x)| {
            for ((c, s), x) in c.chunks_exact_mut(bl).zip(s.iter_mut()).zip(x.chunks_exact(bl)) {
                *s = quantize_block(x, c);
            }
        });
    }
    let dev = x.device();
    Ok((Tensor::from_vec(codes, (b, h, l, d), dev)?, Tensor::from_vec(scales, (b, h, l, nb), dev)?))
}

/// Element slice and `[b, head, position]` strides of a CPU tensor view whose last dimension is
/// contiguous.
struct View<'a, T> {
    data: &'a [T],
    start: usize,
    stride: [usize; 3],
}

impl<T> View<'_, T> {
    #[inline(always)]
    fn at(&self, b: usize, h: usize, pos: usize) -> usize {
        self.start + b * self.stride[0] + h * self.stride[1] + pos * self.stride[2]
    }
}

fn cpu_view<'a, T: candle_core::WithDType>(
    guard: &'a Storage,
    layout: &candle_core::Layout,
    what: &str,
) -> Result<View<'a, T>> {
    let Storage::Cpu(cpu) = guard else {
        return Err(Error::Model(format!("8-bit KV cache: {what} is not on the CPU")));
    };
    let s = layout.stride();
    if s.len() != 4 || (s[3] != 1 && layout.dims()[3] > 1) {
        return Err(Error::Model(format!("8-bit KV cache: {what} rows are not contiguous")));
    }
    Ok(View { data: cpu.as_slice::<T>()?, start: layout.start_offset(), stride: [s[0], s[1], s[2]] })
}

/// Reads codes `[B, H, T, D]` and scales `[B, H, T, nb]` (possibly narrowed views of the cache)
/// back as `[B, H, T, D]` in `dtype` (each value `code * scale` in f32, then rounded to `dtype`).
pub fn dequantize(codes: &Tensor, scales: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, h, t, d) = codes.dims4()?;
    let bl = block_len(d);
    if scales.dims4()? != (b, h, t, d / bl) {
        return Err(Error::Model(format!(
            "8-bit KV cache: codes {:?} and scales {:?} disagree",
            codes.dims(),
            scales.dims()
        )));
    }
    let (cg, cl) = codes.storage_and_layout();
    let (sg, sl) = scales.storage_and_layout();
    let (cv, sv) = (cpu_view::<u8>(&cg, cl, "codes")?, cpu_view::<f32>(&sg, sl, "scales")?);
    let mut out = vec![0f32; b * h * t * d];
    if d > 0 {
        out.par_chunks_mut(d).enumerate().for_each(|(row, dst)| {
            let (bi, hi, j) = (row / (h * t), (row / t) % h, row % t);
            let (c, s) = (&cv.data[cv.at(bi, hi, j)..][..d], &sv.data[sv.at(bi, hi, j)..][..d / bl]);
            for ((dst, c), &s) in dst.chunks_exact_mut(bl).zip(c.chunks_exact(bl)).zip(s) {
                for (o, &c) in dst.iter_mut().zip(c) {
                    *o = c as i8 as f32 * s;
                }
            }
        });
    }
    drop((cg, sg));
    let out = Tensor::from_vec(out, (b, h, t, d), codes.device())?;
    Ok(if dtype == DType::F32 { out } else { out.to_dtype(dtype)? })
}

/// Query rows per key/value head up to which [`attention`] runs (decoding; prefill dequantizes).
pub const MAX_ROWS: usize = 8;
/// Largest head dimension [`attention`] handles.
const MAX_D: usize = 256;
/// Positions of a shared prefix whose keys (then values) are read for every row of its group
/// before the next ones: 32 KiB of 8-bit keys of 128 values, which stay in L1/L2 meanwhile.
const SHARED_BLOCK: usize = 256;

/// Batch rows whose cached keys and values are the same bits over `len` positions: row
/// `rows[i].0` from its cache index `rows[i].1` on (e.g. questions about one video, each after
/// its own left padding). [`attention`] reads those positions once, from the first row, for
/// all of them. The caller guarantees the equality; the kernel only checks the bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedPrefix {
    /// `(batch row, cache index of its first shared position)`, the first row the one read.
    pub rows: Vec<(usize, usize)>,
    pub len: usize,
}

/// Decode attention over an 8-bit cache: `q` `[B, H, L, D]` (f32, bf16 or f16), keys and values
/// as codes `[B, H_kv, T, D]` + scales `[B, H_kv, T, D / 32]` (views of the cache), the masking
/// `rules` and `scale` as in [`super::attention::attention`]. Returns `[B, L, H * D]` in `q`'s
/// dtype, or `None` where this kernel does not apply (CPU without AVX2, `D` not a multiple
/// of 16 or over 256, more than [`MAX_ROWS`] query rows per key/value head, or a non-CPU tensor):
/// the caller then dequantizes.
///
/// The rows of each `shared` group read their shared positions from the group's first row, a
/// block of positions for all of them at a time, so a batch of questions about one video reads
/// that video's keys and values once per step instead of once per row. Every row gets the same
/// bits as when read alone (the same operations in the same order on the same codes).
pub fn attention(
    q: &Tensor,
    k: (&Tensor, &Tensor),
    v: (&Tensor, &Tensor),
    scale: f32,
    rules: &MaskRules,
    shared: &[SharedPrefix],
) -> Result<Option<Tensor>> {
    let (b, h, l, d) = q.dims4()?;
    let (bk, hkv, t, dk) = k.0.dims4()?;
    if v.0.dims4()? != (bk, hkv, t, dk) || bk != b || dk != d || hkv == 0 || h % hkv != 0 {
        return Err(Error::Model(format!(
            "8-bit KV attention: q {:?}, keys {:?} and values {:?} do not fit [B, H, L, D] / [B, H_kv, T, D]",
            q.dims(),
            k.0.dims(),
            v.0.dims()
        )));
    }
    if rules.past + l > t || rules.key_valid.len() != b * t {
        return Err(Error::Model(format!(
            "8-bit KV attention: {l} queries after {} cached positions with {t} keys and a key mask of {} \
             entries for {b} rows",
            rules.past,
            rules.key_valid.len()
        )));
    }
    let groups = row_groups(shared, b, t)?;
    let rep = h / hkv;
    let cpu = [q, k.0, k.1, v.0, v.1].iter().all(|x| x.device().is_cpu());
    if !cpu || !fast_available() || !d.is_multiple_of(16) || d > MAX_D || rep * l > MAX_ROWS || b * h * l * d == 0 {
        return Ok(None);
    }
    let dtype = q.dtype();
    let qf = q.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::Model(format!("8-bit KV attention: unsupported query dtype {dtype:?}")));
    }
    let (kcg, kcl) = k.0.storage_and_layout();
    let (ksg, ksl) = k.1.storage_and_layout();
    let (vcg, vcl) = v.0.storage_and_layout();
    let (vsg, vsl) = v.1.storage_and_layout();
    let p = Task {
        q: &qf,
        kc: cpu_view::<u8>(&kcg, kcl, "key codes")?,
        ks: cpu_view::<f32>(&ksg, ksl, "key scales")?,
        vc: cpu_view::<u8>(&vcg, vcl, "value codes")?,
        vs: cpu_view::<f32>(&vsg, vsl, "value scales")?,
        h,
        l,
        t,
        d,
        rep,
        scale,
        rules: *rules,
        dtype,
    };
    let tasks: Vec<(&Group, usize)> = groups.iter().flat_map(|g| (0..hkv).map(move |kvh| (g, kvh))).collect();
    #[cfg(not(target_arch = "x86_64"))]
    let run = |_: &(&Group, usize)| -> Vec<Vec<f32>> { unreachable!("the 8-bit KV kernel is x86-64 only") };
    #[cfg(target_arch = "x86_64")]
    let run = |&(g, kvh): &(&Group, usize)| -> Vec<Vec<f32>> {
        if !super::cpu::features().avx512 {
            // SAFETY: `fast_available()` without AVX-512 means AVX2, FMA and F16C; `d` is a
            // multiple of 16 up to MAX_D; `row_groups` kept every row and shared range inside
            // `[b, t]`, which the views cover (checked above and by candle's layouts).
            unsafe { group_task::<avx2::Kernel>(&p, g, kvh) }
        } else if block_len(d) == 32 {
            // SAFETY: as above, with AVX-512 F/BW (blocks of 32 values).
            unsafe { group_task::<avx512::Kernel<2>>(&p, g, kvh) }
        } else {
            // SAFETY: as above (blocks of 16 values).
            unsafe { group_task::<avx512::Kernel<1>>(&p, g, kvh) }
        }
    };
    let outputs: Vec<Vec<Vec<f32>>> = tasks.par_iter().map(run).collect();
    drop((kcg, ksg, vcg, vsg));
    // `results[bi * hkv + kvh]`: that row's `rep * L` query rows (group g, query i) -> head kvh * rep + g.
    let mut results = vec![Vec::new(); b * hkv];
    for ((g, kvh), outs) in tasks.iter().zip(outputs) {
        for (&(bi, _), o) in g.rows.iter().zip(outs) {
            results[bi * hkv + kvh] = o;
        }
    }
    let mut out = vec![0f32; b * l * h * d];
    out.par_chunks_mut(h * d).enumerate().for_each(|(row, dst)| {
        let (bi, i) = (row / l, row % l);
        for (hh, dst) in dst.chunks_exact_mut(d).enumerate() {
            let (kvh, g) = (hh / rep, hh % rep);
            dst.copy_from_slice(&results[bi * hkv + kvh][(g * l + i) * d..][..d]);
        }
    });
    let out = Tensor::from_vec(out, (b, l, h * d), &Device::Cpu)?;
    Ok(Some(if dtype == DType::F32 { out } else { out.to_dtype(dtype)? }))
}

/// Whether [`attention`]'s kernel can run on the calling thread (AVX-512 F/BW, or AVX2 + FMA).
fn fast_available() -> bool {
    super::cpu::features().avx2
}

/// Whether decode attention over an 8-bit cache reads [`SharedPrefix`]es once for their rows
/// here (else it dequantizes each row).
pub fn reads_shared_prefixes() -> bool {
    fast_available()
}

/// Rows read together: `rows[0]` is the one whose keys and values cover the others' shared
/// positions (`len` of them from each row's start); a lone row has `len` 0.
struct Group {
    rows: Vec<(usize, usize)>,
    len: usize,
}

/// Every batch row once: the `shared` groups (checked: rows in `0..b`, each in one group, shared
/// ranges inside the `t` positions), then the other rows alone.
fn row_groups(shared: &[SharedPrefix], b: usize, t: usize) -> Result<Vec<Group>> {
    let mut seen = vec![false; b];
    let mut groups = Vec::with_capacity(b);
    for g in shared.iter().filter(|g| g.len > 0 && !g.rows.is_empty()) {
        for &(bi, start) in &g.rows {
            if bi >= b || seen[bi] || start.checked_add(g.len).is_none_or(|end| end > t) {
                return Err(Error::Model(format!(
                    "8-bit KV attention: shared prefix {g:?} does not fit {b} rows of {t} positions \
                     (or names a row twice)"
                )));
            }
            seen[bi] = true;
        }
        groups.push(Group { rows: g.rows.clone(), len: g.len });
    }
    groups.extend((0..b).filter(|&bi| !seen[bi]).map(|bi| Group { rows: vec![(bi, 0)], len: 0 }));
    Ok(groups)
}

/// What every task of [`attention`] reads.
struct Task<'a> {
    /// Queries `[B, H, L, D]` f32, contiguous.
    q: &'a [f32],
    kc: View<'a, u8>,
    ks: View<'a, f32>,
    vc: View<'a, u8>,
    vs: View<'a, f32>,
    h: usize,
    l: usize,
    t: usize,
    d: usize,
    rep: usize,
    scale: f32,
    rules: MaskRules<'a>,
    /// The query's dtype (F32, BF16 or F16), which probabilities are rounded to.
    dtype: DType,
}

/// Where a range of positions is read: batch row `row`, the position shifted by `shift`.
#[derive(Clone, Copy)]
struct Source {
    row: usize,
    shift: isize,
}

impl Source {
    /// Cache index in `self.row` of position `j` of the row being computed.
    #[inline(always)]
    fn at(self, j: usize) -> usize {
        j.wrapping_add_signed(self.shift)
    }
}

/// One instruction set's inner loops, which [`group_task`] runs over ranges of positions.
trait Kernel {
    /// A query row prepared for the score loop.
    type Query;
    /// Prepares `qrow` (`D` f32).
    ///
    /// # Safety
    /// The CPU has the kernel's features; `qrow.len() == p.d`.
    unsafe fn query(p: &Task, qrow: &[f32]) -> Self::Query;
    /// `attention::softmax_probs` (the scalar softmax) of `row` (raw scores) in place, probabilities rounded
    /// to the query's dtype (the same bits, on vectors: [`super::softmax`]); false when no key is
    /// visible.
    ///
    /// # Safety
    /// The CPU has the kernel's features; `valid.len() == row.len()`.
    unsafe fn softmax(p: &Task, row: &mut [f32], valid: &[u32], scale: f32) -> bool;
    /// The factor of the raw scores that the softmax applies (`p.scale`, or with the query's
    /// integer step).
    fn score_scale(q: &Self::Query) -> f32;
    /// Raw scores `s[j]` for `j` in `from..to`, the keys of head `kvh` read from `src`;
    /// kernels that score keys in blocks start them at `align + 16 m`, whatever the range.
    ///
    /// # Safety
    /// The CPU has the kernel's features; `src.at(j)` for `j` in `from..to` inside the views.
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores(
        p: &Task,
        q: &Self::Query,
        kvh: usize,
        src: Source,
        s: &mut [f32],
        from: usize,
        to: usize,
        align: usize,
    );
    /// `acc += Σ_j w_j · v_j` for `j` in `from..to` in order (`w_j = uniform` or else `probs[j]`,
    /// zeros skipped), the values of head `kvh` read from `src`; `acc` holds `D` f32.
    ///
    /// # Safety
    /// As [`Self::scores`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn values(
        p: &Task,
        kvh: usize,
        src: Source,
        probs: &[f32],
        uniform: Option<f32>,
        from: usize,
        to: usize,
        acc: &mut [f32],
    );
}

/// Head `kvh` for the rows of `g`: each row's `rep * L` query rows, `rep * L * D` f32 outputs
/// per row. Per query row, scores over `[lo, hi)` (its causal and window limits), the softmax,
/// then the weighted values in position order; the shared positions are read from `g.rows[0]`,
/// a block for every row at a time, the others from the row itself. A row alone (`g.len` 0)
/// is the plain kernel.
///
/// # Safety
/// The CPU has `K`'s features; `p.d` a multiple of 16 up to `MAX_D` with `K`'s block size; every
/// row and shared range of `g` inside the views (as [`row_groups`] checks).
unsafe fn group_task<K: Kernel>(p: &Task, g: &Group, kvh: usize) -> Vec<Vec<f32>> {
    let (t, d, l) = (p.t, p.d, p.l);
    let nq = p.rep * l;
    let rules = &p.rules;
    let (lead, lead_start) = g.rows[0];
    // Per (row m, query row r) at index m * nq + r: its limits, query and scores.
    let mut limits = Vec::with_capacity(g.rows.len() * nq);
    let mut queries = Vec::with_capacity(g.rows.len() * nq);
    for &(bi, _) in &g.rows {
        for r in 0..nq {
            let (head, i) = (kvh * p.rep + r / l, r % l);
            let qa = rules.past + i;
            let hi = if rules.causal { (qa + 1).min(t) } else { t };
            let lo = rules.sliding_window.map_or(0, |w| (qa + 1).saturating_sub(w)).min(hi);
            limits.push((lo, hi));
            // SAFETY: this function's contract; the row is `d` values of `p.q`.
            queries.push(unsafe { K::query(p, &p.q[((bi * p.h + head) * l + i) * d..][..d]) });
        }
    }
    let mut s = vec![0f32; g.rows.len() * nq * t];
    // The three ranges of row `m`'s positions in `lo..hi`: before, inside and after its shared
    // ones, each with where it is read.
    let ranges = |m: usize, lo: usize, hi: usize| {
        let (bi, start) = g.rows[m];
        let (a, b) = (start.clamp(lo, hi), (start + g.len).clamp(lo, hi));
        let own = Source { row: bi, shift: 0 };
        let shared = Source { row: lead, shift: lead_start as isize - start as isize };
        [(lo, a, own), (a, b, shared), (b, hi, own)]
    };
    // Every (row, query row)'s positions in `limits`, in the order both passes take them: the
    // own ones before the shared ones, the shared ones a block of every row at a time (so the
    // block stays in cache), then the own ones after; each piece with where it is read. A row
    // visits its own positions in increasing order.
    let pieces = |limits: &[(usize, usize)], f: &mut dyn FnMut(usize, usize, (usize, usize, Source))| {
        let rows = 0..g.rows.len();
        let all = || rows.clone().flat_map(|m| (0..nq).map(move |r| (m, r)));
        for (m, r) in all() {
            let (lo, hi) = limits[m * nq + r];
            f(m, r, ranges(m, lo, hi)[0]);
        }
        for u in (0..g.len).step_by(SHARED_BLOCK) {
            for (m, r) in all() {
                let (lo, hi) = limits[m * nq + r];
                let (a, b, src) = ranges(m, lo, hi)[1];
                let start = g.rows[m].1;
                f(m, r, ((start + u).clamp(a, b), (start + u + SHARED_BLOCK).clamp(a, b), src));
            }
        }
        for (m, r) in all() {
            let (lo, hi) = limits[m * nq + r];
            f(m, r, ranges(m, lo, hi)[2]);
        }
    };
    pieces(&limits, &mut |m, r, (from, to, src)| {
        let x = m * nq + r;
        if from < to {
            // SAFETY: this function's contract: `src` maps `from..to` inside the views.
            unsafe { K::scores(p, &queries[x], kvh, src, &mut s[x * t..(x + 1) * t], from, to, limits[x].0) };
        }
    });
    // Softmax; a row that sees no key averages all T values (see `MaskRules`).
    let mut uniform = vec![None; g.rows.len() * nq];
    for x in 0..g.rows.len() * nq {
        let (lo, hi) = limits[x];
        let valid = &rules.key_valid[g.rows[x / nq].0 * t..][lo..hi];
        // SAFETY: this function's contract (the CPU has `K`'s features); one length each.
        if !unsafe { K::softmax(p, &mut s[x * t..][lo..hi], valid, K::score_scale(&queries[x])) } {
            (limits[x], uniform[x]) = ((0, t), Some(round_prob(1.0 / t as f32, p.dtype)));
        }
    }
    // Weighted values in position order.
    let mut out: Vec<Vec<f32>> = g.rows.iter().map(|_| vec![0f32; nq * d]).collect();
    pieces(&limits, &mut |m, r, (from, to, src)| {
        let x = m * nq + r;
        if from < to {
            let acc = &mut out[m][r * d..(r + 1) * d];
            // SAFETY: as for the scores.
            unsafe { K::values(p, kvh, src, &s[x * t..(x + 1) * t], uniform[x], from, to, acc) };
        }
    });
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Source, Task, MAX_D};
    use crate::kernels::attention::{mask16, reduce16};
    use crate::kernels::prefetch::prefetch_ahead;
    use crate::kernels::softmax::softmax_probs16;

    /// 16 codes at `c` as f32.
    #[inline(always)]
    unsafe fn widen16(c: *const u8) -> __m512 {
        // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
        // features it is compiled for, and the pointers and lengths it gets are valid as documented.
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c as *const __m128i))) }
    }

    /// AVX-512 F/BW, blocks of `16 * C` values (`C` = 1 or 2 vectors per scale); keys scored 16
    /// at a time and reduced together.
    pub(super) struct Kernel<const C: usize>;

    pub(super) struct Query {
        qv: [__m512; MAX_D / 16],
        /// Blocks of 32: the query as i16 (step = its largest |q| / 32767, 2^-15 relative), so
        /// that each block's products are one `vpmaddwd` (exact i32: at most 2 * 127 * 32767 per
        /// lane, also exact in f32).
        q16: [__m512i; MAX_D / 32],
        score_scale: f32,
    }

    impl<const C: usize> super::Kernel for Kernel<C> {
        type Query = Query;

        #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
        unsafe fn query(p: &Task, qrow: &[f32]) -> Query {
            // SAFETY: the trait's contract: AVX-512, `qrow` holds `p.d` (a multiple of 16) values.
            unsafe {
                let (nb, nf) = (p.d / (16 * C), p.d / 16);
                let mut q = Query {
                    qv: [_mm512_setzero_ps(); MAX_D / 16],
                    q16: [_mm512_setzero_si512(); MAX_D / 32],
                    score_scale: p.scale,
                };
                for (f, x) in q.qv.iter_mut().enumerate().take(nf) {
                    *x = _mm512_loadu_ps(qrow.as_ptr().add(16 * f));
                }
                if C == 2 {
                    let qmax = qrow.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let qstep = if qmax > 0.0 { qmax / 32767.0 } else { 0.0 };
                    let inv = _mm512_set1_ps(if qmax > 0.0 { 1.0 / qstep } else { 0.0 });
                    q.score_scale *= qstep;
                    for (blk, x) in q.q16.iter_mut().enumerate().take(nb) {
                        let lo16 = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(q.qv[2 * blk], inv)));
                        let hi16 = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(q.qv[2 * blk + 1], inv)));
                        *x = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo16), hi16);
                    }
                }
                q
            }
        }

        fn score_scale(q: &Query) -> f32 {
            q.score_scale
        }

        /// The 16-lane softmax: the same bits as the scalar one (8 rows, 32 layers of the 7B at
        /// 2,074 positions, `bench_decode_shared`: 157 -> 118 ms with it).
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
        unsafe fn softmax(p: &Task, row: &mut [f32], valid: &[u32], scale: f32) -> bool {
            // SAFETY: the trait's contract: AVX-512 F/BW, `row` and `valid` of one length.
            unsafe { softmax_probs16(row, valid, scale, p.dtype) }
        }

        /// Scores: Σ_blocks scale_b · Σ_i q_i · code_i.
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
        unsafe fn scores(
            p: &Task,
            q: &Query,
            kvh: usize,
            src: Source,
            s: &mut [f32],
            from: usize,
            to: usize,
            align: usize,
        ) {
            // SAFETY: the trait's contract: AVX-512; `src` maps `from..to` inside the views, `s`
            // holds `to` scores (a masked store does not touch the lanes it leaves out).
            unsafe {
                let (d, nb) = (p.d, p.d / (16 * C));
                // In registers rather than read through `q` for every key.
                let (qv, q16) = (q.qv, q.q16);
                let mut j0 = from;
                while j0 < to {
                    // Blocks of 16 keys start at `align + 16 m` whatever the range, so that each
                    // key's lanes are reduced in the same order as when scored with its neighbours.
                    let cs = j0 - (j0 - align) % 16;
                    let ce = (cs + 16).min(to);
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for (kk, a) in acc.iter_mut().enumerate().take(ce - cs).skip(j0 - cs) {
                        let j = cs + kk;
                        let c = p.kc.data.as_ptr().add(p.kc.at(src.row, kvh, src.at(j)));
                        let sc = p.ks.data.as_ptr().add(p.ks.at(src.row, kvh, src.at(j)));
                        prefetch_ahead(c, p.kc.stride[2], d);
                        prefetch_ahead(sc as *const u8, 4 * p.ks.stride[2], 4 * nb);
                        if C == 2 {
                            for (blk, qb) in q16.iter().enumerate().take(nb) {
                                let k16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(c.add(32 * blk) as *const __m256i));
                                let dot = _mm512_cvtepi32_ps(_mm512_madd_epi16(k16, *qb));
                                *a = _mm512_fmadd_ps(dot, _mm512_set1_ps(*sc.add(blk)), *a);
                            }
                        } else {
                            for blk in 0..nb {
                                let f = C * blk;
                                let mut dot = _mm512_mul_ps(qv[f], widen16(c.add(16 * f)));
                                for x in 1..C {
                                    dot = _mm512_fmadd_ps(qv[f + x], widen16(c.add(16 * (f + x))), dot);
                                }
                                *a = _mm512_fmadd_ps(dot, _mm512_set1_ps(*sc.add(blk)), *a);
                            }
                        }
                    }
                    let lanes = mask16(ce - cs) & !mask16(j0 - cs);
                    _mm512_mask_storeu_ps(s.as_mut_ptr().add(cs), lanes, reduce16(acc));
                    j0 = ce;
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
        unsafe fn values(
            p: &Task,
            kvh: usize,
            src: Source,
            probs: &[f32],
            uniform: Option<f32>,
            from: usize,
            to: usize,
            out: &mut [f32],
        ) {
            // SAFETY: the trait's contract: AVX-512; `src` maps `from..to` inside the views;
            // `out` holds `p.d` f32.
            unsafe {
                let (d, nb, nf) = (p.d, p.d / (16 * C), p.d / 16);
                let mut acc = [_mm512_setzero_ps(); MAX_D / 16];
                for (f, a) in acc.iter_mut().enumerate().take(nf) {
                    *a = _mm512_loadu_ps(out.as_ptr().add(16 * f));
                }
                for j in from..to {
                    let pj = uniform.unwrap_or(probs[j]);
                    if pj == 0.0 {
                        continue;
                    }
                    let c = p.vc.data.as_ptr().add(p.vc.at(src.row, kvh, src.at(j)));
                    let sc = p.vs.data.as_ptr().add(p.vs.at(src.row, kvh, src.at(j)));
                    prefetch_ahead(c, p.vc.stride[2], d);
                    prefetch_ahead(sc as *const u8, 4 * p.vs.stride[2], 4 * nb);
                    for blk in 0..nb {
                        let w = _mm512_set1_ps(pj * *sc.add(blk));
                        for x in 0..C {
                            let f = C * blk + x;
                            acc[f] = _mm512_fmadd_ps(w, widen16(c.add(16 * f)), acc[f]);
                        }
                    }
                }
                for (f, a) in acc.iter().enumerate().take(nf) {
                    _mm512_storeu_ps(out.as_mut_ptr().add(16 * f), *a);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 path, one key at a time: scores as the AVX-512 path takes them for blocks of 32
    //! (the query as i16, `madd` against the codes widened to i16), for every block size; the
    //! weighted values in f32 on the widened codes.
    use std::arch::x86_64::*;

    use super::{Source, Task, MAX_D};
    use crate::kernels::prefetch::prefetch_ahead;
    use crate::kernels::softmax::softmax_probs8;

    /// 8 codes of `c` (the first 8 bytes) as f32.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn widen8(c: &[u8]) -> __m256 {
        let c: [u8; 8] = c[..8].try_into().expect("8 codes");
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(c))))
    }

    /// The sum of the 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// AVX2 + FMA, any block size (a short view panics).
    pub(super) struct Kernel;

    impl super::Kernel for Kernel {
        /// The query as i16 in chunks of 16 (step = its largest |q| / 32767, as the AVX-512
        /// path takes it), and the softmax's factor with that step.
        type Query = ([__m256i; MAX_D / 16], f32);

        #[target_feature(enable = "avx2,fma")]
        unsafe fn query(p: &Task, qrow: &[f32]) -> Self::Query {
            let qmax = qrow.iter().fold(0f32, |m, x| m.max(x.abs()));
            let qstep = if qmax > 0.0 { qmax / 32767.0 } else { 0.0 };
            let inv = _mm256_set1_ps(if qmax > 0.0 { 1.0 / qstep } else { 0.0 });
            let mut q16 = [_mm256_setzero_si256(); MAX_D / 16];
            for (x, q) in q16.iter_mut().zip(qrow.chunks_exact(16)) {
                let q: &[f32; 16] = q.try_into().expect("16 values");
                // SAFETY: `q` is 16 readable f32; `loadu` has no alignment requirement.
                let (a, b) = unsafe { (_mm256_loadu_ps(q.as_ptr()), _mm256_loadu_ps(q.as_ptr().add(8))) };
                let (a, b) = (_mm256_cvtps_epi32(_mm256_mul_ps(a, inv)), _mm256_cvtps_epi32(_mm256_mul_ps(b, inv)));
                // `packs` interleaves the 128-bit halves: [a0-3, b0-3, a4-7, b4-7] -> in order.
                *x = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(a, b));
            }
            (q16, p.scale * qstep)
        }

        fn score_scale(q: &Self::Query) -> f32 {
            q.1
        }

        /// The softmax on two vectors of 8: the same bits as the scalar one.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn softmax(p: &Task, row: &mut [f32], valid: &[u32], scale: f32) -> bool {
            // SAFETY: the trait's contract: AVX2 + FMA (the set also has F16C: `cpu::features`),
            // `row` and `valid` of one length.
            unsafe { softmax_probs8(row, valid, scale, p.dtype) }
        }

        /// Scores: Σ_blocks scale_b · Σ_i q_i · code_i, a key at a time (`align` unused), each
        /// 16 codes widened to i16 and multiplied with `madd` (exact i32: at most 2 * 2 * 127 *
        /// 32767 per lane for a block of 32, also exact in f32).
        #[target_feature(enable = "avx2,fma")]
        unsafe fn scores(
            p: &Task,
            q: &Self::Query,
            kvh: usize,
            src: Source,
            s: &mut [f32],
            from: usize,
            to: usize,
            _align: usize,
        ) {
            let (d, bl) = (p.d, super::block_len(p.d));
            let nb = d / bl;
            // In registers rather than read through `q` for every key.
            let q16 = q.0;
            for (j, sj) in s.iter_mut().enumerate().take(to).skip(from) {
                let c = &p.kc.data[p.kc.at(src.row, kvh, src.at(j))..][..d];
                let sc = &p.ks.data[p.ks.at(src.row, kvh, src.at(j))..][..nb];
                prefetch_ahead(c.as_ptr(), p.kc.stride[2], d);
                prefetch_ahead(sc.as_ptr() as *const u8, 4 * p.ks.stride[2], 4 * nb);
                let mut acc = _mm256_setzero_ps();
                for (blk, &scale) in sc.iter().enumerate() {
                    let mut dot = _mm256_setzero_si256();
                    for f in blk * bl / 16..(blk + 1) * bl / 16 {
                        let codes: &[u8; 16] = c[16 * f..][..16].try_into().expect("16 codes");
                        // SAFETY: `codes` is 16 readable bytes; `loadu` has no alignment requirement.
                        let k16 = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(codes.as_ptr() as *const __m128i) });
                        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(k16, q16[f]));
                    }
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc);
                }
                *sj = hsum(acc);
            }
        }

        #[target_feature(enable = "avx2,fma")]
        unsafe fn values(
            p: &Task,
            kvh: usize,
            src: Source,
            probs: &[f32],
            uniform: Option<f32>,
            from: usize,
            to: usize,
            out: &mut [f32],
        ) {
            let (d, bl) = (p.d, super::block_len(p.d));
            let (nf, nb) = (d / 8, d / bl);
            let mut acc = [_mm256_setzero_ps(); MAX_D / 8];
            for (a, o) in acc.iter_mut().zip(out.chunks_exact(8)) {
                let o: &[f32; 8] = o.try_into().expect("8 values");
                // SAFETY: `o` is 8 readable f32; `loadu` has no alignment requirement.
                *a = unsafe { _mm256_loadu_ps(o.as_ptr()) };
            }
            for j in from..to {
                let pj = uniform.unwrap_or(probs[j]);
                if pj == 0.0 {
                    continue;
                }
                let c = &p.vc.data[p.vc.at(src.row, kvh, src.at(j))..][..d];
                let sc = &p.vs.data[p.vs.at(src.row, kvh, src.at(j))..][..nb];
                prefetch_ahead(c.as_ptr(), p.vc.stride[2], d);
                prefetch_ahead(sc.as_ptr() as *const u8, 4 * p.vs.stride[2], 4 * nb);
                for (blk, (a, c)) in acc[..nf].chunks_exact_mut(bl / 8).zip(c.chunks_exact(bl)).enumerate() {
                    let w = _mm256_set1_ps(pj * sc[blk]);
                    for (a, c) in a.iter_mut().zip(c.chunks_exact(8)) {
                        *a = _mm256_fmadd_ps(w, widen8(c), *a);
                    }
                }
            }
            for (a, dst) in acc.iter().zip(out.chunks_exact_mut(8)) {
                let dst: &mut [f32; 8] = dst.try_into().expect("8 values");
                // SAFETY: `dst` is 8 writable f32; `storeu` has no alignment requirement.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), *a) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention;

    fn rand_tensor(shape: (usize, usize, usize, usize), seed: u64, dtype: DType) -> Tensor {
        let mut rng = crate::kernels::testing::Rng::new(seed);
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f32> =
            (0..n).map(|_| ((rng.next() >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn quantization_error_is_within_half_a_step_per_block() {
        for d in [128, 64, 16, 40] {
            let x = rand_tensor((2, 3, 5, d), d as u64, DType::F32);
            let (c, s) = quantize(&x).unwrap();
            assert_eq!(s.dims4().unwrap(), (2, 3, 5, d / block_len(d)));
            let back = dequantize(&c, &s, DType::F32).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bs = back.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bl = block_len(d);
            for (xb, bb) in xs.chunks(bl).zip(bs.chunks(bl)) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = amax / 127.0;
                for (a, b) in xb.iter().zip(bb) {
                    assert!((a - b).abs() <= 0.5 * step * (1.0 + 1e-5) + 1e-12, "d {d}: {a} read back as {b}");
                }
                // The largest magnitude is exact up to f32 rounding.
                let i = xb.iter().position(|v| v.abs() == amax).unwrap();
                assert!((xb[i] - bb[i]).abs() <= amax * 1e-6);
            }
            let codes = c.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            assert!(codes.iter().all(|&c| c != 0x80), "code -128 never used");
        }
        // Zeros stay zeros (scale 0, no NaN).
        let z = Tensor::zeros((1, 1, 2, 32), DType::F32, &Device::Cpu).unwrap();
        let (c, s) = quantize(&z).unwrap();
        assert_eq!(max_diff(&dequantize(&c, &s, DType::F32).unwrap(), &z), 0.0);
    }

    /// (B, H, H_kv, L, T, D, past, valid keys per row (from the left), window)
    type Case = (usize, usize, usize, usize, usize, usize, usize, Vec<usize>, Option<usize>);

    fn cases() -> Vec<Case> {
        vec![
            (1, 4, 4, 1, 517, 128, 516, vec![517], None),
            (2, 4, 4, 1, 300, 128, 299, vec![300, 211], None),
            (1, 8, 2, 1, 77, 64, 76, vec![77], None),
            (1, 4, 2, 2, 90, 128, 88, vec![90], Some(16)),
            (2, 2, 1, 3, 40, 256, 37, vec![40, 3], None),
            (1, 2, 2, 1, 33, 32, 32, vec![33], Some(1)),
            (2, 4, 2, 1, 50, 16, 49, vec![50, 20], None),
            (1, 4, 2, 1, 21, 48, 20, vec![21], None),
        ]
    }

    fn run_case(case: &Case, dtype: DType) -> (Option<Tensor>, Tensor) {
        let (b, h, hkv, l, t, d, past, ref valid, window) = *case;
        let q = rand_tensor((b, h, l, d), 1 + t as u64, dtype);
        // Keys with a few large channels, as real Llama keys have.
        let k = (rand_tensor((b, hkv, t, d), 2 + t as u64, DType::F32) * 1.5).unwrap();
        let v = rand_tensor((b, hkv, t, d), 3 + t as u64, DType::F32);
        let (kc, ks) = quantize(&k).unwrap();
        let (vc, vs) = quantize(&v).unwrap();
        let mut key_valid = vec![0u32; b * t];
        for bi in 0..b {
            for j in t - valid[bi]..t {
                key_valid[bi * t + j] = 1;
            }
        }
        let rules = MaskRules { key_valid: &key_valid, past, causal: true, sliding_window: window };
        let scale = 1.0 / (d as f32).sqrt();
        let fast = attention(&q, (&kc, &ks), (&vc, &vs), scale, &rules, &[]).unwrap();
        // Reference: the dequantized cache in f32 through the dense kernel, queries in their dtype
        // widened to f32 (so only the rounding of the probabilities depends on the dtype).
        let (kd, vd) = (dequantize(&kc, &ks, DType::F32).unwrap(), dequantize(&vc, &vs, DType::F32).unwrap());
        let dense = attention::attention(&q.to_dtype(DType::F32).unwrap(), &kd, &vd, scale, &rules).unwrap();
        (fast, dense)
    }

    #[test]
    fn decode_kernel_matches_the_dequantized_dense_path() {
        if !fast_available() {
            eprintln!("skipped: this CPU has no AVX2 (the dequantizing path is tested elsewhere)");
            return;
        }
        // f32 queries: f32 summation order, and for blocks of 32 the query taken as i16 (a step
        // of 2^-15 of its largest |q|, ~3e-5 here). bf16 queries: probabilities rounded to bf16
        // (one step 2^-8 relative) against f32 ones, then the output rounded to bf16: a few bf16
        // steps of values in [-2, 2].
        // Every SIMD kernel set of this CPU (AVX2; AVX-512), forced through the switch.
        for set in crate::kernels::testing::simd_sets() {
            let _forced = crate::kernels::cpu::force(set);
            for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 0.03)] {
                for case in cases() {
                    let (fast, dense) = run_case(&case, dtype);
                    let fast = fast.expect("kernel applies");
                    assert_eq!(fast.dtype(), dtype);
                    let diff = max_diff(&fast, &dense);
                    assert!(diff <= tol, "{set} {dtype:?} case {case:?}: max |diff| {diff}");
                }
            }
        }
    }

    /// `[B, H_kv, T, D]` keys or values where every row in `rows` (row, start) holds row
    /// `rows[0]`'s positions `start0..start0 + len` at `start..start + len`.
    fn with_shared(x: &Tensor, rows: &[(usize, usize)], len: usize) -> Tensor {
        let (b, h, t, d) = x.dims4().unwrap();
        let mut v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (lead, s0) = rows[0];
        for &(bi, start) in &rows[1..] {
            for hh in 0..h {
                for j in 0..len {
                    let (from, to) = (((lead * h + hh) * t + s0 + j) * d, ((bi * h + hh) * t + start + j) * d);
                    let row: Vec<f32> = v[from..from + d].to_vec();
                    v[to..to + d].copy_from_slice(&row);
                }
            }
        }
        Tensor::from_vec(v, (b, h, t, d), &Device::Cpu).unwrap()
    }

    /// Rows reading their shared positions from another row give the bits they get alone, with
    /// padding of every length before them (blocks of 16 keys cut anywhere), both block sizes,
    /// grouped query heads, two queries per row with a window, and a row outside the group.
    #[test]
    fn shared_prefixes_give_the_bits_of_each_row_alone() {
        if !fast_available() {
            eprintln!("skipped: this CPU has no AVX2 (the dequantizing path is tested elsewhere)");
            return;
        }
        // (H, H_kv, L, T, D, window, groups of (row, start), shared length)
        type SharedCase = (usize, usize, usize, usize, usize, Option<usize>, Vec<Vec<(usize, usize)>>, usize);
        let cases: Vec<SharedCase> = vec![
            (4, 4, 1, 600, 128, None, vec![vec![(0, 0), (1, 3), (2, 17), (4, 40)]], 530),
            (8, 2, 1, 300, 64, None, vec![vec![(3, 5), (0, 0)], vec![(1, 2), (2, 33)]], 257),
            (4, 2, 2, 90, 48, Some(30), vec![vec![(1, 9), (0, 1), (2, 0)]], 70),
            (2, 2, 1, 40, 256, None, vec![vec![(0, 0), (1, 1)]], 39),
        ];
        for set in crate::kernels::testing::simd_sets() {
            let _forced = crate::kernels::cpu::force(set);
            for (h, hkv, l, t, d, window, groups, len) in &cases {
                let (h, hkv, l, t, d, len) = (*h, *hkv, *l, *t, *d, *len);
                let b = 5;
                let shared: Vec<SharedPrefix> =
                    groups.iter().map(|rows| SharedPrefix { rows: rows.clone(), len }).collect();
                let (mut k, mut v) =
                    (rand_tensor((b, hkv, t, d), 7, DType::F32), rand_tensor((b, hkv, t, d), 8, DType::F32));
                for g in &shared {
                    (k, v) = (with_shared(&k, &g.rows, len), with_shared(&v, &g.rows, len));
                }
                let (kc, ks) = quantize(&k).unwrap();
                let (vc, vs) = quantize(&v).unwrap();
                // Each row's padding is everything before its start in the groups (row 3: 11).
                let mut key_valid = vec![1u32; b * t];
                for bi in 0..b {
                    let start = shared.iter().flat_map(|g| &g.rows).find(|r| r.0 == bi).map_or(11, |r| r.1);
                    key_valid[bi * t..bi * t + start].fill(0);
                }
                let rules = MaskRules { key_valid: &key_valid, past: t - l, causal: true, sliding_window: *window };
                for dtype in [DType::F32, DType::BF16] {
                    let q = rand_tensor((b, h, l, d), 9, dtype);
                    let bits = |shared: &[SharedPrefix]| {
                        let out = attention(&q, (&kc, &ks), (&vc, &vs), 0.1, &rules, shared).unwrap().unwrap();
                        out.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    };
                    let (alone, together) = (bits(&[]), bits(&shared));
                    let differ = alone.iter().zip(&together).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                    assert_eq!(differ, 0, "{set} {dtype:?} H {h} L {l} D {d}: {differ} values differ");
                }
            }
        }
    }

    #[test]
    fn shared_prefixes_out_of_range_are_refused() {
        let (t, d) = (20, 32);
        let q = rand_tensor((2, 1, 1, d), 5, DType::F32);
        let (kc, ks) = quantize(&rand_tensor((2, 1, t, d), 6, DType::F32)).unwrap();
        let key_valid = vec![1u32; 2 * t];
        let rules = MaskRules { key_valid: &key_valid, past: t - 1, causal: true, sliding_window: None };
        for rows in [vec![(0, 0), (2, 0)], vec![(0, 0), (0, 1)], vec![(0, 0), (1, 11)]] {
            let shared = [SharedPrefix { rows: rows.clone(), len: 10 }];
            let e = attention(&q, (&kc, &ks), (&kc, &ks), 0.1, &rules, &shared).unwrap_err().to_string();
            assert!(e.contains("shared prefix"), "{rows:?}: {e}");
        }
    }

    #[test]
    fn kernel_declines_what_it_does_not_handle() {
        // More query rows than MAX_ROWS (a prefill) and an odd head size: the caller dequantizes.
        for (l, d) in [(MAX_ROWS + 1, 64), (1, 40)] {
            let t = 20;
            let q = rand_tensor((1, 1, l, d), 5, DType::F32);
            let (kc, ks) = quantize(&rand_tensor((1, 1, t, d), 6, DType::F32)).unwrap();
            let key_valid = vec![1u32; t];
            let rules = MaskRules { key_valid: &key_valid, past: t - l, causal: true, sliding_window: None };
            assert!(attention(&q, (&kc, &ks), (&kc, &ks), 0.1, &rules, &[]).unwrap().is_none());
        }
    }

    #[test]
    fn parses_formats() {
        assert_eq!("q8_0".parse::<KvCacheFormat>().unwrap(), KvCacheFormat::Q8_0);
        assert_eq!("model".parse::<KvCacheFormat>().unwrap(), KvCacheFormat::Model);
        assert!("q4".parse::<KvCacheFormat>().unwrap_err().to_string().contains("q8_0"));
    }

    #[test]
    #[ignore = "benchmark: cargo test --release -p videollava --lib kv_quant::tests::bench_decode -- --ignored --nocapture"]
    fn bench_decode() {
        // 32 layers of the 7B shapes at the 2,074-token video context (so the cache is not in L3):
        // BF16 cache through the dense kernel against the 8-bit cache.
        let (h, t, d, layers) = (32, 2074, 128, 32);
        let key_valid = vec![1u32; t];
        let rules = MaskRules { key_valid: &key_valid, past: t - 1, causal: true, sliding_window: None };
        let q = rand_tensor((1, h, 1, d), 9, DType::BF16);
        let dense: Vec<(Tensor, Tensor)> = (0..layers)
            .map(|i| (rand_tensor((1, h, t, d), 10 + i, DType::BF16), rand_tensor((1, h, t, d), 100 + i, DType::BF16)))
            .collect();
        let quant: Vec<_> = dense.iter().map(|(k, v)| (quantize(k).unwrap(), quantize(v).unwrap())).collect();
        for round in 0..5 {
            let t0 = std::time::Instant::now();
            for (k, v) in &dense {
                attention::attention(&q, k, v, 0.088, &rules).unwrap();
            }
            let bf = t0.elapsed().as_secs_f64() * 1e3;
            let t0 = std::time::Instant::now();
            for ((kc, ks), (vc, vs)) in &quant {
                // `None` (portable set): callers dequantize; then only the BF16 figure means anything.
                attention(&q, (kc, ks), (vc, vs), 0.088, &rules, &[]).unwrap();
            }
            let q8 = t0.elapsed().as_secs_f64() * 1e3;
            eprintln!("round {round}: {layers} layers, bf16 cache {bf:.1} ms, 8-bit cache {q8:.1} ms");
        }
    }

    #[test]
    #[ignore = "benchmark: cargo test --release -p videollava --lib kv_quant::tests::bench_decode_shared -- --ignored --nocapture"]
    fn bench_decode_shared() {
        // 8 rows about one video (the 7B shapes, 2,074 positions, the first 2,060 shared), 32
        // layers: each row read alone against the shared positions read once for all.
        let (b, h, t, d, layers, len) = (8, 32, 2074, 128, 32, 2060);
        let key_valid = vec![1u32; b * t];
        let rules = MaskRules { key_valid: &key_valid, past: t - 1, causal: true, sliding_window: None };
        let q = rand_tensor((b, h, 1, d), 9, DType::BF16);
        let rows = |x: Tensor| Tensor::cat(&vec![&x; b], 0).unwrap();
        let cache: Vec<_> = (0..layers)
            .map(|i| {
                let (kc, ks) = quantize(&rand_tensor((1, h, t, d), 10 + i, DType::BF16)).unwrap();
                let (vc, vs) = quantize(&rand_tensor((1, h, t, d), 100 + i, DType::BF16)).unwrap();
                ((rows(kc), rows(ks)), (rows(vc), rows(vs)))
            })
            .collect();
        let shared = [SharedPrefix { rows: (0..b).map(|bi| (bi, 0)).collect(), len }];
        for round in 0..5 {
            let mut ms = [0f64; 2];
            for (x, groups) in [&[][..], &shared[..]].into_iter().enumerate() {
                let t0 = std::time::Instant::now();
                for ((kc, ks), (vc, vs)) in &cache {
                    attention(&q, (kc, ks), (vc, vs), 0.088, &rules, groups).unwrap().expect("kernel applies");
                }
                ms[x] = t0.elapsed().as_secs_f64() * 1e3;
            }
            eprintln!("round {round}: {b} rows, {layers} layers, alone {:.1} ms, shared {:.1} ms", ms[0], ms[1]);
        }
    }
}
