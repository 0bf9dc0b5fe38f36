//! QEMU's option-list syntax (`key=value,key=value`), shared by `img -o` and `vmm --drive`.

/// Split a list on single commas; `,,` stands for a literal comma (in a file name, say).
pub fn split(list: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
}

#[cfg(test)]
mod tests {
    #[test]
    fn double_commas_are_literal() {
        assert_eq!(super::split("a=1,b=x,,y,,,c"), ["a=1", "b=x,y,", "c"]);
        assert_eq!(super::split(""), [""]);
        assert_eq!(super::split("a,"), ["a", ""]);
    }
}
