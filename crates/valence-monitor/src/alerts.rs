//! Alert rules over a stream's windows: a rule watches one class's probability, averaged over
//! the most recent `over` seconds of speech (windows without probabilities, silence and
//! no-speech, neither count nor reset it), raises at `above` and clears below `clear`.

use std::collections::VecDeque;

use crate::config::AlertRule;

/// One rule's state on one stream.
#[derive(Debug, Clone, Default)]
pub struct AlertState {
    pub active: bool,
    /// (start, end, probability) of the windows that make up the last `over` seconds of speech.
    windows: VecDeque<(f64, f64, f64)>,
}

/// What a new window changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    Raised { mean: f64 },
    Cleared { mean: f64 },
}

/// Seconds covered by the union of windows that start in non-decreasing order.
fn covered<'a>(windows: impl Iterator<Item = &'a (f64, f64, f64)>) -> f64 {
    let mut total = 0.0;
    let mut reach = f64::NEG_INFINITY;
    for &(s, e, _) in windows {
        total += (e - s.max(reach)).max(0.0);
        reach = reach.max(e);
    }
    total
}

impl AlertState {
    /// Mean probability over the last `over` seconds of speech, once that much was heard.
    pub fn mean(&self, rule: &AlertRule) -> Option<f64> {
        if self.windows.is_empty() || covered(self.windows.iter()) + 1e-6 < rule.over_s {
            return None;
        }
        Some(self.windows.iter().map(|w| w.2).sum::<f64>() / self.windows.len() as f64)
    }

    /// A classified window (stream seconds) and its probability of the rule's class.
    pub fn push(&mut self, rule: &AlertRule, start: f64, end: f64, p: f64) -> Option<Transition> {
        if self.windows.back().is_some_and(|w| start < w.0) {
            // The stream's timeline restarted: what came before is another stretch.
            self.windows.clear();
        }
        self.windows.push_back((start, end, p));
        while self.windows.len() > 1 && covered(self.windows.iter().skip(1)) + 1e-6 >= rule.over_s {
            self.windows.pop_front();
        }
        let mean = self.mean(rule)?;
        if !self.active && mean >= rule.above {
            self.active = true;
            return Some(Transition::Raised { mean });
        }
        if self.active && mean < rule.clear {
            self.active = false;
            return Some(Transition::Cleared { mean });
        }
        None
    }

    /// The source restarted: its windows begin again (a raised alert stays until speech clears it).
    pub fn restart(&mut self) {
        self.windows.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> AlertRule {
        AlertRule {
            name: "neg".into(),
            class: "negative".into(),
            above: 0.7,
            clear: 0.5,
            over_s: 10.0,
            sources: vec![],
            line: 1,
        }
    }

    /// 3 s windows every second with probability `p(i)`; returns the transitions by window.
    fn run(
        st: &mut AlertState,
        from: usize,
        n: usize,
        p: impl Fn(usize) -> f64,
    ) -> Vec<(usize, Transition)> {
        let r = rule();
        (from..from + n)
            .filter_map(|i| st.push(&r, i as f64, i as f64 + 3.0, p(i)).map(|t| (i, t)))
            .collect()
    }

    #[test]
    fn raises_after_enough_speech_and_clears_with_hysteresis() {
        let mut st = AlertState::default();
        // 3 s windows every second: 10 s of speech are covered by the 8th window (0..10 s).
        let t = run(&mut st, 0, 20, |_| 0.9);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, 7, "{t:?}");
        // Between clear (0.5) and above (0.7): stays raised.
        assert!(run(&mut st, 20, 20, |_| 0.6).is_empty());
        assert!(st.active);
        let t = run(&mut st, 40, 20, |_| 0.1);
        assert_eq!(t.len(), 1);
        assert!(matches!(t[0].1, Transition::Cleared { mean } if mean < 0.5));
        assert!(!st.active);
    }

    #[test]
    fn short_bursts_do_not_raise_and_gaps_do_not_reset() {
        let mut st = AlertState::default();
        // 5 s of negative speech: not enough.
        assert!(run(&mut st, 0, 3, |_| 0.95).is_empty());
        // More speech after a pause (stream time jumps ahead: no-speech windows in between).
        let t = run(&mut st, 30, 6, |_| 0.95);
        assert_eq!(t.len(), 1, "speech either side of a pause adds up");
    }

    #[test]
    fn a_restarted_timeline_starts_over() {
        let mut st = AlertState::default();
        assert!(run(&mut st, 100, 6, |_| 0.95).is_empty());
        assert!(
            run(&mut st, 0, 6, |_| 0.95).is_empty(),
            "earlier timestamps: new stretch"
        );
        assert_eq!(
            covered([(0.0, 3.0, 0.0), (1.0, 4.0, 0.0), (10.0, 13.0, 0.0)].iter()),
            7.0
        );
    }
}
