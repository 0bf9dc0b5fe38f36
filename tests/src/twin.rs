//! `img` next to `qemu-img`: the same arguments run through both tools, each in its own
//! directory with the same contents ("twin directories", so that relative file names and
//! what each tool writes stay apart), then the exit codes, stdout, stderr and the images
//! they left compared.
//!
//! ```ignore
//! let twin = Twin::new(|dir| { qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]).ok(); });
//! let pair = twin.run(&["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "a.qcow2"]);
//! let mut errs = pair.differences(Names::Prefix, verbatim);
//! if pair.both_succeeded() {
//!     errs.extend(twin.compare_images("a.qcow2", Images::default()).err());
//! }
//! pair.verdict(errs)?;
//! ```
//!
//! Commands that only read (`info`, `map`, ...) may run both tools in one directory:
//! [`Pair::run`].

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::process::Output;
use crate::tools::{qemu_img, qemu_img_in, qemu_info_json, qemu_to_img_prefix, Tool};
use crate::{json_pretty, json_remove_key, s, tempdir, text_diff};

/// How qemu-img's name in its output is mapped to ours before comparing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Names {
    /// The `qemu-img: ` prefix of stderr lines becomes `img: ` (error messages).
    Prefix,
    /// Every `qemu-img` in qemu-img's stdout and stderr becomes `img` (usage and help
    /// texts, which name the program: "Try 'qemu-img --help' ...").
    Everywhere,
}

/// The identity, for [`Pair::differences`] when stdout is compared as it is.
pub fn verbatim(s: &str) -> String {
    s.to_string()
}

/// One command's runs: qemu-img's and img's.
pub struct Pair {
    pub qemu: Output,
    pub img: Output,
}

impl Pair {
    /// Run `args` through qemu-img in `qemu_dir` and through `img` in `img_dir` (the same
    /// directory for commands that write nothing).
    pub fn run<S: AsRef<OsStr>>(qemu_dir: &Path, img_dir: &Path, img: &Tool, args: &[S]) -> Pair {
        Pair {
            qemu: qemu_img_in(qemu_dir, args),
            img: img.run(Some(img_dir), args),
        }
    }

    pub fn both_succeeded(&self) -> bool {
        self.qemu.success() && self.img.success()
    }

    /// Where img did not behave like qemu-img: img did not exit on its own (timeout,
    /// signal) or panicked; the exit codes differ; stdout differs (each passed through
    /// `normalize` first); stderr differs once qemu-img's name is mapped ([`Names`]).
    pub fn differences(&self, names: Names, normalize: fn(&str) -> String) -> Vec<String> {
        let (q, i) = (&self.qemu, &self.img);
        let mut errs = Vec::new();
        if i.timed_out || i.signal.is_some() || i.stderr.contains("panicked") {
            errs.push("img did not exit normally (timeout/signal/panic)".to_string());
        }
        if q.code != i.code {
            errs.push(format!(
                "exit code: qemu-img {:?}, img {:?}",
                q.code, i.code
            ));
        }
        let (q_out, q_err) = match names {
            Names::Prefix => (q.stdout.clone(), qemu_to_img_prefix(&q.stderr)),
            Names::Everywhere => (
                q.stdout.replace("qemu-img", "img"),
                q.stderr.replace("qemu-img", "img"),
            ),
        };
        if let Some(d) = text_diff(
            "qemu-img stdout",
            &normalize(&q_out),
            "img stdout",
            &normalize(&i.stdout),
        ) {
            errs.push(format!("stdout differs:\n{d}"));
        }
        if let Some(d) = text_diff(
            "qemu-img stderr (name mapped)",
            &q_err,
            "img stderr",
            &i.stderr,
        ) {
            errs.push(format!("stderr differs:\n{d}"));
        }
        errs
    }

    /// `Ok` when `errs` is empty, else all of them with both runs' reports.
    pub fn verdict(&self, errs: Vec<String>) -> Result<(), String> {
        if errs.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{}\n--- qemu-img run:\n{}\n--- img run:\n{}",
                errs.join("\n"),
                self.qemu.report(),
                self.img.report()
            ))
        }
    }

    /// [`Pair::differences`], then [`Pair::verdict`].
    pub fn compare(&self, names: Names, normalize: fn(&str) -> String) -> Result<(), String> {
        self.verdict(self.differences(names, normalize))
    }
}

/// What [`Twin::compare_images`] compares beyond `qemu-img check` and `info`.
#[derive(Clone, Copy, Debug)]
pub struct Images {
    /// The images were preallocated: the file lengths and `qemu-img map` (host offsets
    /// aside) must match too.
    pub preallocated: bool,
    /// Compare the guest contents with `qemu-img compare` (not possible when a backing
    /// file is missing).
    pub contents: bool,
}

