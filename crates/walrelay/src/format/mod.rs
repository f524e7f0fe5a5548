//! Wire formats for events leaving walrelay.

pub mod debezium;
pub mod json;
pub mod parse;
