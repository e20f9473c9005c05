//! How the blocked GEMMs (BF16 and int8, AVX-512) cut `out` into parallel tasks.

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
