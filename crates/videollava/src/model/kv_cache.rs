//! One layer's key/value cache ([`KvBuffer`]): preallocated buffers that grow geometrically, so a
//! decode step copies only its own token. They hold the compute dtype, or 8-bit codes
//! (`--kv-cache q8_0`, [`crate::kernels::kv_quant`], whose decode kernel reads them in place).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::kv_quant::{self, KvCacheFormat};

/// One layer's keys and values, `[B, kv_heads, capacity, head_dim]`, the first `len` positions
/// filled: in the compute dtype ([`KvCacheFormat::Model`]), or as 8-bit codes plus f32 block
/// scales ([`KvCacheFormat::Q8_0`], see [`crate::kernels::kv_quant`]). Appending writes in place and grows
/// the capacity geometrically (by at least 256 positions or an eighth, in multiples of 256), so a
/// decode step copies only the new token. The buffers may also hold room for more batch rows
/// than the `B` in use ([`Self::append_rows`]), so a request joining a running batch copies only
/// its own row. Clones share the buffers until one of them appends (copy on write).
#[derive(Debug, Clone)]
pub struct KvBuffer {
    /// `[k, v]` in the compute dtype, or `[key codes, value codes, key scales, value scales]`;
    /// all `[B, kv_heads, capacity, _]`.
    parts: Vec<Tensor>,
    /// Batch rows in use: the first `rows` of the buffers' first dimension.
    rows: usize,
    format: KvCacheFormat,
    /// The dtype keys and values are read back in ([`Self::keys`]).
    dtype: DType,
    len: usize,
    /// Shared by clones: an append with other owners copies the buffers first.
    owner: Arc<()>,
}

/// Capacity steps of [`KvBuffer`].
const CAPACITY_STEP: usize = 256;

/// The capacity after `cap` when `needed` positions must fit: at least an eighth or 256 more,
/// in multiples of 256 (at most ~12.5% + 256 positions of spare room).
fn grown_capacity(cap: usize, needed: usize) -> usize {
    needed.max(cap + (cap / 8).max(CAPACITY_STEP)).next_multiple_of(CAPACITY_STEP)
}

/// Zeros of `shape`, left to the OS to provide on first touch: the room a buffer keeps for
/// positions and rows costs no memory until written (candle's `Tensor::zeros` writes every BF16
/// and F16 element, which would make a batch's room for 8 rows of 7B keys/values resident at once).
fn lazy_zeros(shape: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Ok(match (dtype, device) {
        (DType::BF16, Device::Cpu) => Tensor::from_vec(bytemuck::zeroed_vec::<half::bf16>(n), shape, device)?,
        (DType::F16, Device::Cpu) => Tensor::from_vec(bytemuck::zeroed_vec::<half::f16>(n), shape, device)?,
        // `vec![0; n]` of these is already a zeroed allocation.
        _ => Tensor::zeros(shape, dtype, device)?,
    })
}

/// Copies `src` (`[r, h, l, d]`, any strides along the positions) into rows `row0..row0 + r`,
/// positions `col..col + l` of the contiguous `dst` (`[R, h, capacity, d]`), one `(row, head)`
/// run of `l * d` values at a time (no intermediate copy of `src`).
fn copy_positions(dst: &Tensor, row0: usize, col: usize, src: &Tensor) -> Result<()> {
    let (r, h, l, _) = src.dims4()?;
    if l == 0 {
        return Ok(());
    }
    for row in 0..r {
        let (d_row, s_row) = (dst.narrow(0, row0 + row, 1)?, src.narrow(0, row, 1)?);
        for head in 0..h {
            // `[1, 1, l, d]` views: contiguous whatever the capacity of `src`.
            d_row.narrow(1, head, 1)?.slice_set(&s_row.narrow(1, head, 1)?, 2, col)?;
        }
    }
    Ok(())
}

/// How many leading rows of `run` bytes `x` and `y` (of equal length) have in common.
fn equal_rows(x: &[u8], y: &[u8], run: usize) -> usize {
    // Whole chunks by `memcmp` first; the row that differs is found inside the first unequal one.
    const CHUNK_ROWS: usize = 64;
    let mut n = 0;
    for (cx, cy) in x.chunks(CHUNK_ROWS * run).zip(y.chunks(CHUNK_ROWS * run)) {
        if cx == cy {
            n += cx.len() / run;
            continue;
        }
        return n + cx.chunks(run).zip(cy.chunks(run)).take_while(|(a, b)| a == b).count();
    }
    n
}

