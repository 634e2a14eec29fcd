pub mod classify;
pub mod embed;
pub mod plot;
pub mod train;
