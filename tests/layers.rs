//! The map stays true: every module of the library reads only from the
//! layers below its own (ARCHITECTURE.md, "Code map"). A check over the
//! `crate::MODULE` paths in `src/` (doc links count: they name what a
//! module leans on); `main.rs` is the binary, above all of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The library's top-level modules, lowest layer first. Modules of one
/// layer do not read each other.
const LAYERS: &[&[&str]] = &[
    &["clock", "error", "http1", "table", "telemetry"],
    &["config"],
    &["secrets"],
    &["audit"],
    &["store", "tls", "provider"],
    &["pacing"],
    &["metrics"],
    &["tokens", "notify"],
    &["proxy", "control"],
    &["server"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("read src/");
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None` for lib.rs
/// and main.rs).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

/// Every `crate::NAME` in `text`, with its line number.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().next_back();
            let tail = &rest[at + "crate::".len()..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `credproxy_standins::`, `$crate::`: not this crate's paths.
            if before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
                && !name.is_empty()
            {
                found.push((n + 1, name));
            }
            rest = tail;
        }
    }
    found
}

#[test]
fn every_module_reads_only_from_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut upward: Vec<String> = Vec::new();
    let mut unplaced: BTreeMap<String, String> = BTreeMap::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let shown = file
            .strip_prefix(&src)
            .unwrap_or(file)
            .display()
            .to_string();
        let Some(own) = layer_of(&module) else {
            unplaced.insert(module, shown);
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read a source file");
        for (line, used) in crate_paths(&text) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(theirs) if theirs < own => {}
                Some(_) => upward.push(format!(
                    "src/{shown}:{line}: {module} reads crate::{used}, which is not below it"
                )),
                None => {
                    unplaced.insert(used, format!("named by src/{shown}:{line}"));
                }
            }
        }
    }
    assert!(
        unplaced.is_empty(),
        "modules missing from LAYERS (place them in tests/layers.rs and ARCHITECTURE.md): {unplaced:?}"
    );
    assert!(
        upward.is_empty(),
        "imports against the layers:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_layers_name_every_module_lib_rs_declares() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("read src/lib.rs");
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';'))
        .collect();
    let layered: Vec<&str> = LAYERS.iter().flat_map(|l| l.iter().copied()).collect();
    let mut a = declared.clone();
    let mut b = layered.clone();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b, "lib.rs's modules and the layers differ");
    assert!(
        !lib.contains("pub use"),
        "lib.rs re-exports nothing: every path names the module it reads"
    );
}

#[test]
fn the_check_sees_an_import_against_the_layers() {
    let paths = crate_paths("use crate::proxy::Proxy; // see [`crate::store::now`], $crate::x");
    let names: Vec<&str> = paths.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["proxy", "store"]);
    assert!(layer_of("proxy") > layer_of("tokens"));
    assert!(layer_of("config") < layer_of("secrets"));
}
