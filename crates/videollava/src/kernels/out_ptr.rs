//! The output pointer the kernels' parallel tasks share.

/// The output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);
// SAFETY: every task writes a set of elements no other task touches, and the pointer outlives the
// parallel loop (the loops end before the functions that made it return).
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`: shared use only writes disjoint elements.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    // A method, so that closures capture the whole (Send) struct, not its raw-pointer field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
