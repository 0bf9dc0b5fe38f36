//! JSON as qemu-img prints it.
//!
//! QEMU keeps dictionary members in a 512-bucket hash table and prints them bucket by
//! bucket, the most recently inserted first within a bucket; so the key order of its
//! output is a function of the key names and of the order the QAPI visitor inserted them
//! (the schema's field order). [`QDict`] records insertion order and [`to_json_pretty`]
//! reproduces QEMU's order, indentation (4 spaces, empty containers as `{`/`}` on two
//! lines) and string escaping.

/// A JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum QValue {
    Str(String),
    Int(i64),
    Bool(bool),
    List(Vec<QValue>),
    Dict(QDict),
}

/// A JSON object in insertion order (insert members in the QAPI schema's field order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QDict {
    entries: Vec<(String, QValue)>,
}

impl QDict {
    pub fn new() -> QDict {
        QDict::default()
    }

    /// Add a member (callers do not add a key twice).
    pub fn put(&mut self, key: &str, v: QValue) {
        self.entries.push((key.to_string(), v));
    }

    pub fn put_str(&mut self, key: &str, v: &str) {
        self.put(key, QValue::Str(v.to_string()));
    }

    pub fn put_int(&mut self, key: &str, v: i64) {
        self.put(key, QValue::Int(v));
    }

    pub fn put_bool(&mut self, key: &str, v: bool) {
        self.put(key, QValue::Bool(v));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Members in the order QEMU iterates them.
    pub fn iter_qemu_order(&self) -> Vec<&(String, QValue)> {
        let mut v: Vec<(usize, &(String, QValue))> = self.entries.iter().enumerate().collect();
        // Bucket ascending; within a bucket, later insertions first.
        v.sort_by_key(|&(i, (k, _))| (qdict_bucket(k), std::cmp::Reverse(i)));
        v.into_iter().map(|(_, e)| e).collect()
    }
}

/// QEMU's `tdb_hash` of a key, modulo its 512 buckets.
pub fn qdict_bucket(key: &str) -> u32 {
    let mut value = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, &c) in key.as_bytes().iter().enumerate() {
        value = value.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// Pretty-print like `qobject_to_json_pretty` (no trailing newline).
pub fn to_json_pretty(v: &QValue) -> String {
    let mut out = String::new();
    write_value(&mut out, v, 0);
    out
}

fn indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write_value(out: &mut String, v: &QValue, level: usize) {
    match v {
        QValue::Str(s) => write_str(out, s),
        QValue::Int(i) => out.push_str(&i.to_string()),
        QValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        QValue::List(items) => {
            out.push('[');
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(out, level + 1);
                write_value(out, item, level + 1);
            }
            out.push('\n');
            indent(out, level);
            out.push(']');
        }
        QValue::Dict(d) => {
            out.push('{');
            for (n, (k, item)) in d.iter_qemu_order().into_iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(out, level + 1);
                write_str(out, k);
                out.push_str(": ");
                write_value(out, item, level + 1);
            }
            out.push('\n');
            indent(out, level);
            out.push('}');
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04X}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_qemu() {
        // Order observed in `qemu-img info --output=json` of a qcow2 image.
        let keys = [
            "children",
            "backing-filename-format",
            "snapshots",
            "virtual-size",
            "filename",
            "cluster-size",
            "format",
            "actual-size",
            "format-specific",
            "full-backing-filename",
            "backing-filename",
            "dirty-flag",
        ];
        let b: Vec<u32> = keys.iter().map(|k| qdict_bucket(k)).collect();
        assert_eq!(
            b,
            [206, 206, 263, 309, 313, 316, 337, 351, 354, 360, 475, 501]
        );
    }

    #[test]
    fn prints_like_qemu() {
        let mut inner = QDict::new();
        inner.put_str("type", "file");
        inner.put("data", QValue::Dict(QDict::new()));
        let mut d = QDict::new();
        d.put_str("filename", "a\"b\u{e9}");
        d.put("children", QValue::List(vec![]));
        d.put("format-specific", QValue::Dict(inner));
        d.put_int("virtual-size", 5);
        let want = "{\n    \"children\": [\n    ],\n    \"virtual-size\": 5,\n    \"filename\": \"a\\\"b\\u00E9\",\n    \"format-specific\": {\n        \"type\": \"file\",\n        \"data\": {\n        }\n    }\n}";
        assert_eq!(to_json_pretty(&QValue::Dict(d)), want);
    }

    #[test]
    fn later_insertion_first_within_bucket() {
        let mut d = QDict::new();
        d.put_str("backing-filename-format", "qcow2");
        d.put("children", QValue::List(vec![]));
        let keys: Vec<&str> = d
            .iter_qemu_order()
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["children", "backing-filename-format"]);
    }
}
