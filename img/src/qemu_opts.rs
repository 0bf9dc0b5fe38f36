//! QEMU's option strings (`key=value,...`), as `-o`-like arguments, `--image-opts` and
//! `--object` spell them.

use std::collections::BTreeMap;

/// `key=value,...` with `,,` for a comma in a value; later keys win. A first element
/// without `=` is the value of `implied` (`file` for an image, `qom-type` for an object);
/// a later one is `KEY=on` (with QEMU's warning, except for `help`).
pub fn split(s: &str, implied: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
                continue;
            }
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
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
    }
}
