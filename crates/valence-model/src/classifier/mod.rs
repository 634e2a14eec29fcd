//! What turns pooled encoder features into valence: the feature scaler, the classifier heads
//! and the prosodic statistics a head may read beside the encoder's features.

pub mod familiarity;
pub mod head;
pub mod prosody;
pub mod scaler;
