//! Wire formats for events leaving walrelay.

pub mod json;