impl KvBuffer {
    /// `k`, `v` `[B, kv_heads, L, head_dim]` as stored in `format`.
    fn encode(k: &Tensor, v: &Tensor, format: KvCacheFormat) -> Result<Vec<Tensor>> {
        if k.dims4()? != v.dims4()? {
            return Err(Error::Model(format!("keys {:?} and values {:?} differ in shape", k.dims(), v.dims())));
        }
        Ok(match format {
            KvCacheFormat::Model => vec![k.contiguous()?, v.contiguous()?],
            KvCacheFormat::Q8_0 => {
                let (kc, ks) = kv_quant::quantize(k)?;
                let (vc, vs) = kv_quant::quantize(v)?;
                vec![kc, vc, ks, vs]
            }
        })
    }

    /// A buffer holding exactly `k`, `v` `[B, kv_heads, T, head_dim]` in the compute dtype (no
    /// spare capacity).
    pub fn from_filled(k: Tensor, v: Tensor) -> Result<Self> {
        let dtype = k.dtype();
        Self::from_filled_parts(Self::encode(&k, &v, KvCacheFormat::Model)?, KvCacheFormat::Model, dtype)
    }

    fn from_filled_parts(parts: Vec<Tensor>, format: KvCacheFormat, dtype: DType) -> Result<Self> {
        let parts = parts.into_iter().map(|p| p.contiguous()).collect::<candle_core::Result<Vec<_>>>()?;
        let (rows, _, len, _) = parts[0].dims4()?;
        Ok(Self { parts, rows, format, dtype, len, owner: Arc::new(()) })
    }

    /// A buffer filled with `k`, `v` `[B, kv_heads, L, head_dim]` in the compute dtype, with spare
    /// capacity.
    pub fn new(k: &Tensor, v: &Tensor) -> Result<Self> {
        Self::with_format(k, v, KvCacheFormat::Model)
    }

    /// As [`Self::new`], stored in `format`.
    pub fn with_format(k: &Tensor, v: &Tensor, format: KvCacheFormat) -> Result<Self> {
        let encoded = Self::encode(k, v, format)?;
        let l = k.dim(2)?;
        let cap = grown_capacity(0, l);
        let parts = encoded
            .iter()
            .map(|p| {
                let (b, h, _, d) = p.dims4()?;
                lazy_zeros((b, h, cap, d), p.dtype(), p.device())
            })
            .collect::<Result<Vec<_>>>()?;
        let rows = k.dim(0)?;
        let mut buf = Self { parts, rows, format, dtype: k.dtype(), len: 0, owner: Arc::new(()) };
        buf.append_parts(&encoded)?;
        Ok(buf)
    }

    /// How the keys and values are stored.
    pub fn format(&self) -> KvCacheFormat {
        self.format
    }

    /// Number of filled positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated positions.
    pub fn capacity(&self) -> usize {
        self.parts[0].dim(2).unwrap_or(0)
    }