impl Default for Images {
    fn default() -> Self {
        Images {
            preallocated: false,
            contents: true,
        }
    }
}

/// Twin directories: `q/` for qemu-img, `i/` for img, with the same contents.
pub struct Twin {
    _tmp: tempfile::TempDir,
    qdir: PathBuf,
    idir: PathBuf,
    img: Tool,
}

impl Twin {
    /// Twin directories, each prepared by `setup` (called once for each).
    pub fn new(setup: impl Fn(&Path)) -> Twin {
        Twin::with_img(Tool::img(), setup)
    }

    /// Like [`Twin::new`], with another `img` binary (a crate's own `CARGO_BIN_EXE_img`).
    pub fn with_img(img: Tool, setup: impl Fn(&Path)) -> Twin {
        let tmp = tempdir();
        let qdir = tmp.path().join("q");
        let idir = tmp.path().join("i");
        for d in [&qdir, &idir] {
            std::fs::create_dir_all(d).unwrap();
            setup(d);
        }
        Twin {
            _tmp: tmp,
            qdir,
            idir,
            img,
        }
    }

    /// Twin directories holding copies of every file in `src`, so that both tools start
    /// from the same bytes (snapshot dates included, which two setups would not share).
    pub fn copied_from(src: &Path) -> Twin {
        Twin::new(|d| {
            for e in std::fs::read_dir(src).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
            }
        })
    }

    /// `qemu-img map` of `file` ([`map_json`], host offsets aside) the same in both
    /// directories, each first passed through `normalize`.
    pub fn compare_maps(
        &self,
        file: &str,
        normalize: impl Fn(serde_json::Value) -> serde_json::Value,
    ) -> Result<(), String> {
        let map = |dir: &Path| map_json(dir, file).map(&normalize);
        let (q, i) = (map(&self.qdir)?, map(&self.idir)?);
        match text_diff(
            "qemu-img map (qemu-img's image)",
            &json_pretty(&q),
            "qemu-img map (img's image)",
            &json_pretty(&i),
        ) {
            Some(d) => Err(format!("map differs:\n{d}")),
            None => Ok(()),
        }
    }

    /// qemu-img's directory.
    pub fn qemu_dir(&self) -> &Path {
        &self.qdir
    }

    /// img's directory.
    pub fn img_dir(&self) -> &Path {
        &self.idir
    }

    /// Remove `file` (relative) from both directories, if it is there.
    pub fn remove(&self, file: &str) {
        for d in [&self.qdir, &self.idir] {
            let _ = std::fs::remove_file(d.join(file));
        }
    }

    /// Run `args` with each tool in its directory.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Pair {
        Pair::run(&self.qdir, &self.idir, &self.img, args)
    }

    /// Compare the image `file` (relative) the two tools left: img's passes `qemu-img check`
    /// (qcow2, checked without its backing file), `qemu-img info --output=json` reports the
    /// same for both (`actual-size` aside, and the host file length unless preallocated or
    /// raw), and what [`Images`] asks for.
    pub fn compare_images(&self, file: &str, what: Images) -> Result<(), String> {
        let qf = self.qdir.join(file);
        let inf = self.idir.join(file);
        if !inf.exists() {
            return Err(format!("img did not create {}", inf.display()));
        }
        let fmt = qemu_info_json(&qf, &["-U"])["format"]
            .as_str()
            .unwrap()
            .to_string();
        let mut errs = Vec::new();
        if fmt == "qcow2" {
            // Without the backing file (it may not exist with -u), check the image alone.
            let spec = format!(
                r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{file}"}}}}"#
            );
            let out = qemu_img_in(&self.idir, &["check", "-U", &spec]);
            if !out.success() {
                errs.push(format!(
                    "qemu-img check of img's image failed:\n{}",
                    out.report()
                ));
            }
        }
        let keep_len = what.preallocated || fmt == "raw";
        match (
            info_json(&self.qdir, file, keep_len),
            info_json(&self.idir, file, keep_len),
        ) {
            (Ok(q), Ok(i)) => {
                if let Some(d) = text_diff(
                    "qemu-img info of qemu-img's image",
                    &json_pretty(&q),
                    "qemu-img info of img's image",
                    &json_pretty(&i),
                ) {
                    errs.push(format!("info --output=json differs:\n{d}"));
                }
            }
            (Err(e), _) | (_, Err(e)) => errs.push(e),
        }
        if keep_len {
            let ql = std::fs::metadata(&qf).unwrap().len();
            let il = std::fs::metadata(&inf).unwrap().len();
            if ql != il {
                errs.push(format!("file length: qemu-img {ql}, img {il}"));
            }
        }
        if what.preallocated {
            match (map_json(&self.qdir, file), map_json(&self.idir, file)) {
                (Ok(q), Ok(i)) => {
                    if let Some(d) = text_diff(
                        "qemu-img map (qemu's image)",
                        &json_pretty(&q),
                        "qemu-img map (img's image)",
                        &json_pretty(&i),
                    ) {
                        errs.push(format!("map differs:\n{d}"));
                    }
                }
                (Err(e), _) | (_, Err(e)) => errs.push(e),
            }
        }
        if what.contents {
            // Guest contents (through the backing chain, if any) must be the same.
            let out = qemu_img(&["compare", "-U", s(&qf), s(&inf)]);
            if out.code != Some(0) {
                errs.push(format!(
                    "qemu-img compare says contents differ:\n{}",
                    out.report()
                ));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("\n"))
        }
    }
}

