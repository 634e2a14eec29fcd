//! Speech encoders with every hidden state exposed: Whisper's audio encoder and Wav2Vec2, the
//! checkpoint readers they load through, and the CTranslate2 importer.

pub mod adapted;
pub mod ct2;
pub mod wav2vec2;
pub mod weights;
pub mod whisper;
