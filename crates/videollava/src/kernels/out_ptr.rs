//! The output pointer the kernels' parallel tasks share.

/// The output pointer shared by tasks that write disjoint elements (`f32` unless named).
pub(crate) struct OutPtr<T = f32>(*mut T);
impl<T> Clone for OutPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutPtr<T> {}
// SAFETY: every task writes a set of elements no other task touches, and the pointer outlives the
// parallel loop (the loops end before the functions that made it return).
unsafe impl<T> Send for OutPtr<T> {}
// SAFETY: as for `Send`: shared use only writes disjoint elements.
unsafe impl<T> Sync for OutPtr<T> {}
impl<T> OutPtr<T> {
    pub(crate) fn new(out: &mut [T]) -> Self {
        Self(out.as_mut_ptr())
    }

    // A method, so that closures capture the whole (Send) struct, not its raw-pointer field.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}