    /// Bytes held by the buffers (all allocated positions).
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.elem_count() * p.dtype().size_in_bytes()).sum()
    }

    /// Batch rows in use.
    pub fn batch_rows(&self) -> usize {
        self.rows
    }

    /// Batch rows the buffers have room for.
    pub fn row_capacity(&self) -> usize {
        self.parts[0].dim(0).unwrap_or(0)
    }

    /// Part `i`'s rows in use, all allocated positions (contiguous: the rows come first).
    fn live(&self, i: usize) -> Result<Tensor> {
        let p = &self.parts[i];
        Ok(if p.dim(0)? == self.rows { p.clone() } else { p.narrow(0, 0, self.rows)? })
    }

    fn filled(&self, i: usize) -> Result<Tensor> {
        Ok(self.live(i)?.narrow(2, 0, self.len)?)
    }

    /// The filled keys `[B, kv_heads, len, head_dim]` in the compute dtype: a strided view of
    /// the buffer, or (8-bit) a dequantized copy.
    pub fn keys(&self) -> Result<Tensor> {
        match self.format {
            KvCacheFormat::Model => self.filled(0),
            KvCacheFormat::Q8_0 => kv_quant::dequantize(&self.filled(0)?, &self.filled(2)?, self.dtype),
        }
    }

    /// The filled values, as [`Self::keys`].
    pub fn values(&self) -> Result<Tensor> {
        match self.format {
            KvCacheFormat::Model => self.filled(1),
            KvCacheFormat::Q8_0 => kv_quant::dequantize(&self.filled(1)?, &self.filled(3)?, self.dtype),
        }
    }

    /// 8-bit buffers: views of the filled `(key codes, key scales)` and `(value codes, value
    /// scales)` for [`kv_quant::attention`].
    #[allow(clippy::type_complexity)]
    pub fn q8_views(&self) -> Result<Option<((Tensor, Tensor), (Tensor, Tensor))>> {
        if self.format != KvCacheFormat::Q8_0 {
            return Ok(None);
        }
        Ok(Some(((self.filled(0)?, self.filled(2)?), (self.filled(1)?, self.filled(3)?))))
    }

    /// Appends `k`, `v` `[B, kv_heads, L, head_dim]` (compute dtype) after the filled positions.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, h, _, d) = k.dims4()?;
        let (_, hb, _, _) = self.parts[0].dims4()?;
        let bb = self.rows;
        let db = self.parts[0].dim(3)?;
        if v.dims4()? != k.dims4()? || (b, h, d) != (bb, hb, db) || k.dtype() != self.dtype {
            return Err(Error::Model(format!(
                "cannot append keys {:?} / values {:?} ({:?}) to a cache of {:?} ({:?}, {})",
                k.dims(),
                v.dims(),
                k.dtype(),
                self.parts[0].dims(),
                self.dtype,
                self.format
            )));
        }
        let encoded = Self::encode(k, v, self.format)?;
        self.append_parts(&encoded)
    }

    /// Appends already encoded parts (same order and widths as `self.parts`).
    fn append_parts(&mut self, new: &[Tensor]) -> Result<()> {
        let l = new[0].dim(2)?;
        let needed = self.len + l;
        let cap = self.capacity();
        if needed > cap || Arc::strong_count(&self.owner) > 1 {
            let new_cap = if needed > cap { grown_capacity(cap, needed) } else { cap };
            self.regrow(self.parts[0].dim(0)?, new_cap, 0)?;
        }
        if l > 0 {
            for (i, n) in new.iter().enumerate() {
                self.live(i)?.slice_set(n, 2, self.len)?;
            }
        }
        self.len = needed;
        Ok(())
    }

    /// Moves the buffers to new ones of `row_capacity` rows and `capacity` positions, the filled
    /// positions of the rows in use starting at position `shift` (zeros before them): one copy,
    /// straight from the old buffers.
    fn regrow(&mut self, row_capacity: usize, capacity: usize, shift: usize) -> Result<()> {
        // The parts on every thread: the copy into fresh pages is mostly the kernel clearing them.
        self.parts = (0..self.parts.len())
            .into_par_iter()
            .map(|i| {
                let p = &self.parts[i];
                let (_, h, _, d) = p.dims4()?;
                let grown = lazy_zeros((row_capacity.max(self.rows), h, capacity, d), p.dtype(), p.device())?;
                copy_positions(&grown, 0, shift, &self.filled(i)?)?;
                Ok(grown)
            })
            .collect::<Result<Vec<_>>>()?;
        self.len += shift;
        self.owner = Arc::new(());
        Ok(())
    }

    /// Adds the rows of `other` after this buffer's rows, both left-padded (zeros) to `t`
    /// positions (`t` at least both lengths). When the buffers have room for the rows and the
    /// positions (see `room_for_rows`), and no rows need shifting (`t` is this buffer's length),
    /// only `other` is copied; otherwise everything moves to new buffers with room for
    /// `room_for_rows` rows and spare positions.
    pub fn append_rows(&mut self, other: &Self, t: usize, room_for_rows: usize) -> Result<()> {
        if self.format != other.format || self.dtype != other.dtype || self.parts.len() != other.parts.len() {
            return Err(Error::Model("cannot merge caches of different formats".into()));
        }
        if t < self.len || t < other.len {
            return Err(Error::Model(format!("cannot pad caches of {} and {} positions to {t}", self.len, other.len)));
        }
        let rows = self.rows + other.rows;
        let in_place = t == self.len
            && rows <= self.parts[0].dim(0)?
            && t <= self.capacity()
            && Arc::strong_count(&self.owner) == 1;
        if !in_place {
            let cap = grown_capacity(0, t).max(self.capacity());
            self.regrow(room_for_rows.max(rows), cap, t - self.len)?;
        }
        // Rows past `rows` were never written (buffers start as zeros and only shrink in rows by
        // moving), so the padding before `other`'s positions is zeros already.
        for i in 0..self.parts.len() {
            copy_positions(&self.parts[i], self.rows, t - other.len, &other.filled(i)?)?;
        }
        self.rows = rows;
        Ok(())
    }

    /// How many positions, from cache index `a.1` of row `a.0` and `b.1` of row `b.0` on (at
    /// most `max`), both rows hold the same bits in every part: keys and values (and scales)
    /// computed from the same tokens and media, e.g. copied from one cached prefix. 0 for
    /// buffers off the CPU.
    pub fn common_positions(&self, a: (usize, usize), b: (usize, usize), max: usize) -> Result<usize> {
        if a.0 >= self.rows || b.0 >= self.rows {
            return Err(Error::Model(format!("rows {} and {} of a {}-row cache", a.0, b.0, self.rows)));
        }
        let mut n = max.min(self.len.saturating_sub(a.1.max(b.1)));
        for part in &self.parts {
            let (_, heads, cap, width) = part.dims4()?;
            let (guard, layout) = part.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*guard else { return Ok(0) };
            if !layout.is_contiguous() {
                return Ok(0);
            }
            let bytes: &[u8] = match cpu {
                candle_core::CpuStorage::U8(v) => v,
                candle_core::CpuStorage::F32(v) => bytemuck::cast_slice(v),
                candle_core::CpuStorage::BF16(v) => bytemuck::cast_slice(v),
                candle_core::CpuStorage::F16(v) => bytemuck::cast_slice(v),
                _ => return Ok(0),
            };
            let run = width * part.dtype().size_in_bytes();
            let bytes = &bytes[layout.start_offset() * part.dtype().size_in_bytes()..];
            for head in 0..heads {
                if n == 0 {
                    return Ok(0);
                }
                let at = |(row, pos): (usize, usize)| ((row * heads + head) * cap + pos) * run;
                let (x, y) = (&bytes[at(a)..][..n * run], &bytes[at(b)..][..n * run]);
                n = equal_rows(x, y, run);
            }
        }
        Ok(n)
    }

    /// Keeps batch rows `idx` (u32 `[n]`), keeping the capacity.
    pub fn index_rows(&self, idx: &Tensor) -> Result<Self> {
        let parts = self.parts.iter().map(|p| p.index_select(idx, 0)).collect::<candle_core::Result<Vec<_>>>()?;
        let rows = idx.dim(0)?;
        Ok(Self { parts, rows, format: self.format, dtype: self.dtype, len: self.len, owner: Arc::new(()) })
    }

    /// Positions `start..start + len` as a buffer of their own (copied, no spare capacity).
    pub fn narrow_positions(&self, start: usize, len: usize) -> Result<Self> {
        if start + len > self.len {
            return Err(Error::Model(format!("positions {start}..{} of a {}-position cache", start + len, self.len)));
        }
        let parts = (0..self.parts.len())
            .map(|i| Ok(self.live(i)?.narrow(2, start, len)?.contiguous()?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { parts, rows: self.rows, format: self.format, dtype: self.dtype, len, owner: Arc::new(()) })
    }

    /// The first `n` positions, sharing this buffer (no copy; an append to either copies first).
    pub fn truncated(&self, n: usize) -> Result<Self> {
        if n > self.len {
            return Err(Error::Model(format!("the first {n} positions of a {}-position cache", self.len)));
        }
        Ok(Self { len: n, ..self.clone() })
    }

    /// The positions of `pieces` one after another (same rows, format and dtype), with spare
    /// capacity for appending.
    pub fn concat_positions(pieces: &[&Self]) -> Result<Self> {
        let first = pieces.first().ok_or_else(|| Error::Model("no cache pieces to join".into()))?;
        let cap = grown_capacity(0, pieces.iter().map(|p| p.len).sum());
        let parts = first
            .parts
            .iter()
            .map(|p| {
                let (_, h, _, d) = p.dims4()?;
                lazy_zeros((first.rows, h, cap, d), p.dtype(), p.device())
            })
            .collect::<Result<Vec<_>>>()?;
        let mut joined =
            Self { parts, rows: first.rows, format: first.format, dtype: first.dtype, len: 0, owner: Arc::new(()) };
        for piece in pieces {
            if piece.format != joined.format || piece.dtype != joined.dtype || piece.parts.len() != joined.parts.len() {
                return Err(Error::Model("cannot join caches of different formats".into()));
            }
            if piece.rows != joined.rows {
                return Err(Error::Model("cannot join caches of different batch sizes".into()));
            }
            for i in 0..piece.parts.len() {
                copy_positions(&joined.parts[i], 0, joined.len, &piece.filled(i)?)?;
            }
            joined.len += piece.len;
        }
        Ok(joined)
    }

    /// The filled parts as stored (see [`Self::from_stored_parts`]): `[k, v]`, or (8-bit)
    /// `[key codes, value codes, key scales, value scales]`, each `[B, kv_heads, len, _]`.
    pub fn stored_parts(&self) -> Result<Vec<Tensor>> {
        (0..self.parts.len()).map(|i| self.filled(i)).collect()
    }

    /// A buffer from parts as [`Self::stored_parts`] returns them; `dtype` is the compute dtype
    /// keys and values are read back in.
    pub fn from_stored_parts(parts: Vec<Tensor>, format: KvCacheFormat, dtype: DType) -> Result<Self> {
        let want = match format {
            KvCacheFormat::Model => 2,
            KvCacheFormat::Q8_0 => 4,
        };
        if parts.len() != want {
            return Err(Error::Model(format!("a {format} cache has {want} parts, got {}", parts.len())));
        }
        let (b, h, l, _) = parts[0].dims4()?;
        for p in &parts {
            let (pb, ph, pl, _) = p.dims4()?;
            if (pb, ph, pl) != (b, h, l) {
                return Err(Error::Model(format!("cache parts {:?} and {:?} disagree", parts[0].dims(), p.dims())));
            }
        }
        if format == KvCacheFormat::Model && (parts[0].dtype() != dtype || parts[1].dtype() != dtype) {
            return Err(Error::Model(format!("cache parts are {:?}, expected {dtype:?}", parts[0].dtype())));
        }
        Self::from_filled_parts(parts, format, dtype)
    }

    /// The compute dtype keys and values are read back in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Drops the first `n` positions (no spare capacity left).
    pub fn drop_front(&self, n: usize) -> Result<Self> {
        let n = n.min(self.len);
        let parts = (0..self.parts.len())
            .map(|i| Ok(self.filled(i)?.narrow(2, n, self.len - n)?))
            .collect::<Result<Vec<_>>>()?;
        Self::from_filled_parts(parts, self.format, self.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn kv_buffer_appends_in_place_and_grows() {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 2.0 * 3.0 * 4.0, &dev).unwrap().reshape((1, 2, 3, 4)).unwrap();
        let mut buf = KvBuffer::new(&a, &a).unwrap();
        assert_eq!((buf.len(), buf.capacity()), (3, CAPACITY_STEP));
        let snapshot = buf.clone();
        let one = Tensor::ones((1, 2, 1, 4), DType::F32, &dev).unwrap();
        buf.append(&one, &one).unwrap();
        assert_eq!(buf.len(), 4);
        // The clone is untouched (copy on write) and still reads its 3 positions.
        assert_eq!(
            snapshot.keys().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..24).map(|x| x as f32).collect::<Vec<_>>()
        );
        let keys = buf.keys().unwrap();
        assert_eq!(keys.dims(), &[1, 2, 4, 4]);
        let want = Tensor::cat(&[&a, &one], 2).unwrap();
        assert_eq!(
            keys.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let big = Tensor::zeros((1, 2, CAPACITY_STEP, 4), DType::F32, &dev).unwrap();
        buf.append(&big, &big).unwrap();
        assert_eq!(buf.len(), 4 + CAPACITY_STEP);
        assert_eq!(buf.capacity(), 2 * CAPACITY_STEP);
        let head = buf.keys().unwrap().narrow(2, 0, 4).unwrap();
        assert_eq!(
            head.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn q8_kv_buffer_appends_merges_and_drops_like_the_dense_one() {
        let dev = Device::Cpu;
        let x = |l: usize, seed: f32| {
            Tensor::arange(0f32, (2 * l * 32) as f32, &dev)
                .unwrap()
                .affine(0.37, seed as f64)
                .unwrap()
                .sin()
                .unwrap()
                .reshape((1, 2, l, 32))
                .unwrap()
        };
        let round_trip = |t: &Tensor| {
            let (c, s) = kv_quant::quantize(t).unwrap();
            kv_quant::dequantize(&c, &s, DType::F32).unwrap()
        };
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (k1, v1, k2, v2) = (x(5, 0.0), x(5, 1.0), x(1, 2.0), x(1, 3.0));
        let mut q = KvBuffer::with_format(&k1, &v1, KvCacheFormat::Q8_0).unwrap();
        let mut dense = KvBuffer::new(&round_trip(&k1), &round_trip(&v1)).unwrap();
        assert_eq!(q.format(), KvCacheFormat::Q8_0);
        let snapshot = q.clone();
        q.append(&k2, &v2).unwrap();
        dense.append(&round_trip(&k2), &round_trip(&v2)).unwrap();
        assert_eq!(flat(&q.keys().unwrap()), flat(&dense.keys().unwrap()));
        assert_eq!(flat(&q.values().unwrap()), flat(&dense.values().unwrap()));
        assert_eq!(snapshot.len(), 5, "the clone keeps its own buffers");
        assert_eq!(flat(&snapshot.keys().unwrap()), flat(&round_trip(&k1)));
        // 56% of the bytes of BF16 per position (here f32 input: codes + one f32 per 32 values).
        assert_eq!(q.bytes(), 2 * (2 * q.capacity() * 32 + 2 * q.capacity() * 4));
        // Merge with left padding (the first time into new buffers with room for 3 rows, then in
        // place), then drop the common padding.
        let mut merged = q.clone();
        merged.append_rows(&snapshot, 6, 3).unwrap();
        let dense1 = KvBuffer::new(&round_trip(&k1), &round_trip(&v1)).unwrap();
        let mut dense_merged = dense.clone();
        dense_merged.append_rows(&dense1, 6, 3).unwrap();
        assert_eq!((merged.len(), merged.batch_rows()), (6, 2));
        assert_eq!(flat(&merged.keys().unwrap()), flat(&dense_merged.keys().unwrap()));
        assert_eq!(flat(&merged.values().unwrap()), flat(&dense_merged.values().unwrap()));
        let before = merged.bytes();
        merged.append_rows(&snapshot, 6, 3).unwrap();
        dense_merged.append_rows(&dense1, 6, 3).unwrap();
        assert_eq!((merged.batch_rows(), merged.bytes()), (3, before), "the third row went in place");
        assert_eq!(flat(&merged.keys().unwrap()), flat(&dense_merged.keys().unwrap()));
        // Row 0 is the 6-position `q`, rows 1 and 2 the 5-position snapshot after one zero.
        let row = |b: &KvBuffer, r: usize| flat(&b.keys().unwrap().get(r).unwrap());
        assert_eq!(row(&merged, 0), flat(&q.keys().unwrap()));
        let padded =
            Tensor::cat(&[&Tensor::zeros((1, 2, 1, 32), DType::F32, &dev).unwrap(), &snapshot.keys().unwrap()], 2)
                .unwrap();
        assert_eq!(row(&merged, 1), flat(&padded));
        assert_eq!(row(&merged, 2), flat(&padded));
        // A longer row moves the others right.
        let mut longer = KvBuffer::with_format(&x(8, 4.0), &x(8, 5.0), KvCacheFormat::Q8_0).unwrap();
        longer.append_rows(&merged, 8, 0).unwrap();
        let mut shifted = merged.clone();
        shifted
            .append_rows(&KvBuffer::with_format(&x(8, 4.0), &x(8, 5.0), KvCacheFormat::Q8_0).unwrap(), 8, 0)
            .unwrap();
        assert_eq!((shifted.len(), shifted.batch_rows()), (8, 4));
        assert_eq!(row(&shifted, 0)[..2 * 32], vec![0.0; 2 * 32][..]);
        assert_eq!(row(&shifted, 3), row(&longer, 0));
        assert_eq!(row(&shifted, 1), row(&longer, 2));
        // Appending after an in-place merge writes the rows in use only.
        let (k3, v3) = (Tensor::cat(&[&k2, &k2, &k2], 0).unwrap(), Tensor::cat(&[&v2, &v2, &v2], 0).unwrap());
        merged.append(&k3, &v3).unwrap();
        dense_merged.append(&round_trip(&k3), &round_trip(&v3)).unwrap();
        assert_eq!(flat(&merged.values().unwrap()), flat(&dense_merged.values().unwrap()));
        assert!(merged.append(&k2, &v2).is_err(), "one row appended to three");
        let dropped = merged.drop_front(1).unwrap();
        assert_eq!(flat(&dropped.values().unwrap()), flat(&dense_merged.drop_front(1).unwrap().values().unwrap()));
        // Formats do not mix.
        assert!(q.clone().append_rows(&dense, 6, 2).is_err());
        let idx = Tensor::new(&[1u32, 0], &dev).unwrap();
        let swapped = merged.index_rows(&idx).unwrap();
        assert_eq!(flat(&swapped.keys().unwrap().get(1).unwrap()), flat(&merged.keys().unwrap().get(0).unwrap()));
    }
}
