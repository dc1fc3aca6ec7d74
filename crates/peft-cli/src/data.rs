//! Datasets for `peft train` / `peft eval`: labelled text in JSONL, CSV or
//! TSV (columns named by the user), or plain text for causal-LM training.
//! Every problem is an error naming the file, the line and what is wrong.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use peft_core::rng::SplitMix64;
use peft_core::{PeftError, Result};
use serde_json::Value;

/// One labelled text.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The text.
    pub text: String,
    /// The label as written in the file (a list's JSON text).
    pub label: String,
    /// A list label's items: a multi-label text's labels, or a
    /// regression's values (`None` for a scalar).
    pub labels: Option<Vec<String>>,
}

impl Example {
    /// The list label's items, or the scalar label alone.
    pub fn label_list(&self) -> &[String] {
        match &self.labels {
            Some(l) => l,
            None => std::slice::from_ref(&self.label),
        }
    }
}

fn bad(path: &Path, line: usize, why: impl std::fmt::Display) -> PeftError {
    PeftError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("line {line}: {why}"),
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A JSON scalar as a label string (strings as is, numbers and booleans as written).
fn label_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A label field: a scalar, or a list of scalars as `(its JSON text,
/// items)`.
fn labels_of(v: &Value) -> Option<(String, Option<Vec<String>>)> {
    match v {
        Value::Array(items) => {
            let items: Option<Vec<String>> = items.iter().map(label_of).collect();
            items.map(|l| (v.to_string(), Some(l)))
        }
        v => label_of(v).map(|s| (s, None)),
    }
}

/// Splits one CSV/TSV line (double quotes escape separators and `""`).
fn split_delimited(line: &str, sep: char) -> std::result::Result<Vec<String>, &'static str> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if cur.is_empty() => quoted = true,
            (c, false) if c == sep => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quote");
    }
    out.push(cur);
    Ok(out)
}

/// Reads labelled examples from `path`: `.jsonl` (one object per line),
/// `.csv` or `.tsv` (a header row naming the columns). `text` and `label`
/// name the columns.
pub fn read_labelled(path: &Path, text: &str, label: &str) -> Result<Vec<Example>> {
    let content = read(path)?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_lowercase();
    let mut out = Vec::new();
    match ext.as_str() {
        "jsonl" | "json" => {
            for (i, line) in content.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| bad(path, i + 1, format!("not JSON: {e}")))?;
                let t = v.get(text).and_then(Value::as_str);
                let l = v.get(label).and_then(labels_of);
                match (t, l) {
                    (Some(t), Some((l, labels))) => out.push(Example {
                        text: t.to_string(),
                        label: l,
                        labels,
                    }),
                    (None, _) => return Err(bad(path, i + 1, format!("no string field `{text}`"))),
                    (_, None) => {
                        return Err(bad(
                            path,
                            i + 1,
                            format!("no field `{label}` holding a scalar or a list of scalars"),
                        ))
                    }
                }
            }
        }
        "csv" | "tsv" => {
            let sep = if ext == "csv" { ',' } else { '\t' };
            let mut lines = content
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty());
            let Some((_, header)) = lines.next() else {
                return Err(bad(path, 1, "empty file: a header row is needed"));
            };
            let header =
                split_delimited(header.trim_end_matches('\r'), sep).map_err(|e| bad(path, 1, e))?;
            let col = |name: &str| {
                header.iter().position(|h| h.trim() == name).ok_or_else(|| {
                    bad(path, 1, format!("no column `{name}` (columns: {header:?})"))
                })
            };
            let (ti, li) = (col(text)?, col(label)?);
            for (i, line) in lines {
                let fields = split_delimited(line.trim_end_matches('\r'), sep)
                    .map_err(|e| bad(path, i + 1, e))?;
                if fields.len() != header.len() {
                    return Err(bad(
                        path,
                        i + 1,
                        format!("{} fields, the header has {}", fields.len(), header.len()),
                    ));
                }
                // A cell holding a JSON list is a list label.
                let cell = fields[li].trim();
                let (label, labels) = match cell.starts_with('[') {
                    true => serde_json::from_str::<Value>(cell)
                        .ok()
                        .as_ref()
                        .and_then(labels_of)
                        .ok_or_else(|| {
                            bad(
                                path,
                                i + 1,
                                format!("`{cell}` is not a JSON list of scalars"),
                            )
                        })?,
                    false => (cell.to_string(), None),
                };
                out.push(Example {
                    text: fields[ti].clone(),
                    label,
                    labels,
                });
            }
        }
        other => {
            return Err(PeftError::Config(format!(
                "{}: unknown dataset format `.{other}` (jsonl, csv, tsv)",
                path.display()
            )))
        }
    }
    if out.is_empty() {
        return Err(bad(path, 1, "no examples"));
    }
    if let Some((i, _)) = out
        .iter()
        .enumerate()
        .find(|(_, e)| e.text.trim().is_empty())
    {
        return Err(PeftError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("example {}: empty text", i + 1),
        });
    }
    Ok(out)
}

/// The label set: sorted distinct labels (numbers in numeric order).
pub fn label_set(examples: &[Example]) -> Vec<String> {
    let set: BTreeSet<&str> = examples.iter().map(|e| e.label.as_str()).collect();
    let mut labels: Vec<String> = set.into_iter().map(str::to_string).collect();
    if labels.iter().all(|l| l.parse::<f64>().is_ok()) {
        labels.sort_by(|a, b| {
            a.parse::<f64>()
                .unwrap_or(0.0)
                .total_cmp(&b.parse::<f64>().unwrap_or(0.0))
        });
    }
    labels
}

