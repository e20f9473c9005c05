//! How the blocked GEMMs (BF16 and int8) cut `out` into parallel tasks, and the int8 GEMMs their
//! activations into packing jobs.

use std::cell::RefCell;
use std::thread::LocalKey;

use rayon::prelude::*;

/// Column stripes of about `nc_panels` micro-panels of `nr` columns, as many per thread; the row
/// tiles split too when there are too few stripes for every thread (and some balancing).
pub(crate) struct TaskGrid {
    n: usize,
    nr: usize,
    panels: usize,
    n_split: usize,
    m_split: usize,
    m_tiles: usize,
    tiles_per_task: usize,
}

impl TaskGrid {
    pub(crate) fn new(n: usize, nr: usize, nc_panels: usize, m_tiles: usize) -> Self {
        let threads = rayon::current_num_threads().max(1);
        let panels = n.div_ceil(nr);
        let n_split = (panels.div_ceil(nc_panels).div_ceil(threads) * threads).min(panels);
        let want = 4 * threads;
        let m_split = if n_split >= want { 1 } else { want.div_ceil(n_split).min(m_tiles) };
        let tiles_per_task = m_tiles.div_ceil(m_split);
        let m_split = m_tiles.div_ceil(tiles_per_task);
        Self { n, nr, panels, n_split, m_split, m_tiles, tiles_per_task }
    }

    /// Number of tasks.
    pub(crate) fn tasks(&self) -> usize {
        self.n_split * self.m_split
    }

    /// Runs every task in parallel as `f(j0, j1, t0, t1, scratch)`, with this thread's buffer of
    /// `scratch` (kept between calls), or a fresh one where that buffer is already borrowed (a
    /// task that waits inside rayon may run another on the same thread).
    pub(crate) fn run<T: 'static>(
        &self,
        scratch: &'static LocalKey<RefCell<Vec<T>>>,
        f: impl Fn(usize, usize, usize, usize, &mut Vec<T>) + Sync,
    ) {
        (0..self.tasks()).into_par_iter().for_each(|t| {
            let (j0, j1, t0, t1) = self.task(t);
            scratch.with(|cell| match cell.try_borrow_mut() {
                Ok(mut buf) => f(j0, j1, t0, t1, &mut buf),
                Err(_) => f(j0, j1, t0, t1, &mut Vec::new()),
            });
        });
    }

    /// Task `t`'s output columns `j0..j1` and row tiles `t0..t1`.
    pub(crate) fn task(&self, t: usize) -> (usize, usize, usize, usize) {
        let (js, ms) = (t / self.m_split, t % self.m_split);
        let j0 = js * self.panels / self.n_split * self.nr;
        let j1 = self.n.min((js + 1) * self.panels / self.n_split * self.nr);
        let t0 = ms * self.tiles_per_task;
        (j0, j1, t0, self.m_tiles.min(t0 + self.tiles_per_task))
    }
}

/// The packing jobs of the int8 GEMMs' activations: `apack` (`m_tiles · nb · a_blk` bytes, `nb`
/// blocks of `a_blk` bytes per row tile) cut by k-chunk of up to `kcb` blocks, then by up to
/// `tiles` row tiles. Within the k-chunk of `kc` blocks starting at block `pc`, tile `t` is at
/// `pc · m_tiles · a_blk + t · kc · a_blk`. A job: (`pc`, `kc`, its first tile, its tiles, its
/// region).
pub(crate) fn activation_jobs(
    apack: &mut [u8],
    nb: usize,
    m_tiles: usize,
    kcb: usize,
    tiles: usize,
    a_blk: usize,
) -> Vec<(usize, usize, usize, usize, &mut [u8])> {
    let mut jobs = Vec::new();
    let mut rest = apack;
    let mut pc = 0;
    while pc < nb {
        let kc = kcb.min(nb - pc);
        let mut t = 0;
        while t < m_tiles {
            let n = tiles.min(m_tiles - t);
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n * kc * a_blk);
            jobs.push((pc, kc, t, n, head));
            rest = tail;
            t += n;
        }
        pc += kc;
    }
    jobs
}
