//! The loss curve of a run as a small standalone SVG.

/// A run's curve: what [`svg`] draws.
pub struct Curve<'a> {
    /// Optimizer steps taken (the x axis' end).
    pub steps: usize,
    /// Mean training loss per logged interval: `(step, loss)`.
    pub losses: &'a [(usize, f64)],
    /// Evaluations: `(step, value)`.
    pub evals: &'a [(usize, f64)],
    /// The evaluation metric's name.
    pub metric: &'a str,
}

/// An SVG with the training loss (blue) and, on its own scale, the
/// evaluation metric (orange dots) against optimizer steps.
pub fn svg(out: &Curve) -> String {
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let max_step = out.steps.max(1) as f64;
    let scale = |vals: &[f64]| {
        let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let span = if hi > lo { hi - lo } else { 1.0 };
        (lo, hi, span)
    };
    let x = |s: usize| pad + (w - 2.0 * pad) * s as f64 / max_step;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{0}\" stroke=\"black\"/>\n\
         <text x=\"{1}\" y=\"{2}\" text-anchor=\"end\">step {3}</text>\n",
        h - pad,
        w - pad,
        h - pad + 16.0,
        out.steps
    );
    let losses: Vec<f64> = out.losses.iter().map(|l| l.1).collect();
    if !losses.is_empty() {
        let (lo, hi, span) = scale(&losses);
        let y = |v: f64| h - pad - (h - 2.0 * pad) * (v - lo) / span;
        let points: Vec<String> = out
            .losses
            .iter()
            .map(|(s, v)| format!("{:.1},{:.1}", x(*s), y(*v)))
            .collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n\
             <text x=\"{pad}\" y=\"{}\" fill=\"#1f77b4\">training loss {hi:.3} … {lo:.3}</text>\n",
            points.join(" "),
            pad - 8.0
        );
    }
    if !out.evals.is_empty() {
        let vals: Vec<f64> = out.evals.iter().map(|e| e.1).collect();
        let (lo, hi, span) = scale(&vals);
        let y = |v: f64| h - pad - (h - 2.0 * pad) * (v - lo) / span;
        for (s, v) in out.evals {
            svg += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#ff7f0e\"/>\n",
                x(*s),
                y(*v)
            );
        }
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#ff7f0e\">held-out {} {lo:.4} … {hi:.4}</text>\n",
            w - pad,
            pad - 8.0,
            out.metric
        );
    }
    svg + "</svg>\n"
}
