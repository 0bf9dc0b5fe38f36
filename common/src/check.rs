//! What a consistency check of an image found and repaired, in any format.

/// What a check may repair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fix {
    /// Free leaked clusters (`-r leaks`).
    pub leaks: bool,
    /// Repair corruptions too (`-r all`).
    pub errors: bool,
}

impl Fix {
    /// Whether anything may be repaired.
    pub fn any(self) -> bool {
        self.leaks || self.errors
    }
}

/// The result of a check, as QEMU's `BdrvCheckResult` counts it.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// What the check said about each problem, in the order found (qemu-img's stderr).
    pub messages: Vec<String>,
    /// The check could not complete: the OS error it stopped with (qemu-img's
    /// `Check failed: ...`).
    pub failure: Option<std::io::Error>,
}
