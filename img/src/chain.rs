//! Naming the layers of an open backing chain the way QEMU does: each layer's file name
//! (the user's name for the top, then each stored backing name combined with the name of
//! the layer above), and finding a layer by a name the user gives (`commit -b`, `rebase
//! -b` onto an image already in the chain).

use std::path::Path;

use common::open::Image;

use crate::paths::path_combine;

/// QEMU's `path_has_protocol`: a `:` before any `/` (`nbd:...`, `json:{...}`).
pub fn has_protocol(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name.as_bytes()[i] == b':')
}

/// The file name of every layer of `image`, opened from `top`, top first (QEMU's
/// `bs->filename` of each layer).
pub fn layer_names(top: &str, image: &Image) -> Vec<String> {
    let mut names = vec![top.to_string()];
    let mut depth = 0;
    while let Some(r) = image.layer(depth).and_then(|l| l.backing_ref()) {
        if image.layer(depth + 1).is_none() {
            break;
        }
        let above = names.last().expect("the top is named");
        names.push(if has_protocol(&r.name) {
            r.name
        } else {
            path_combine(above, &r.name)
        });
        depth += 1;
    }
    names
}

/// QEMU's `bdrv_find_backing_image`: the depth of the lower layer that `name` names.
/// Each layer's stored backing name and `name` are both taken relative to that layer's
/// file and compared as real paths (as strings when either has a protocol prefix).
pub fn find_backing_image(top: &str, image: &Image, name: &str) -> Option<u32> {
    let names = layer_names(top, image);
    let real = |p: String| std::fs::canonicalize(Path::new(&p)).ok();
    for (depth, above) in names.iter().enumerate().take(names.len() - 1) {
        let stored = image.layer(depth as u32)?.backing_ref()?.name;
        let found = if has_protocol(name) || has_protocol(&stored) {
            name == stored
        } else {
            match real(path_combine(above, name)) {
                Some(wanted) => real(path_combine(above, &stored)) == Some(wanted),
                None => false,
            }
        };
        if found {
            return Some(depth as u32 + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_as_qemu_sees_them() {
        assert!(has_protocol("nbd:localhost:10809"));
        assert!(has_protocol("json:{\"a\":1}"));
        assert!(!has_protocol("dir/a:b"));
        assert!(!has_protocol("plain.qcow2"));
        assert!(!has_protocol("/abs/x.qcow2"));
    }
}
