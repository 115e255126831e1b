//! docs/configuration.md is the configuration reference: every key the
//! parser accepts is in it, and every key in it is one the parser accepts.
//!
//! The parser's keys come from the parser itself ([`config::known_keys`]
//! walks the `Raw*` structs through serde), not from a list kept by hand,
//! so a key added to src/config.rs fails here until it is documented.

use std::collections::BTreeSet;
use std::path::Path;

use credproxy::config::{self, Config};

fn reference() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The rows of every Markdown table whose header's first cell is `first`,
/// each as its cells (trimmed, without the outer pipes).
fn table_rows(text: &str, first: &str) -> Vec<Vec<String>> {
    let cells = |line: &str| -> Vec<String> {
        let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
        inner.split('|').map(|c| c.trim().to_owned()).collect()
    };
    let mut rows = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if !line.trim_start().starts_with('|') || cells(line)[0] != first {
            continue;
        }
        // The header's separator row, then the body up to the first non-row.
        lines.next();
        while let Some(row) = lines.next_if(|l| l.trim_start().starts_with('|')) {
            rows.push(cells(row));
        }
    }
    rows
}

/// The `code spans` of a cell.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The keys the reference documents: every code span in the first cell of
/// a `| key | default | meaning |` table, written out in full
/// (`providers.NAME.client_secret`, `providers.NAME.client_secret_env`).
fn documented_keys(text: &str) -> Vec<String> {
    table_rows(text, "key")
        .iter()
        .flat_map(|row| code_spans(&row[0]))
        .collect()
}

#[test]
fn every_config_key_is_documented_and_every_documented_key_exists() {
    let known: BTreeSet<String> = config::known_keys().into_iter().collect();
    let documented = documented_keys(&reference());
    assert!(
        documented.len() > 20,
        "the key tables of docs/configuration.md"
    );

    let documented_set: BTreeSet<&str> = documented.iter().map(String::as_str).collect();
    let undocumented: Vec<&String> = known
        .iter()
        .filter(|k| !documented_set.contains(k.as_str()))
        .collect();
    assert!(
        undocumented.is_empty(),
        "keys the parser accepts that docs/configuration.md does not document: {undocumented:?}"
    );

    // A documented name is a key, or a table that holds keys
    // (`providers.NAME.rate_limit`).
    let is_table = |d: &str| known.iter().any(|k| k.starts_with(&format!("{d}.")));
    let unknown: Vec<&String> = documented
        .iter()
        .filter(|d| !known.contains(*d) && !is_table(d))
        .collect();
    assert!(
        unknown.is_empty(),
        "keys docs/configuration.md documents that the parser does not accept: {unknown:?}"
    );

    let mut seen = BTreeSet::new();
    let twice: Vec<&String> = documented
        .iter()
        .filter(|d| !seen.insert(d.as_str()))
        .collect();
    assert!(twice.is_empty(), "documented twice: {twice:?}");
}

#[test]
fn env_overrides_are_documented_as_they_are() {
    // `| variable | overrides |`: the variable, then the key it overrides.
    let documented: BTreeSet<(String, String)> = table_rows(&reference(), "variable")
        .iter()
        .map(|row| {
            let var = code_spans(&row[0]).concat();
            let key = code_spans(&row[1]).into_iter().next().unwrap_or_default();
            (var, key)
        })
        .collect();
    let parsed: BTreeSet<(String, String)> = config::ENV_OVERRIDES
        .iter()
        .map(|(var, key)| (var.to_string(), key.to_string()))
        .collect();
    assert_eq!(documented, parsed, "docs/configuration.md's variables");
}

/// A config file that sets `key` (dotted, `providers.NAME.…` for a
/// provider's) to `value`, beside what a provider needs to be read at all.
fn config_setting(key: &str, value: &str) -> String {
    let provider = format!("providers.{}.", config::PROVIDER_NAME);
    match key.strip_prefix(&provider) {
        Some("kind") | Some("api_base") => provider_table(""),
        Some(rest) => provider_table(&format!("{rest} = {value}\n")),
        None => format!("{key} = {value}\n"),
    }
}

fn provider_table(extra: &str) -> String {
    format!(
        "[providers.{}]\nkind = \"spark\"\napi_base = \"https://api.example\"\n{extra}",
        config::PROVIDER_NAME
    )
}

fn parse_error(text: &str) -> String {
    match Config::parse(text, Path::new("config.toml"), |_| None) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// The walk of the parser's structs agrees with the parser: each key it
/// lists is read (at most refused for its value), and a made-up key is
/// refused as unknown.
#[test]
fn the_listed_keys_are_the_ones_the_parser_reads() {
    for key in config::known_keys() {
        let text = config_setting(&key, "[[]]");
        let err = parse_error(&text);
        assert!(!err.contains("unknown field"), "{key}: {err}\n{text}");
    }
    for key in [
        "server.no_such_key",
        "store.rotation_journals",
        "providers.NAME.no_such_key",
        "providers.NAME.rate_limit.burst",
        "notify.no_such_key",
        "no_such_table.key",
    ] {
        let text = config_setting(key, "1");
        let err = parse_error(&text);
        assert!(err.contains("unknown field"), "{key}: {err}\n{text}");
    }
}

/// README's table of presets and schemes is the one the code makes from
/// its presets (`config::presets_table`).
#[test]
fn readme_presets_table_is_written_from_the_presets() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let table = config::presets_table();
    assert!(
        readme.contains(&table),
        "README.md's providers table differs from the presets; paste this:\n{table}"
    );
}
