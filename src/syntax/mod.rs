//! Front end: the pest grammar (`grammar/weft.pest`), the syntax tree it produces, and the limits
//! that keep any input from exhausting the parser.

pub mod ast;
mod parser;

pub use parser::{parse, MAX_NESTING, MAX_SOURCE_BYTES};
