//! Guest cluster ranges whose allocating write is under way: other requests for them wait
//! until the mapping is settled (see `write`).

use super::units::GuestCluster;

#[derive(Default)]
pub(crate) struct Inflight(Vec<(u64, u64)>);

impl Inflight {
    /// Whether an allocating write is under way for any of clusters `gc..gc + n`.
    pub fn overlaps(&self, gc: GuestCluster, n: u64) -> bool {
        self.0.iter().any(|&(s, k)| gc.0 < s + k && s < gc.0 + n)
    }

    /// Note an allocating write for clusters `gc..gc + n`.
    pub fn add(&mut self, gc: GuestCluster, n: u64) {
        self.0.push((gc.0, n));
    }

    /// The allocating write that started at `gc` has settled.
    pub fn remove(&mut self, gc: GuestCluster) {
        if let Some(i) = self.0.iter().position(|&(s, _)| s == gc.0) {
            self.0.swap_remove(i);
        }
    }
}
