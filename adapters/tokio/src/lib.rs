//! tokio runtime adapter for tether-core.
