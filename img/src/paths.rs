//! File name arithmetic as QEMU does it on strings (no normalisation).

/// QEMU's `path_combine`: `dest` relative to the directory of `base`, unless absolute.
/// `path_combine("sub/ov.qcow2", "base.qcow2") == "sub/base.qcow2"`.
pub fn path_combine(base: &str, dest: &str) -> String {
    if dest.starts_with('/') || common::nbd::uri::is_nbd_uri(dest) {
        return dest.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{}", &base[..=i], dest),
        None => dest.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combines_like_qemu() {
        assert_eq!(path_combine("ov.qcow2", "base.qcow2"), "base.qcow2");
        assert_eq!(path_combine("sub/ov.qcow2", "base.qcow2"), "sub/base.qcow2");
        assert_eq!(path_combine("./ov.qcow2", "b"), "./b");
        assert_eq!(path_combine("sub//ov.qcow2", "b"), "sub//b");
        assert_eq!(path_combine("sub/ov.qcow2", "/abs/b"), "/abs/b");
        assert_eq!(path_combine("/x/ov.qcow2", "../b"), "/x/../b");
        assert_eq!(path_combine("/x/ov.qcow2", "nbd://h/e"), "nbd://h/e");
    }
}
