//! The `-l SNAPSHOT_PARAM` argument of `convert` and `measure`: an ID or name, or
//! `snapshot.id=ID,snapshot.name=NAME`.

use common::ops::SnapshotKey;

/// Parse `-l`; the error is qemu-img's text after `img: `.
pub fn parse_snapshot_param(p: &str) -> Result<SnapshotKey, String> {
    if !p.starts_with("snapshot.") {
        return Ok(SnapshotKey::IdOrName(p.to_string()));
    }
    let (mut id, mut name) = (None, None);
    for item in common::option_list::split(p) {
        let (k, v) = item.split_once('=').unwrap_or((&item, "on"));
        match k {
            "snapshot.id" => id = Some(v.to_string()),
            "snapshot.name" => name = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "Invalid parameter '{k}'\nimg: Failed in parsing snapshot param '{p}'"
                ))
            }
        }
    }
    Ok(SnapshotKey::Exact { id, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_forms() {
        assert_eq!(
            parse_snapshot_param("s1,x"),
            Ok(SnapshotKey::IdOrName("s1,x".into()))
        );
        assert_eq!(
            parse_snapshot_param("snapshot.id=1,snapshot.name=a"),
            Ok(SnapshotKey::Exact {
                id: Some("1".into()),
                name: Some("a".into())
            })
        );
        assert!(parse_snapshot_param("snapshot.foo=1")
            .unwrap_err()
            .starts_with("Invalid parameter 'snapshot.foo'"));
    }
}
