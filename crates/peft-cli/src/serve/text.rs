//! A generated sequence's text, piece by piece: each new token's text is
//! the decoded sequence less what was already sent, holding back an
//! incomplete character (a token that ends inside a UTF-8 sequence) and a
//! possible start of a stop text, so that the pieces joined are exactly
//! `decode(all tokens)` cut at the first stop text.

use std::sync::Arc;

use peft_core::Result;
use peft_models::tokenizer::Tokenizer;

/// Decodes a growing sequence into new text.
pub struct TextStream {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    /// Bytes of the decoded text already sent.
    sent: usize,
    stop: Vec<String>,
}

impl TextStream {
    /// An empty sequence that ends at the first of `stop` (empty texts are
    /// ignored).
    pub fn new(tokenizer: Arc<Tokenizer>, stop: Vec<String>) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            sent: 0,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// Adds token `id`: the text it releases, and whether a stop text was
    /// reached (the text is then cut before it and the sequence is over).
    pub fn push(&mut self, id: u32) -> Result<(String, bool)> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if let Some(at) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            return Ok((self.release(&text, at), true));
        }
        let complete = text.trim_end_matches('\u{FFFD}').len();
        let held = self
            .stop
            .iter()
            .map(|s| partial_suffix(&text[..complete], s))
            .max()
            .unwrap_or(0);
        Ok((self.release(&text, complete - held), false))
    }

    /// The text still held back, at the sequence's end.
    pub fn finish(&mut self) -> String {
        match self.tokenizer.decode(&self.ids) {
            Ok(text) => {
                let end = text.len();
                self.release(&text, end)
            }
            Err(_) => String::new(),
        }
    }

    /// `text[sent..upto]`, marked sent.
    fn release(&mut self, text: &str, upto: usize) -> String {
        if upto <= self.sent || !text.is_char_boundary(self.sent) || !text.is_char_boundary(upto) {
            return String::new();
        }
        let piece = text[self.sent..upto].to_string();
        self.sent = upto;
        piece
    }
}

/// The length of the longest end of `text` that begins `stop` (shorter
/// than `stop` itself), on a character boundary.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&k| {
            k <= text.len()
                && stop.is_char_boundary(k)
                && text.is_char_boundary(text.len() - k)
                && text.ends_with(&stop[..k])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_stop_texts_are_held_back() {
        assert_eq!(partial_suffix("hello wor", "world"), 3);
        assert_eq!(partial_suffix("hello", "world"), 0);
        assert_eq!(partial_suffix("ab", "abc"), 2);
        assert_eq!(partial_suffix("xé", "éa"), "é".len());
    }
}
