pub mod bench;
pub mod classify;
pub mod embed;
pub mod plot;
pub mod setup;
pub mod train;
