//! Where the stream's timestamps say the audio is, while windows are cut from the sample count.
//!
//! Modelled on `GstAudioBaseSink`: a buffer that starts within `alignment-threshold` of where
//! the previous aligned buffer ended is aligned, and the timeline follows its timestamp, so
//! clock drift and jitter move the reported times but never the windows. A deviation beyond the
//! threshold is a discontinuity at once when the buffer is flagged DISCONT, and otherwise only
//! once it has lasted `discont-wait`; the element holds the audio of a deviation that is not
//! yet decided, so that a confirmed one is cut where it began and a spike of jitter loses
//! nothing. Plain integer nanoseconds: no GStreamer types, so unit tests drive it directly.

use std::collections::VecDeque;

/// Timestamp deviations up to this are rounding, not drift.
const ROUNDING_NS: u64 = 1_000;

/// The two knobs, read from the settings once per buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// Largest distance (ns) between a buffer's timestamp and where the stream should be that
    /// still counts as continuous.
    pub threshold: u64,
    /// How long (ns of stream time) a larger deviation must last, without a DISCONT flag, to
    /// count as a discontinuity; 0: at once.
    pub discont_wait: u64,
}

/// What a buffer's timestamp says about the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Continuous with the audio before it: windows go on.
    Aligned,
    /// Deviates, but not (yet) for long enough: hold it until that is decided.
    Hold,
    /// A real gap or overlap: windows restart.
    Discont,
}

#[derive(Debug, Default)]
pub struct Timeline {
    /// Where the next buffer should start: the last aligned buffer's PTS plus the audio since.
    next: Option<u64>,
    /// PTS of the first held buffer, when a deviation is being timed.
    deviation_start: Option<u64>,
    /// (audio ns since the start of the window stream, PTS) at the start of each timestamped
    /// buffer whose windows are not all out yet.
    marks: VecDeque<(u64, u64)>,
    /// Audio in the window stream: ns before the last rate change, input frames since.
    base_ns: u64,
    frames: u64,
    rate: u32,
}

/// Duration of `frames` at `rate` in ns (0 for an unknown rate).
pub fn frames_to_ns(frames: u64, rate: u32) -> u64 {
    if rate == 0 {
        return 0;
    }
    (frames as u128 * 1_000_000_000 / rate as u128) as u64
}

impl Timeline {
    pub fn new(rate: u32) -> Self {
        Self {
            rate,
            ..Self::default()
        }
    }

    /// Decides a buffer of `frames` starting at `pts` (flagged DISCONT or not). A deviation
    /// lasts from the start of the first deviating buffer to the end of the latest.
    pub fn classify(&self, pts: Option<u64>, frames: u64, discont: bool, a: Alignment) -> Verdict {
        let (Some(pts), Some(next)) = (pts, self.next) else {
            // Nothing to compare: a buffer without a timestamp continues what is going on.
            return if self.deviation_start.is_some() {
                Verdict::Hold
            } else {
                Verdict::Aligned
            };
        };
        if pts.abs_diff(next) <= a.threshold {
            return Verdict::Aligned;
        }
        if discont || a.discont_wait == 0 {
            return Verdict::Discont;
        }
        let start = self.deviation_start.unwrap_or(pts);
        let end = pts + frames_to_ns(frames, self.rate);
        if end.abs_diff(start) >= a.discont_wait {
            Verdict::Discont
        } else {
            Verdict::Hold
        }
    }

