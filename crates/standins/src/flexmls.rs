//! flex-mls (PyPI), a real Spark RESO client, for the tests that page
//! through a stand-in (directly, or through credproxy) with it.

use std::path::PathBuf;
use std::process::Command;

/// The repository's root (this crate lives in `crates/standins`).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tests/flexmls/page_all.py`: pages through Member and Property.
pub fn page_all_script() -> PathBuf {
    root().join("tests/flexmls/page_all.py")
}

/// A python with flex-mls installed: `CREDPROXY_FLEXMLS_PYTHON`, or the venv
/// `scripts/flexmls-venv.sh` makes. Where the venv cannot be made (no PyPI),
/// prints a SKIPPED line naming `test` and returns `None`, except under CI,
/// where it panics: CI must run the flex-mls tests.
pub fn python(test: &str) -> Option<String> {
    if let Ok(python) = std::env::var("CREDPROXY_FLEXMLS_PYTHON") {
        if !python.is_empty() {
            return Some(python);
        }
    }
    let out = match Command::new(root().join("scripts/flexmls-venv.sh"))
        .current_dir(root())
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!("{test}: cannot run scripts/flexmls-venv.sh: {e}"),
    };
    if out.status.success() {
        return Some(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    let why = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI must run flex-mls, but its venv could not be made:\n{why}"
    );
    println!("SKIPPED {test}: the flex-mls venv could not be made:\n{why}");
    None
}
