//! `--object` against qemu-img: secrets are checked as QEMU checks them (ids, data or file,
//! format, keyid, duplicates), errors word for word and with the same exit codes, on
//! every subcommand that takes the option; the command runs as without the object.

use integration_tests::twin::{verbatim, Names, Twin};
use integration_tests::*;

#[test]
fn objects_match_qemu() {
    let twin = Twin::new(|d| {
        qemu_img_in(d, &["create", "-q", "-f", "qcow2", "t.qcow2", "1M"])
            .check()
            .unwrap();
        std::fs::write(d.join("key"), "k3y").unwrap();
        std::fs::write(d.join("bad64"), "a!c").unwrap();
    });
    let objects = [
        "secret,id=s0,data=abc",
        "secret,id=s0,data=YWJj,format=base64",
        "secret,id=s0,file=key",
        "secret,help",
        "secret,id=s0",
        "secret,data=abc",
        "secret,id=0s,data=abc",
        "secret,id=s0,data=abc,file=key",
        "secret,id=s0,file=nosuch",
        "secret,id=s0,data=abc,format=hex",
        "secret,id=s0,data=abc,keyid=k0",
        "secret,id=s0,data=abc,bogus=1",
        "id=s0",
        "nosuchtype,id=x",
        "secret,id=s0,data=abc,foo",
        "",
        "secret,id=s0,data=a!c,format=base64",
        "secret,id=s0,file=bad64,format=base64",
        "secret,id=s0,file=.",
        "secret,id=s0,data=abc,",
    ];
    let mut failures = Failures::new();
    for o in objects {
        for cmd in [
            vec!["info", "--object", o, "t.qcow2"],
            vec!["check", "--object", o, "t.qcow2"],
            vec!["map", "--object", o, "t.qcow2"],
            vec!["snapshot", "-l", "--object", o, "t.qcow2"],
            vec!["measure", "--object", o, "-O", "qcow2", "t.qcow2"],
            vec![
                "dd",
                "--object",
                o,
                "if=t.qcow2",
                "of=d.raw",
                "bs=64k",
                "count=1",
            ],
        ] {
            let pair = twin.run(&cmd);
            failures.record(&format!("{cmd:?}"), pair.compare(Names::Prefix, verbatim));
        }
    }
    let dup = [
        "info",
        "--object",
        "secret,id=s0,data=a",
        "--object",
        "secret,id=s0,data=b",
        "t.qcow2",
    ];
    failures.record(
        "duplicate id",
        twin.run(&dup).compare(Names::Prefix, verbatim),
    );
    let create = [
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=a",
        "-f",
        "qcow2",
        "n.qcow2",
        "1M",
    ];
    failures.record("create", twin.run(&create).compare(Names::Prefix, verbatim));
    failures.finish();
}
