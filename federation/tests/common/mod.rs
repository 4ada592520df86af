//! The in-process federation of `federation::local`, for these tests.

#![allow(unused_imports)]

pub use federation::local::*;
