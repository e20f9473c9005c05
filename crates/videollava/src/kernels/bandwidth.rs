//! The machine's memory read bandwidth, measured: what bounds decoding, where every step reads
//! all the weights once.

use std::time::Instant;

use rayon::prelude::*;

/// Best of `passes` parallel reads of a `bytes` buffer (rayon's global pool, each thread summing
/// its contiguous share as u64 words), in bytes per second. The buffer should be several times
/// the last-level cache so that the reads come from memory; it is written once first (touched
/// pages, not the OS's shared zero page).
pub fn read_bandwidth(bytes: usize, passes: usize) -> f64 {
    let words = (bytes / 8).max(1);
    let mut buf = vec![0u64; words];
    buf.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| c.iter_mut().for_each(|x| *x = i as u64));
    let threads = rayon::current_num_threads().max(1);
    let share = words.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        let sum: u64 = buf.par_chunks(share).map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x))).sum();
        let s = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / s);
    }
    best
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_a_positive_finite_rate() {
        let bw = super::read_bandwidth(8 << 20, 2);
        assert!(bw.is_finite() && bw > 1e8, "{bw} B/s");
    }
}
