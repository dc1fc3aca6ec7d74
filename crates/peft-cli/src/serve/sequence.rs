//! One running sequence of a decoder engine: how its next token is picked
//! from the logits of its last step, what text it reports, and when it
//! ends. Where its forward passes run (the batch, or alone) is the
//! engine's business.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use peft_core::generate::Sampler;
use tokio::sync::mpsc;

use super::engine::{Event, Generation};
use super::error::ApiError;
use super::text::TextStream;

/// A sequence being generated.
pub struct Sequence {
    /// The logits its next token is sampled from.
    next: Vec<f32>,
    /// The adapter it names, for messages.
    adapter: Option<String>,
    sampler: Sampler,
    max_tokens: usize,
    prompt_tokens: usize,
    generated: usize,
    /// Tokens already counted by [`take_new_tokens`](Self::take_new_tokens).
    counted: usize,
    text: TextStream,
    events: mpsc::UnboundedSender<Event>,
}

/// What a sequence does after picking its token.
pub enum Turn {
    /// Goes on: feed it this token.
    Feed(u32),
    /// Is over (finished, failed or its client is gone); its end is
    /// reported.
    Over,
}

impl Sequence {
    /// The sequence `g` after its prompt, whose last logits are `next`.
    pub fn new(
        g: Generation,
        next: Vec<f32>,
        tokenizer: Arc<peft_models::tokenizer::Tokenizer>,
    ) -> Self {
        Sequence {
            next,
            adapter: g.adapter.map(|(name, _)| name),
            sampler: g.sampler,
            max_tokens: g.max_tokens,
            prompt_tokens: g.prompt.len(),
            generated: 0,
            counted: 0,
            text: TextStream::new(tokenizer, g.stop),
            events: g.events,
        }
    }

    /// Picks the next token and reports its text; says whether the
    /// sequence goes on.
    pub fn turn(&mut self, eos: &[u32]) -> Turn {
        if self.events.is_closed() {
            return Turn::Over;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| self.next_token(eos)));
        match outcome {
            Ok(Ok(Ok(token))) => Turn::Feed(token),
            Ok(Ok(Err(reason))) => {
                let _ = self.events.send(Event::Done {
                    finish_reason: reason,
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: self.generated,
                });
                Turn::Over
            }
            Ok(Err(e)) => {
                let _ = self.events.send(Event::Failed(e));
                Turn::Over
            }
            Err(_) => {
                self.fail(self.panicked());
                Turn::Over
            }
        }
    }

    /// The logits of the step that fed the last token.
    pub fn set_next(&mut self, logits: Vec<f32>) {
        self.next = logits;
    }

    /// Runs this sequence's own forward pass (`step` gives the next
    /// logits); `false` when it panicked (the sequence then failed).
    pub fn advance_alone(&mut self, step: impl FnOnce() -> Vec<f32>) -> bool {
        match catch_unwind(AssertUnwindSafe(step)) {
            Ok(next) => {
                self.next = next;
                true
            }
            Err(_) => {
                self.fail(self.panicked());
                false
            }
        }
    }

    /// Ends the sequence with `error`.
    pub fn fail(&self, error: ApiError) {
        let _ = self.events.send(Event::Failed(error));
    }

    /// Tokens generated since the last call.
    pub fn take_new_tokens(&mut self) -> usize {
        let new = self.generated - self.counted;
        self.counted = self.generated;
        new
    }

    fn panicked(&self) -> ApiError {
        ApiError::internal(format!(
            "generation with {} panicked",
            self.adapter.as_deref().unwrap_or("the base model")
        ))
    }

    /// The next token (`Ok(Ok(token))` to feed on), or `Ok(Err(finish_reason))`
    /// when the sequence ends here.
    fn next_token(
        &mut self,
        eos: &[u32],
    ) -> std::result::Result<std::result::Result<u32, &'static str>, ApiError> {
        let token = self.sampler.sample(&self.next);
        if eos.contains(&token) {
            self.flush();
            return Ok(Err("stop"));
        }
        self.generated += 1;
        let (delta, stopped) = self
            .text
            .push(token)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        if !delta.is_empty() {
            let _ = self.events.send(Event::Text(delta));
        }
        if stopped {
            return Ok(Err("stop"));
        }
        if self.generated >= self.max_tokens {
            self.flush();
            return Ok(Err("length"));
        }
        Ok(Ok(token))
    }

    /// Sends the text held back (an incomplete character or a possible
    /// start of a stop text) when the sequence ends.
    fn flush(&mut self) {
        let rest = self.text.finish();
        if !rest.is_empty() {
            let _ = self.events.send(Event::Text(rest));
        }
    }
}
