//! Hand-written zero-copy JSON: a validating reader producing borrowed views, and a writer into
//! caller buffers. See [`reader`] and [`writer`].

pub mod reader;
pub mod writer;

pub use reader::{
    ArrayIter, DEFAULT_MAX_DEPTH, JsonArray, JsonChars, JsonNumber, JsonObject, JsonStr, JsonValue,
    MAX_DEPTH_LIMIT, ObjectIter, parse, parse_with_depth,
};
pub use writer::{ArrayWriter, JsonWriter, ObjectWriter, Value, WireStr};