/// `qemu-img info -U --output=json FILE` in `dir`, without `actual-size` and (unless
/// `keep_file_len`) without the protocol child's `virtual-size`, the host file length.
pub fn info_json(dir: &Path, file: &str, keep_file_len: bool) -> Result<serde_json::Value, String> {
    let out = qemu_img_in(dir, &["info", "-U", "--output=json", file]);
    if !out.success() {
        return Err(format!("qemu-img info failed on {file}:\n{}", out.report()));
    }
    let mut v: serde_json::Value = serde_json::from_str(&out.stdout).map_err(|e| e.to_string())?;
    json_remove_key(&mut v, "actual-size");
    if !keep_file_len {
        if let Some(children) = v.get_mut("children").and_then(|c| c.as_array_mut()) {
            for ch in children {
                if let Some(info) = ch.get_mut("info").and_then(|i| i.as_object_mut()) {
                    info.remove("virtual-size");
                }
            }
        }
    }
    Ok(v)
}

/// `qemu-img map -U --output=json FILE` in `dir`, without host offsets, neighbouring
/// extents that only differed in them merged.
pub fn map_json(dir: &Path, file: &str) -> Result<serde_json::Value, String> {
    let out = qemu_img_in(dir, &["map", "-U", "--output=json", file]);
    if !out.success() {
        return Err(format!("qemu-img map failed on {file}:\n{}", out.report()));
    }
    let mut v: serde_json::Value = serde_json::from_str(&out.stdout).map_err(|e| e.to_string())?;
    // Host offsets are layout, not contract: drop them, then merge neighbours that only
    // qemu-img kept apart because their host offsets were not contiguous.
    json_remove_key(&mut v, "offset");
    let mut merged: Vec<serde_json::Value> = Vec::new();
    for e in v.as_array().cloned().unwrap_or_default() {
        if let Some(last) = merged.last_mut() {
            let same = ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|k| last[k] == e[k]);
            let adjacent = last["start"].as_u64().unwrap() + last["length"].as_u64().unwrap()
                == e["start"].as_u64().unwrap();
            if same && adjacent {
                let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                last["length"] = len.into();
                continue;
            }
        }
        merged.push(e);
    }
    Ok(serde_json::Value::Array(merged))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The comparison itself: a qemu-img stand-in that prints what qemu-img prints matches;
    /// one that differs in exit code, stdout or stderr is caught, each on its own.
    #[test]
    fn differences_are_found() {
        let out = |code, stdout: &str, stderr: &str| Output {
            cmdline: "x".into(),
            code: Some(code),
            signal: None,
            stdout: stdout.into(),
            stderr: stderr.into(),
            timed_out: false,
            elapsed: Default::default(),
        };
        let q = out(1, "", "qemu-img: bad\nTry 'qemu-img --help'\n");
        let pair = |i| Pair {
            qemu: q.clone(),
            img: i,
        };
        let same = pair(out(1, "", "img: bad\nTry 'img --help'\n"));
        assert!(same.compare(Names::Everywhere, verbatim).is_ok());
        assert_eq!(same.differences(Names::Prefix, verbatim).len(), 1);
        let code = pair(out(2, "", "img: bad\nTry 'img --help'\n"));
        assert_eq!(code.differences(Names::Everywhere, verbatim).len(), 1);
        let stdout = pair(out(1, "x\n", "img: bad\nTry 'img --help'\n"));
        assert_eq!(stdout.differences(Names::Everywhere, verbatim).len(), 1);
        assert!(stdout
            .differences(Names::Everywhere, |_| String::new())
            .is_empty());
        let mut panicked = out(1, "", "img: bad\nTry 'img --help'\n");
        panicked.stderr += "thread 'main' panicked\n";
        let errs = pair(panicked).differences(Names::Everywhere, verbatim);
        assert_eq!(errs.len(), 2, "{errs:?}");
    }
}