/// Label indices of `examples` in `labels`; an unknown label is an error
/// naming it and the file.
pub fn label_ids(examples: &[Example], labels: &[String], origin: &Path) -> Result<Vec<usize>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            labels
                .iter()
                .position(|l| *l == e.label)
                .ok_or_else(|| PeftError::Checkpoint {
                    path: origin.to_path_buf(),
                    message: format!(
                        "example {}: unknown label `{}` (known: {labels:?})",
                        i + 1,
                        e.label
                    ),
                })
        })
        .collect()
}

/// A fixed split: a seeded shuffle, then the last `fraction` held out.
pub fn split<T: Clone>(items: &[T], fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut v = items.to_vec();
    SplitMix64(seed).shuffle(&mut v);
    let held = ((v.len() as f64 * fraction).round() as usize).min(v.len().saturating_sub(1));
    let train = v.split_off(held);
    (train, v)
}

/// Plain text for causal-LM training, read whole.
pub fn read_text(path: &Path) -> Result<String> {
    let t = read(path)?;
    if t.trim().is_empty() {
        return Err(PeftError::Checkpoint {
            path: PathBuf::from(path),
            message: "the text file is empty".into(),
        });
    }
    Ok(t)
}

/// Token ids cut into blocks of `block` tokens (the last partial block dropped).
pub fn blocks(ids: &[u32], block: usize) -> Vec<Vec<u32>> {
    ids.chunks_exact(block).map(<[u32]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("peft-cli-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_every_format_and_names_bad_rows() {
        let j = write(
            "a.jsonl",
            "{\"text\":\"good\",\"label\":1}\n\n{\"text\":\"bad\",\"label\":0}\n",
        );
        let e = read_labelled(&j, "text", "label").unwrap();
        assert_eq!(
            e[1],
            Example {
                text: "bad".into(),
                label: "0".into(),
                labels: None,
            }
        );
        // List labels, in a JSONL field or a CSV cell.
        let l = write(
            "l.jsonl",
            "{\"text\":\"a\",\"label\":[\"x\",2]}\n{\"text\":\"b\",\"label\":[]}\n",
        );
        let e = read_labelled(&l, "text", "label").unwrap();
        assert_eq!(e[0].label_list(), ["x", "2"]);
        assert_eq!(e[1].labels, Some(vec![]));
        let lc = write("l.csv", "text,label\na,\"[0.5, -1]\"\nb,3\n");
        let e = read_labelled(&lc, "text", "label").unwrap();
        assert_eq!(e[0].label_list(), ["0.5", "-1"]);
        assert_eq!(e[1].label_list(), ["3"]);
        let err =
            read_labelled(&write("m.csv", "text,label\na,[1\n"), "text", "label").unwrap_err();
        assert!(err.to_string().contains("not a JSON list"), "{err}");
        let err = read_labelled(
            &write("n.jsonl", "{\"text\":\"a\",\"label\":[[1]]}\n"),
            "text",
            "label",
        )
        .unwrap_err();
        assert!(err.to_string().contains("list of scalars"), "{err}");
        let c = write(
            "a.csv",
            "label,text\npos,\"a, quoted \"\"text\"\"\"\nneg,plain\n",
        );
        let e = read_labelled(&c, "text", "label").unwrap();
        assert_eq!(e[0].text, "a, quoted \"text\"");
        let t = write("a.tsv", "text\tlabel\nhello\tx\n");
        assert_eq!(read_labelled(&t, "text", "label").unwrap()[0].label, "x");

        let err = read_labelled(
            &write("b.jsonl", "{\"text\":\"a\",\"label\":1}\n{\"txt\":\"b\"}\n"),
            "text",
            "label",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("b.jsonl") && err.to_string().contains("line 2"),
            "{err}"
        );
        let err =
            read_labelled(&write("b.csv", "text,label\na,1,extra\n"), "text", "label").unwrap_err();
        assert!(
            err.to_string().contains("line 2") && err.to_string().contains("3 fields"),
            "{err}"
        );
        let err =
            read_labelled(&write("c.csv", "words,label\na,1\n"), "text", "label").unwrap_err();
        assert!(err.to_string().contains("no column `text`"), "{err}");
        let err = read_labelled(&write("d.txt", "x"), "text", "label").unwrap_err();
        assert!(err.to_string().contains("unknown dataset format"), "{err}");
        let err = label_ids(
            &[Example {
                text: "t".into(),
                label: "maybe".into(),
                labels: None,
            }],
            &["0".into()],
            &j,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown label `maybe`"), "{err}");
    }

    #[test]
    fn labels_sort_numerically_and_splits_are_fixed() {
        let ex: Vec<Example> = ["10", "2", "1"]
            .iter()
            .map(|l| Example {
                text: "t".into(),
                label: l.to_string(),
                labels: None,
            })
            .collect();
        assert_eq!(label_set(&ex), vec!["1", "2", "10"]);
        let items: Vec<u32> = (0..100).collect();
        let (a, b) = split(&items, 0.2, 7);
        assert_eq!((a.len(), b.len()), (80, 20));
        assert_eq!(split(&items, 0.2, 7), (a, b));
    }
}