    /// Takes `frames` of audio into the window stream. A marked buffer is one whose timestamp
    /// the timeline follows (an aligned one, or the first of a new stream: `origin` stands in
    /// when it has none); unmarked ones (held jitter found continuous after all) only advance
    /// the count.
    pub fn take(&mut self, pts: Option<u64>, frames: u64, marked: bool, origin: u64) {
        let at = self.audio_ns();
        match (self.marks.back(), marked, pts) {
            (None, _, _) => self.marks.push_back((at, pts.unwrap_or(origin))),
            // A timestamp that only rounds differently from the sample count (demuxers round
            // to the nanosecond) moves nothing: clean streams keep exact times.
            (Some(&(m_at, m_pts)), true, Some(p))
                if p.abs_diff(m_pts + (at - m_at)) > ROUNDING_NS =>
            {
                self.marks.push_back((at, p))
            }
            _ => {}
        }
        self.frames += frames;
        let ns = frames_to_ns(frames, self.rate);
        if marked {
            self.next = pts.or(self.next).map(|p| p + ns);
            self.deviation_start = None;
        }
    }

    /// Holds a deviating buffer: where the stream should be moves on by its duration.
    pub fn hold(&mut self, pts: Option<u64>, frames: u64) {
        if self.deviation_start.is_none() {
            self.deviation_start = pts;
        }
        self.next = self.next.map(|n| n + frames_to_ns(frames, self.rate));
    }

    /// The input rate changes: audio so far keeps its duration.
    pub fn set_rate(&mut self, rate: u32) {
        self.base_ns = self.audio_ns();
        self.frames = 0;
        self.rate = rate;
    }

    /// Forgets the window stream (a discontinuity, a gap, a flush); the rate stays.
    pub fn restart(&mut self) {
        *self = Self::new(self.rate);
    }

    /// True once the window stream has audio.
    pub fn started(&self) -> bool {
        !self.marks.is_empty()
    }

    fn audio_ns(&self) -> u64 {
        self.base_ns + frames_to_ns(self.frames, self.rate)
    }

