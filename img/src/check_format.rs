//! The text and JSON `qemu-img check` prints for a check report.

use common::check::CheckReport;

use crate::qjson::{to_json_pretty, QDict, QValue};

/// What qemu-img says after a repair, before it checks the image again.
pub fn repaired_text(r: &CheckReport) -> String {
    format!(
        "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    \
         {} corruptions\n\nDouble checking the fixed image now...\n",
        r.leaks_fixed, r.corruptions_fixed
    )
}

/// The human summary (qemu-img's `dump_human_image_check`).
pub fn render_human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions != 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further \
                 writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks != 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                 space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors != 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let alloc = r.allocated_clusters as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            alloc * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / alloc,
            r.compressed_clusters as f64 * 100.0 / alloc,
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// The JSON form (QAPI `ImageCheck`, optional members only when nonzero).
pub fn render_json(r: &CheckReport, filename: &str, format: &str) -> String {
    let mut d = QDict::new();
    d.put_str("filename", filename);
    d.put_str("format", format);
    d.put_int("check-errors", r.check_errors as i64);
    let optional = [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (k, v) in optional {
        if v != 0 {
            d.put_int(k, v as i64);
        }
    }
    format!("{}\n", to_json_pretty(&QValue::Dict(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_summary_of_a_clean_image() {
        let r = CheckReport {
            total_clusters: 160,
            allocated_clusters: 5,
            image_end_offset: 655360,
            ..Default::default()
        };
        assert_eq!(
            render_human(&r),
            "No errors were found on the image.\n5/160 = 3.12% allocated, 0.00% fragmented, \
             0.00% compressed clusters\nImage end offset: 655360\n"
        );
    }
}
