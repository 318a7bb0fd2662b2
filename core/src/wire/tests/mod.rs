//! Tests of the wire codecs (unit, golden, bad input, property).

mod control;
mod envelope;
mod frame;
mod json;
mod native;
mod outbound;
mod prop;
mod timestamp;