    /// The PTS of the audio `ns` into the window stream, following the timestamps of the
    /// buffers around it. Called for windows in order: marks before `ns` are let go.
    pub fn pts_at(&mut self, ns: u64) -> u64 {
        while self.marks.len() > 1 && self.marks[1].0 <= ns {
            self.marks.pop_front();
        }
        match self.marks.front() {
            Some(&(at, pts)) => pts + ns.saturating_sub(at),
            None => ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SINK: Alignment = Alignment {
        threshold: 40 * MS,
        discont_wait: 1000 * MS,
    };

    /// 20 ms buffers at 16 kHz whose timestamps run `rate` times as fast as the samples, with
    /// a deterministic jitter of up to `jitter` ns: every buffer is aligned.
    fn drifting(rate: f64, jitter: i64) {
        let mut t = Timeline::new(16_000);
        for i in 0..3000u64 {
            let ideal = (i as f64 * 20.0 * MS as f64 * rate) as i64;
            let j = [0, jitter, -jitter, jitter / 2, -jitter / 3][(i * 7 % 5) as usize];
            let pts = (ideal + j + 100 * MS as i64) as u64;
            assert_eq!(
                t.classify(Some(pts), 320, false, SINK),
                Verdict::Aligned,
                "buffer {i}"
            );
            t.take(Some(pts), 320, true, 0);
        }
        // A window 50 s in is reported near where the timestamps put it.
        let got = t.pts_at(50_000 * MS) as f64;
        let want = 100.0 * MS as f64 + 50_000.0 * MS as f64 * rate;
        assert!(
            (got - want).abs() <= (jitter + 20 * MS as i64) as f64,
            "{got} vs {want}"
        );
    }

    #[test]
    fn drift_and_jitter_are_followed() {
        drifting(1.08, 15 * MS as i64);
        drifting(0.92, 15 * MS as i64);
        drifting(0.9, 0);
    }

    #[test]
    fn a_clean_stream_maps_samples_to_its_timestamps_exactly() {
        let mut t = Timeline::new(44_100);
        for i in 0..100u64 {
            let pts = 7 + i * 4410 * 1_000_000_000 / 44_100;
            assert_eq!(t.classify(Some(pts), 4410, false, SINK), Verdict::Aligned);
            t.take(Some(pts), 4410, true, 0);
        }
        assert_eq!(t.pts_at(3_000_000_000), 3_000_000_007);
        // Timestamps rounded up where the sample count rounds down: the same exact times.
        let mut t = Timeline::new(22_050);
        for i in 0..100u64 {
            let pts = (i * 2205 * 1_000_000_000).div_ceil(22_050);
            t.take(Some(pts), 2205, true, 0);
        }
        assert_eq!(t.pts_at(1_000_000_000), 1_000_000_000);
    }

    #[test]
    fn a_flagged_jump_is_a_discontinuity_at_once() {
        let mut t = Timeline::new(16_000);
        t.take(Some(0), 1600, true, 0);
        assert_eq!(
            t.classify(Some(600 * MS), 1600, true, SINK),
            Verdict::Discont
        );
        // The flag alone, with the timestamp where it should be, changes nothing.
        assert_eq!(
            t.classify(Some(100 * MS), 1600, true, SINK),
            Verdict::Aligned
        );
    }

    #[test]
    fn an_unflagged_jump_counts_once_it_lasts_discont_wait() {
        let mut t = Timeline::new(16_000);
        t.take(Some(0), 1600, true, 0);
        // 500 ms ahead from 100 ms on, in 100 ms buffers.
        let mut pts = 600 * MS;
        let mut verdicts = Vec::new();
        for _ in 0..12 {
            let v = t.classify(Some(pts), 1600, false, SINK);
            verdicts.push(v);
            if v != Verdict::Hold {
                break;
            }
            t.hold(Some(pts), 1600);
            pts += 100 * MS;
        }
        // The tenth deviating buffer ends 1 s after the first began.
        assert_eq!(verdicts.len(), 10);
        assert!(verdicts[..9].iter().all(|v| *v == Verdict::Hold));
        assert_eq!(verdicts[9], Verdict::Discont);
        // One deviating buffer as long as discont-wait decides at once.
        let mut t = Timeline::new(16_000);
        t.take(Some(0), 1600, true, 0);
        assert_eq!(
            t.classify(Some(20_000 * MS), 16_000, false, SINK),
            Verdict::Discont
        );
    }

    #[test]
    fn a_spike_shorter_than_discont_wait_is_forgiven() {
        let mut t = Timeline::new(16_000);
        t.take(Some(0), 1600, true, 0);
        assert_eq!(t.classify(Some(300 * MS), 1600, false, SINK), Verdict::Hold);
        t.hold(Some(300 * MS), 1600);
        // Back on the old timeline: aligned, and the held audio was continuous.
        assert_eq!(
            t.classify(Some(200 * MS), 1600, false, SINK),
            Verdict::Aligned
        );
        t.take(Some(300 * MS), 1600, false, 0);
        t.take(Some(200 * MS), 1600, true, 0);
        assert_eq!(t.pts_at(150 * MS), 150 * MS);
        // No wait: every deviation counts at once.
        let none = Alignment {
            discont_wait: 0,
            ..SINK
        };
        assert_eq!(
            t.classify(Some(900 * MS), 1600, false, none),
            Verdict::Discont
        );
    }

    #[test]
    fn rate_changes_keep_the_audio_duration() {
        let mut t = Timeline::new(44_100);
        t.take(Some(0), 44_100, true, 0);
        t.set_rate(22_050);
        assert_eq!(
            t.classify(Some(1000 * MS), 22_050, false, SINK),
            Verdict::Aligned
        );
        t.take(Some(1000 * MS), 22_050, true, 0);
        assert_eq!(
            t.classify(Some(2000 * MS), 22_050, false, SINK),
            Verdict::Aligned
        );
        assert_eq!(t.pts_at(1500 * MS), 1500 * MS);
    }

    #[test]
    fn unstamped_streams_start_at_the_origin() {
        let mut t = Timeline::new(16_000);
        t.take(None, 16_000, true, 5 * MS);
        t.take(None, 16_000, true, 0);
        assert_eq!(t.pts_at(1500 * MS), 1505 * MS);
        t.restart();
        assert!(!t.started());
    }
}
