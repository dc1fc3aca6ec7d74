//! Trainable/total parameter accounting, printed exactly as PEFT prints it.

use std::fmt;

/// Trainable and total parameter counts of a PEFT model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCount {
    /// Parameters the optimizer updates.
    pub trainable: usize,
    /// All parameters, base and adapters.
    pub all: usize,
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

impl ParamCount {
    /// `100 · trainable / all`.
    pub fn trainable_percent(&self) -> f64 {
        if self.all == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.all as f64
        }
    }
}

impl fmt::Display for ParamCount {
    /// PEFT's `print_trainable_parameters` line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.all),
            self.trainable_percent()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_peft() {
        let c = ParamCount {
            trainable: 3_584,
            all: 94_016,
        };
        assert_eq!(
            c.to_string(),
            "trainable params: 3,584 || all params: 94,016 || trainable%: 3.8121"
        );
        let c = ParamCount {
            trainable: 7,
            all: 1_234_567,
        };
        assert_eq!(
            c.to_string(),
            "trainable params: 7 || all params: 1,234,567 || trainable%: 0.0006"
        );
    }
}
