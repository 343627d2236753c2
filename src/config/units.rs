//! Durations and sizes; shared with the plugins, which parse their own settings.

pub use gatewarden_plugins::units::{parse_duration, Size, Span};
