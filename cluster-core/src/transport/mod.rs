//! Carrying typed requests between servers and agents.

pub mod tls;
