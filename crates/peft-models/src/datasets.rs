//! Readers for the real datasets the examples train on.

use std::path::Path;

use peft_core::{PeftError, Result};

/// One labelled sentence.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    /// The dataset's own id.
    pub id: u64,
    /// The text.
    pub text: String,
    /// Class index.
    pub label: usize,
}

/// The Rotten Tomatoes sentences of Hutto & Gilbert (ICWSM 2014), as shipped
/// in vaderSentiment's source distribution: `id \t score \t text` per line.
/// Label 1 for a positive score, 0 for a negative one; the few sentences
/// scored exactly 0 are left out.
pub fn rotten_tomatoes(dir: &Path) -> Result<Vec<Labelled>> {
    let path = dir.join("movieReviewSnippets_GroundTruth.txt");
    let text = std::fs::read_to_string(&path).map_err(|source| PeftError::Io {
        path: path.clone(),
        source,
    })?;
    let bad = |line: usize, why: &str| PeftError::Checkpoint {
        path: path.clone(),
        message: format!("line {line}: {why}"),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, '\t');
        let (Some(id), Some(score), Some(text)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(i + 1, "expected `id<TAB>score<TAB>text`"));
        };
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| bad(i + 1, "id is not an integer"))?;
        let score: f64 = score
            .trim()
            .parse()
            .map_err(|_| bad(i + 1, "score is not a number"))?;
        if score == 0.0 {
            continue;
        }
        out.push(Labelled {
            id,
            text: text.to_string(),
            label: usize::from(score > 0.0),
        });
    }
    Ok(out)
}

/// The fixed split used throughout: every tenth sentence (by id) is held out.
pub fn split_held_out(data: Vec<Labelled>) -> (Vec<Labelled>, Vec<Labelled>) {
    data.into_iter().partition(|s| s.id % 10 != 0)
}
