//! The allowed direction between the crate's top-level modules, as
//! ARCHITECTURE.md writes it (its `layers` block, highest first): a module
//! may use only modules of lower layers. A new import loop, or a module
//! missing from the list, fails here.
//!
//! Test code is left out (`tests.rs` files and `#[cfg(test)] mod tests`
//! blocks): a test may build whatever it needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Layer index by module (0 = lowest), from ARCHITECTURE.md.
fn layers() -> BTreeMap<String, usize> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md"))
            .expect("ARCHITECTURE.md");
    let block = doc
        .split("```layers\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("ARCHITECTURE.md has a ```layers block");
    let rows: Vec<&str> = block.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = BTreeMap::new();
    for (i, row) in rows.iter().rev().enumerate() {
        for m in row.split_whitespace() {
            assert!(
                out.insert(m.to_string(), i).is_none(),
                "{m} is listed twice"
            );
        }
    }
    out
}

/// The top-level modules of `src/` and their non-test source files.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut files = Vec::new();
        if path.is_dir() {
            let mut stack = vec![path];
            while let Some(dir) = stack.pop() {
                for e in std::fs::read_dir(dir).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|x| x == "rs")
                        && p.file_name().is_some_and(|n| n != "tests.rs")
                    {
                        files.push(p);
                    }
                }
            }
        } else if path.extension().is_some_and(|x| x == "rs") {
            files.push(path);
        } else {
            continue;
        }
        out.insert(name, files);
    }
    out
}

/// `crate::NAME` uses in a file's non-test code, with their lines.
fn uses(text: &str) -> Vec<(String, usize)> {
    let code = text
        .find("#[cfg(test)]\nmod tests")
        .map_or(text, |i| &text[..i]);
    let mut out = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.push((name, n + 1));
        }
    }
    out
}

#[test]
fn modules_use_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layers = layers();
    let modules = modules(&src);
    let mut problems = Vec::new();
    for name in modules.keys() {
        if !layers.contains_key(name) {
            problems.push(format!(
                "module `{name}` is not in ARCHITECTURE.md's layers"
            ));
        }
    }
    for (name, files) in &modules {
        let Some(&mine) = layers.get(name) else {
            continue;
        };
        for file in files {
            let text = std::fs::read_to_string(file).unwrap();
            for (used, line) in uses(&text) {
                if used == *name {
                    continue;
                }
                let Some(&theirs) = layers.get(&used) else {
                    continue;
                };
                if theirs >= mine {
                    problems.push(format!(
                        "{}:{line}: `{name}` uses `{used}`, which is not below it",
                        file.strip_prefix(&src).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_sees_a_use_of_a_higher_layer() {
    let text = "use crate::plan::Plan;\nfn f() { crate::cli::main(); }\n#[cfg(test)]\nmod tests {\n use crate::daemon;\n}\n";
    let found: Vec<(String, usize)> = uses(text);
    assert_eq!(found, vec![("plan".to_string(), 1), ("cli".to_string(), 2)]);
}
