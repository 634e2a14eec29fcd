//! Codec round trips for training views: 16 kHz mono speech through Opus and RTP in GStreamer,
//! the way a media server's RTP call reaches the element.

use anyhow::{Context, Result, bail};
use gst::prelude::*;

/// The lowest and highest Opus bit rate a view is encoded at (VoIP calls use 12-32 kbps).
pub const OPUS_KBPS: (u32, u32) = (12, 32);

/// `x` (16 kHz mono) encoded with Opus at `kbps` (voice mode, constrained VBR), packed into RTP,
/// unpacked and decoded again, back at 16 kHz. RTP carries no pre-skip, so the decoded audio
/// starts a few milliseconds late (the encoder's look-ahead), as an RTP receiver hears it; the
/// result is cut or padded with silence to `x`'s length.
pub fn opus_round_trip(x: &[f32], kbps: u32) -> Result<Vec<f32>> {
    gst::init()?;
    if x.is_empty() {
        return Ok(Vec::new());
    }
    if !(6..=510).contains(&kbps) {
        bail!("Opus bit rate {kbps} kbps is outside 6-510 kbps");
    }
    let caps = gst_audio::AudioCapsBuilder::new_interleaved()
        .format(gst_audio::AudioFormat::F32le)
        .rate(16000)
        .channels(1)
        .build();
    let src = gst_app::AppSrc::builder()
        .caps(&caps)
        .format(gst::Format::Time)
        .build();
    let make = |name: &str| {
        gst::ElementFactory::make(name)
            .build()
            .with_context(|| format!("GStreamer element {name} (gst-plugins-base/-good)"))
    };
    let encode = gst::ElementFactory::make("opusenc")
        .property("bitrate", (kbps * 1000) as i32)
        .property_from_str("audio-type", "voice")
        .build()
        .context("GStreamer element opusenc (gst-plugins-base)")?;
    let (pay, depay, decode) = (make("rtpopuspay")?, make("rtpopusdepay")?, make("opusdec")?);
    // opusenc takes 16-bit samples; the decoder gives 48 kHz.
    let to_s16 = make("audioconvert")?;
    let (convert, resample) = (make("audioconvert")?, make("audioresample")?);
    let sink = gst_app::AppSink::builder().caps(&caps).sync(false).build();
    let pipeline = gst::Pipeline::new();
    let chain = [
        src.upcast_ref(),
        &to_s16,
        &encode,
        &pay,
        &depay,
        &decode,
        &convert,
        &resample,
        sink.upcast_ref(),
    ];
    pipeline.add_many(chain)?;
    gst::Element::link_many(chain)?;
    pipeline.set_state(gst::State::Playing)?;
    let result = (|| -> Result<Vec<f32>> {
        let mut buffer =
            gst::Buffer::from_slice(x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        {
            let b = buffer.get_mut().context("new buffer is writable")?;
            b.set_pts(gst::ClockTime::ZERO);
            b.set_duration(gst::ClockTime::from_nseconds(
                x.len() as u64 * 1_000_000_000 / 16000,
            ));
        }
        src.push_buffer(buffer)?;
        src.end_of_stream()?;
        let mut out = crate::decode::drain_f32(&pipeline, &sink, "Opus round trip")?;
        if out.is_empty() {
            bail!("Opus round trip decoded nothing");
        }
        out.resize(x.len(), 0.0);
        Ok(out)
    })();
    pipeline.set_state(gst::State::Null)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::tests::sine as tone;
    use crate::augment::{RATE, rms};

    /// Rising zero crossings per second.
    fn pitch(x: &[f32]) -> f64 {
        let crossings = x.windows(2).filter(|w| w[0] < 0.0 && w[1] >= 0.0).count() as f64;
        crossings / (x.len() as f64 / RATE)
    }

    #[test]
    fn opus_keeps_length_pitch_and_level_and_is_lossy() {
        let x = tone(440.0, 1.5);
        for kbps in [OPUS_KBPS.0, OPUS_KBPS.1] {
            let y = opus_round_trip(&x, kbps).unwrap();
            assert_eq!(y.len(), x.len());
            // Skip the start (encoder look-ahead and the codec settling).
            let (xs, ys) = (&x[1600..], &y[1600..]);
            assert!(
                (pitch(ys) - 440.0).abs() < 5.0,
                "{kbps} kbps: {} Hz",
                pitch(ys)
            );
            let level_db = 20.0 * (rms(ys) / rms(xs)).log10();
            assert!(level_db.abs() < 2.0, "{kbps} kbps: level {level_db:.2} dB");
            assert!(y.iter().all(|v| v.is_finite()));
            assert_ne!(x, y, "a lossy codec changes the samples");
        }
    }

    #[test]
    fn opus_rejects_impossible_bit_rates_and_passes_empty_input() {
        assert!(opus_round_trip(&tone(440.0, 0.1), 2).is_err());
        assert!(opus_round_trip(&[], 16).unwrap().is_empty());
    }
}
