//! One layer's key/value cache ([`KvBuffer`]): preallocated buffers that grow geometrically, so a
//! decode step copies only its own token. They hold the compute dtype, or 8-bit codes
//! (`--kv-cache q8_0`, [`crate::kernels::kv_quant`], whose decode kernel reads them in place).

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::kernels::kv_quant::{self, KvCacheFormat};

/// One layer's keys and values, `[B, kv_heads, capacity, head_dim]`, the first `len` positions
/// filled: in the compute dtype ([`KvCacheFormat::Model`]), or as 8-bit codes plus f32 block
/// scales ([`KvCacheFormat::Q8_0`], see [`crate::kernels::kv_quant`]). Appending writes in place and grows
/// the capacity geometrically (by at least 256 positions or an eighth, in multiples of 256), so a
/// decode step copies only the new token. Clones share the buffers until one of them appends
/// (copy on write).
#[derive(Debug, Clone)]
pub struct KvBuffer {
    /// `[k, v]` in the compute dtype, or `[key codes, value codes, key scales, value scales]`;
    /// all `[B, kv_heads, capacity, _]`.
    parts: Vec<Tensor>,
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
        let len = parts[0].dim(2)?;
        Ok(Self { parts, format, dtype, len, owner: Arc::new(()) })
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
                Ok(Tensor::zeros((b, h, cap, d), p.dtype(), p.device())?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut buf = Self { parts, format, dtype: k.dtype(), len: 0, owner: Arc::new(()) };
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

    fn filled(&self, i: usize) -> Result<Tensor> {
        Ok(self.parts[i].narrow(2, 0, self.len)?)
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
        let (bb, hb, _, _) = self.parts[0].dims4()?;
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
            for i in 0..self.parts.len() {
                let p = &self.parts[i];
                let (b, h, _, d) = p.dims4()?;
                let grown = Tensor::zeros((b, h, new_cap, d), p.dtype(), p.device())?;
                if self.len > 0 {
                    grown.slice_set(&self.filled(i)?.contiguous()?, 2, 0)?;
                }
                self.parts[i] = grown;
            }
            self.owner = Arc::new(());
        }
        if l > 0 {
            for (p, n) in self.parts.iter().zip(new) {
                p.slice_set(n, 2, self.len)?;
            }
        }
        self.len = needed;
        Ok(())
    }

    /// Keeps batch rows `idx` (u32 `[n]`), keeping the capacity.
    pub fn index_rows(&self, idx: &Tensor) -> Result<Self> {
        let parts = self.parts.iter().map(|p| p.index_select(idx, 0)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { parts, format: self.format, dtype: self.dtype, len: self.len, owner: Arc::new(()) })
    }

    /// The rows of `a` then those of `b`, each left-padded (zeros) to `t` positions (`t` at
    /// least both lengths), without spare capacity.
    pub fn stack_left_padded(a: &Self, b: &Self, t: usize) -> Result<Self> {
        if a.format != b.format || a.dtype != b.dtype || a.parts.len() != b.parts.len() {
            return Err(Error::Model("cannot merge caches of different formats".into()));
        }
        let pad = |x: Tensor, len: usize| -> Result<Tensor> {
            if len == t {
                return Ok(x);
            }
            let (bb, h, _, d) = x.dims4()?;
            let z = Tensor::zeros((bb, h, t - len, d), x.dtype(), x.device())?;
            Ok(Tensor::cat(&[&z, &x], 2)?)
        };
        let parts = (0..a.parts.len())
            .map(|i| Ok(Tensor::cat(&[&pad(a.filled(i)?, a.len)?, &pad(b.filled(i)?, b.len)?], 0)?))
            .collect::<Result<Vec<_>>>()?;
        Self::from_filled_parts(parts, a.format, a.dtype)
    }

    /// Positions `start..start + len` as a buffer of their own (copied, no spare capacity).
    pub fn narrow_positions(&self, start: usize, len: usize) -> Result<Self> {
        if start + len > self.len {
            return Err(Error::Model(format!("positions {start}..{} of a {}-position cache", start + len, self.len)));
        }
        let parts = (0..self.parts.len())
            .map(|i| Ok(self.parts[i].narrow(2, start, len)?.contiguous()?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { parts, format: self.format, dtype: self.dtype, len, owner: Arc::new(()) })
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
                let (b, h, _, d) = p.dims4()?;
                Ok(Tensor::zeros((b, h, cap, d), p.dtype(), p.device())?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut joined = Self { parts, format: first.format, dtype: first.dtype, len: 0, owner: Arc::new(()) };
        for piece in pieces {
            if piece.format != joined.format || piece.dtype != joined.dtype || piece.parts.len() != joined.parts.len() {
                return Err(Error::Model("cannot join caches of different formats".into()));
            }
            let filled = (0..piece.parts.len()).map(|i| piece.filled(i)).collect::<Result<Vec<_>>>()?;
            joined.append_parts(&filled)?;
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
        // Merge with left padding, then drop the common padding.
        let merged = KvBuffer::stack_left_padded(&q, &snapshot, 6).unwrap();
        let dense_merged =
            KvBuffer::stack_left_padded(&dense, &KvBuffer::new(&round_trip(&k1), &round_trip(&v1)).unwrap(), 6)
                .unwrap();
        assert_eq!(merged.len(), 6);
        assert_eq!(flat(&merged.keys().unwrap()), flat(&dense_merged.keys().unwrap()));
        assert_eq!(flat(&merged.values().unwrap()), flat(&dense_merged.values().unwrap()));
        let dropped = merged.drop_front(1).unwrap();
        assert_eq!(flat(&dropped.values().unwrap()), flat(&dense_merged.drop_front(1).unwrap().values().unwrap()));
        // Formats do not mix.
        assert!(KvBuffer::stack_left_padded(&q, &dense, 6).is_err());
        let idx = Tensor::new(&[1u32, 0], &dev).unwrap();
        let swapped = merged.index_rows(&idx).unwrap();
        assert_eq!(flat(&swapped.keys().unwrap().get(1).unwrap()), flat(&merged.keys().unwrap().get(0).unwrap()));
    }
}
