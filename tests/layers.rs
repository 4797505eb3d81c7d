//! The layers of ARCHITECTURE.md, checked on the source: each top-level module may use only the
//! modules its layer allows, and the domain layer (`event`, `coverage`, `counters`, …) uses nothing that does
//! I/O, reads a clock or touches metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Which modules each module may use (`crate::<module>`). Items of the crate root
/// (`ComponentContext`, `build`) are allowed everywhere.
const ALLOWED: &[(&str, &[&str])] = &[
    // The domain layer.
    ("event", &[]),
    ("project", &[]),
    ("sketch", &[]),
    ("schema", &[]),
    ("coverage", &["event"]),
    ("counters", &["coverage", "event", "project", "sketch"]),
    // The base layer.
    ("config", &["event"]),
    ("metrics", &["event", "schema"]),
    ("progress", &[]),
    ("parts", &[]),
    // Infrastructure.
    ("bus", &["config", "event", "metrics"]),
    (
        "store",
        &[
            "config", "counters", "coverage", "event", "metrics", "project", "sketch",
        ],
    ),
    ("http", &["metrics"]),
    // The roles and what they answer.
    ("health", &["bus", "config", "http", "metrics", "store"]),
    (
        "ingest",
        &[
            "bus", "config", "coverage", "event", "metrics", "parts", "progress", "schema",
        ],
    ),
    (
        "intake",
        &[
            "bus", "config", "event", "health", "http", "metrics", "schema",
        ],
    ),
    (
        "aggregate",
        &[
            "bus", "config", "counters", "event", "metrics", "parts", "progress", "store",
        ],
    ),
    (
        "web",
        &[
            "bus", "config", "counters", "coverage", "event", "health", "http", "metrics",
            "project", "sketch", "store",
        ],
    ),
    // The process.
    ("supervisor", &["metrics"]),
    ("systemd", &[]),
    ("replay", &["capture", "config", "event", "progress"]),
    ("capture", &["ingest"]),
    (
        "record",
        &["capture", "config", "event", "ingest", "progress"],
    ),
];

/// The domain layer: pure, checked against [`IMPURE`].
const DOMAIN: &[&str] = &[
    "event", "schema", "coverage", "counters", "project", "sketch",
];

/// Modules that wire everything together.
const TOP: &[&str] = &["daemon", "lib", "main"];

/// Names whose presence in the domain layer means I/O, a clock, metrics or logging.
const IMPURE: &[&str] = &[
    "tokio",
    "reqwest",
    "rdkafka",
    "redis",
    "redb",
    "warp",
    "hyper",
    "prometheus",
    "tracing",
    "std::fs",
    "std::net",
    "std::io",
    "std::process",
    "std::env",
    "Instant",
    "SystemTime",
    "Utc::now",
    "Local::now",
    "thread_rng",
];

/// The top-level module a source file belongs to.
fn module_of(relative: &Path) -> String {
    let first = relative
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    first.trim_end_matches(".rs").to_owned()
}

/// The code of a file without its `#[cfg(test)]` module (tests may read files).
fn without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    }
}

/// The top-level modules a piece of code refers to through `crate::`, including grouped
/// imports (`use crate::{a, b::c}`).
fn references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                found.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    // Items of the crate root, and `crate::` inside doc text.
    found.retain(|name| {
        !name.is_empty()
            && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && name != "build"
    });
    found
}

/// Every way the source under `src` breaks the layer rules.
fn violations(files: &[(String, String)]) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut problems = Vec::new();
    for (module, text) in files {
        if TOP.contains(&module.as_str()) {
            continue;
        }
        let Some(may) = allowed.get(module.as_str()) else {
            problems.push(format!(
                "{module} is not in the layer table: add it to ARCHITECTURE.md and tests/layers.rs"
            ));
            continue;
        };
        let code = without_tests(text);
        for used in references(code) {
            if used != *module && !may.contains(&used.as_str()) {
                problems.push(format!(
                    "{module} uses crate::{used}, a module its layer may not use"
                ));
            }
        }
        if DOMAIN.contains(&module.as_str()) {
            for name in IMPURE {
                if code.contains(name) {
                    problems.push(format!("{module} is the domain layer but mentions {name}"));
                }
            }
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

fn sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(&root).expect("under src").to_owned();
                let text = std::fs::read_to_string(&path).expect("a source file");
                files.push((module_of(&relative), text));
            }
        }
    }
    files
}

#[test]
fn every_module_uses_only_lower_layers() {
    let files = sources();
    assert!(files.len() > 20, "the source tree was found");
    let problems = violations(&files);
    assert!(
        problems.is_empty(),
        "layer violations:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_check_catches_each_kind_of_violation() {
    let file = |module: &str, text: &str| (module.to_owned(), text.to_owned());
    let problems = violations(&[
        file(
            "web",
            "use crate::ingest::Ingester;\nuse crate::{store::Store, aggregate};",
        ),
        file(
            "config",
            "use crate::bus::kafka;\nfn f() { crate::store::Store::open(); }",
        ),
        file(
            "event",
            "use std::fs::File;\nfn now() { chrono::Utc::now(); }",
        ),
        file(
            "counters",
            "use crate::metrics::Metrics;\nuse tokio::sync::Mutex;",
        ),
        file("newcomer", ""),
    ]);
    for expected in [
        "web uses crate::ingest",
        "web uses crate::aggregate",
        "config uses crate::bus",
        "config uses crate::store",
        "event is the domain layer but mentions std::fs",
        "event is the domain layer but mentions Utc::now",
        "counters uses crate::metrics",
        "counters is the domain layer but mentions tokio",
        "newcomer is not in the layer table",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "{expected:?} not reported in {problems:#?}"
        );
    }
    // What a module may use is not reported.
    let fine = violations(&[file(
        "web",
        "use crate::store::Store;\nuse crate::ComponentContext;",
    )]);
    assert!(fine.is_empty(), "{fine:?}");
}
