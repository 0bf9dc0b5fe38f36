//! QEMU's option strings (`key=value,...`), as `-o`-like arguments, `--image-opts` and
//! `--object` spell them.

use std::collections::BTreeMap;

/// `key=value,...` with `,,` for a comma in a value; later keys win; a trailing comma is
/// ignored. A first element
/// without `=` is the value of `implied` (`file` for an image, `qom-type` for an object);
/// a later one is `KEY=on` (with QEMU's warning, except for `help`).
pub fn split(s: &str, implied: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut parts = common::option_list::split(s);
    // A trailing comma (or nothing at all) adds no option.
    if parts.last().is_some_and(String::is_empty) {
        parts.pop();
    }
    for (i, p) in parts.into_iter().enumerate() {
        match p.split_once('=') {
            Some((k, v)) => {
                out.insert(k.to_string(), v.to_string());
            }
            None if i == 0 => {
                out.insert(implied.into(), p);
            }
            None if p == "help" => {
                out.insert(p, "on".into());
            }
            None => {
                eprintln!(
                    "img: warning: short-form boolean option '{p}' deprecated\nPlease use {p}=on instead"
                );
                out.insert(p, "on".into());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_implied_keys_and_later_keys() {
        let o = split("secret,id=a,,b,data=x,id=c", "qom-type");
        assert_eq!(o["qom-type"], "secret");
        assert_eq!(o["id"], "c");
        assert_eq!(o["data"], "x");
        assert_eq!(split("a=1,flag", "file")["flag"], "on");
        assert_eq!(split("a=1,", "file").len(), 1);
        assert!(split("", "file").is_empty());
    }
}
