//! A generated sequence's text, piece by piece, in time linear in its
//! length: each new token is decoded in a window that starts at the
//! previous piece's tokens (whose text is known), the text past that
//! known text is the new piece, as Hugging Face's text-generation-inference
//! and vLLM detokenize incrementally. A window's first token decodes as it
//! would anywhere (a SentencePiece tokenizer drops a leading space there,
//! in both decodes), so the pieces joined are `decode(all tokens)`. An
//! incomplete character (a token that ends inside a UTF-8 sequence) and a
//! possible start of a stop text are held back; the text ends at the first
//! stop text.

use std::sync::Arc;

use peft_core::Result;
use peft_models::tokenizer::Tokenizer;

/// Decodes a growing sequence into new text.
pub struct TextStream {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    /// The first token of the next decode's window: the previous piece's.
    prefix: usize,
    /// The first token not yet decoded into `text`.
    read: usize,
    /// The text decoded so far, whole characters.
    text: String,
    /// Bytes of `text` already sent.
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
            prefix: 0,
            read: 0,
            text: String::new(),
            sent: 0,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// Adds token `id`: the text it releases, and whether a stop text was
    /// reached (the text is then cut before it and the sequence is over).
    pub fn push(&mut self, id: u32) -> Result<(String, bool)> {
        self.ids.push(id);
        self.decode_new(false)?;
        if let Some(at) = self.stop_at() {
            return Ok((self.release(at), true));
        }
        let unsent = &self.text[self.sent..];
        let held = self
            .stop
            .iter()
            .map(|s| partial_suffix(unsent, s))
            .max()
            .unwrap_or(0);
        Ok((self.release(self.text.len() - held), false))
    }

    /// The text still held back, at the sequence's end (up to a stop text
    /// it completes).
    pub fn finish(&mut self) -> String {
        if self.decode_new(true).is_err() {
            return String::new();
        }
        let end = self.stop_at().unwrap_or(self.text.len());
        self.release(end)
    }

    /// Decodes the tokens past `read` into `text`: the window's text less
    /// its known start. A window whose text ends in an incomplete
    /// character waits for the next token, unless the sequence is over.
    fn decode_new(&mut self, last: bool) -> Result<()> {
        if self.read == self.ids.len() {
            return Ok(());
        }
        let known = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..])?;
        let complete = last || !now.ends_with('\u{FFFD}');
        if complete && now.len() > known.len() && now.is_char_boundary(known.len()) {
            self.text.push_str(&now[known.len()..]);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        Ok(())
    }

    /// Where the first stop text starts. Only the unsent text can hold one:
    /// what was sent held no stop text, nor the start of one.
    fn stop_at(&self) -> Option<usize> {
        let unsent = &self.text[self.sent..];
        self.stop
            .iter()
            .filter_map(|s| unsent.find(s.as_str()))
            .min()
            .map(|at| self.sent + at)
    }

    /// `text[sent..upto]`, marked sent.
    fn release(&mut self, upto: usize) -> String {
        if upto <= self.sent || !self.text.is_char_boundary(upto) {
            return String::new();
        }
        let piece = self.text[self.sent..upto].to_string();
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
    use peft_core::rng::SplitMix64;

    #[test]
    fn partial_stop_texts_are_held_back() {
        assert_eq!(partial_suffix("hello wor", "world"), 3);
        assert_eq!(partial_suffix("hello", "world"), 0);
        assert_eq!(partial_suffix("ab", "abc"), 2);
        assert_eq!(partial_suffix("xé", "éa"), "é".len());
    }

    /// SmolLM2's byte-level tokenizer: sequences of random token ids (many
    /// of them bytes that split a character) stream pieces that join to
    /// the whole sequence's decode, or to its text before the first stop
    /// text; never a broken character.
    #[test]
    fn pieces_join_to_the_whole_decode() {
        let gguf = peft_models::assets::fetch("smollm2")
            .unwrap()
            .join("SmolLM2-135M-Instruct.Q4_1.gguf");
        let tokenizer = Arc::new(crate::tasks::tokenizer_of(&gguf).unwrap());
        let text = "Call me Ishmael. Some years ago — naïve, 1851 — I went to sea: 🐋 ahoy!";
        let words = tokenizer.encode(text).unwrap();
        let mut rng = SplitMix64(7);
        let mut cut = 0;
        for case in 0..40 {
            // Real text's tokens mixed with random ones (bytes 0x80.. among
            // them, which decode to halves of characters).
            let ids: Vec<u32> = (0..120)
                .map(|i| match rng.next_u64() % 3 {
                    0 => (rng.next_u64() % 49_152) as u32,
                    1 => 130 + (rng.next_u64() % 120) as u32,
                    _ => words[i % words.len()],
                })
                .collect();
            let whole = tokenizer.decode(&ids).unwrap();
            let stop = match case % 2 {
                0 => vec![],
                _ => vec![whole.chars().skip(40).take(3).collect::<String>()],
            };
            let mut stream = TextStream::new(tokenizer.clone(), stop.clone());
            let mut joined = String::new();
            let mut stopped = false;
            for &id in &ids {
                let (piece, end) = stream.push(id).unwrap();
                joined.push_str(&piece);
                if end {
                    stopped = true;
                    break;
                }
            }
            if !stopped {
                joined.push_str(&stream.finish());
            }
            let want = match stop.first().and_then(|s| whole.find(s.as_str())) {
                Some(at) => {
                    cut += 1;
                    &whole[..at]
                }
                None => whole.as_str(),
            };
            assert_eq!(joined, want, "case {case}: {ids:?}");
        }
        assert!(cut >= 10, "only {cut} cases reached a stop text");
    }

    /// A word-level tokenizer joins its tokens with spaces: a piece is
    /// what a token adds after the previous piece's tokens (`" w9"`), not
    /// the token decoded alone (`"w9"`).
    #[test]
    fn pieces_keep_the_spaces_between_words() {
        let dir = peft_models::fixtures::temp_dir("text-stream-words");
        std::fs::create_dir_all(&dir).unwrap();
        let vocab: serde_json::Map<String, serde_json::Value> = (0..8)
            .map(|i| (format!("w{i}"), serde_json::json!(i)))
            .collect();
        let json = serde_json::json!({"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}});
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
        let tokenizer = Arc::new(Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap());
        let ids = [3, 1, 4, 1, 5, 2, 6];
        let mut stream = TextStream::new(tokenizer.clone(), vec!["w5 w2".into()]);
        let mut pieces = Vec::new();
        for id in ids {
            let (piece, stopped) = stream.push(id).unwrap();
            pieces.push(piece);
            if stopped {
                break;
            }
        }
        assert_eq!(pieces, ["w3", " w1", " w4", " w1", " ", ""]);
        assert_eq!(pieces.concat(), "w3 w1 w4 w1 ");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
