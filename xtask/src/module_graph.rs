//! The import graph between a crate's top-level modules (`crate::name`
//! paths in each file), and its cycles. Guards the invariant that no two
//! modules of a crate import each other, directly or around a loop
//! (`docs/ARCHITECTURE.md`): the test below runs it on every crate under
//! `crates/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module name → the top-level modules its files name through
/// `crate::`. Files under `src/m/` count as module `m`; `lib.rs`, `main.rs`
/// and `#[cfg(test)] mod tests` blocks at the end of a file are left out.
pub fn graph(src: &Path) -> std::io::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut pending = vec![src.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let first = rel.components().next().expect("a file");
            let module = first
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if module == "lib" || module == "main" {
                continue;
            }
            // A file listed but gone when read (a tool's temporary file)
            // is not part of the tree; any other failure names the file.
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("{}: {e}", path.display()),
                    ))
                }
            };
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            let deps = out.entry(module.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    deps.insert(name);
                }
            }
        }
    }
    let known: BTreeSet<String> = out.keys().cloned().collect();
    for deps in out.values_mut() {
        deps.retain(|d| known.contains(d));
    }
    Ok(out)
}

/// One cycle through each strongly connected set of modules, as the
/// modules along it (empty when the graph has none).
pub fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        state.insert(node.to_string(), 1);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let start = path.iter().position(|p| p == next).expect("on the path");
                    found.push(path[start..].to_vec());
                }
                Some(_) => {}
                None => visit(next, graph, state, path, found),
            }
        }
        path.pop();
        state.insert(node.to_string(), 2);
    }
    let (mut state, mut found) = (BTreeMap::new(), Vec::new());
    for node in graph.keys() {
        if !state.contains_key(node) {
            visit(node, graph, &mut state, &mut Vec::new(), &mut found);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_crate_has_modules_that_import_each_other() {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates");
        let mut checked = 0;
        for entry in std::fs::read_dir(&crates).unwrap() {
            let src = entry.unwrap().path().join("src");
            let g = graph(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
            assert!(!g.is_empty(), "{}: no modules read", src.display());
            let found = cycles(&g);
            assert!(
                found.is_empty(),
                "{}: import cycles {found:?}",
                src.display()
            );
            checked += 1;
        }
        assert!(checked >= 7, "only {checked} crates under crates/");
    }

    #[test]
    fn a_loop_of_three_modules_is_found() {
        let dir = std::env::temp_dir().join(format!("module-graph-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("c")).unwrap();
        std::fs::write(dir.join("lib.rs"), "use crate::a;").unwrap();
        std::fs::write(dir.join("a.rs"), "use crate::b::X;").unwrap();
        std::fs::write(dir.join("b.rs"), "fn f() { crate::c::g() }").unwrap();
        std::fs::write(dir.join("c/mod.rs"), "//! x").unwrap();
        std::fs::write(dir.join("c/inner.rs"), "use crate::a;").unwrap();
        std::fs::write(
            dir.join("d.rs"),
            "use crate::a;\n#[cfg(test)]\nmod tests { use crate::d; use crate::b; }",
        )
        .unwrap();
        let g = graph(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(g["d"], BTreeSet::from(["a".to_string()]), "tests left out");
        let found = cycles(&g);
        assert_eq!(found, vec![vec!["a", "b", "c"]]);
        let mut acyclic = g.clone();
        acyclic.get_mut("c").unwrap().clear();
        assert!(cycles(&acyclic).is_empty());
    }
}
