//! Logging shim: the crate logs through these macros only (same pattern as tether-core).
//!
//! With feature `defmt` they forward to `defmt`, with feature `log` to `log`, otherwise they expand
//! to nothing but still borrow every argument, so a call that would not compile under a backend
//! does not compile without one either. Format strings must use plain `{}` / `{:?}` placeholders so
//! both backends accept them. This module must be declared first in `lib.rs` so every other module
//! sees the macros.
#![allow(unused_macros)]

#[cfg(all(feature = "defmt", feature = "log"))]
compile_error!("features `defmt` and `log` are mutually exclusive: enable at most one");

macro_rules! trace {
    ($s:literal $(, $x:expr)* $(,)?) => {{
        #[cfg(feature = "defmt")]
        ::defmt::trace!($s $(, $x)*);
        #[cfg(feature = "log")]
        ::log::trace!($s $(, $x)*);
        #[cfg(not(any(feature = "defmt", feature = "log")))]
        let _ = ($(&$x,)*);
    }};
}

macro_rules! debug {
    ($s:literal $(, $x:expr)* $(,)?) => {{
        #[cfg(feature = "defmt")]
        ::defmt::debug!($s $(, $x)*);
        #[cfg(feature = "log")]
        ::log::debug!($s $(, $x)*);
        #[cfg(not(any(feature = "defmt", feature = "log")))]
        let _ = ($(&$x,)*);
    }};
}

macro_rules! info {
    ($s:literal $(, $x:expr)* $(,)?) => {{
        #[cfg(feature = "defmt")]
        ::defmt::info!($s $(, $x)*);
        #[cfg(feature = "log")]
        ::log::info!($s $(, $x)*);
        #[cfg(not(any(feature = "defmt", feature = "log")))]
        let _ = ($(&$x,)*);
    }};
}

macro_rules! warn {
    ($s:literal $(, $x:expr)* $(,)?) => {{
        #[cfg(feature = "defmt")]
        ::defmt::warn!($s $(, $x)*);
        #[cfg(feature = "log")]
        ::log::warn!($s $(, $x)*);
        #[cfg(not(any(feature = "defmt", feature = "log")))]
        let _ = ($(&$x,)*);
    }};
}

macro_rules! error {
    ($s:literal $(, $x:expr)* $(,)?) => {{
        #[cfg(feature = "defmt")]
        ::defmt::error!($s $(, $x)*);
        #[cfg(feature = "log")]
        ::log::error!($s $(, $x)*);
        #[cfg(not(any(feature = "defmt", feature = "log")))]
        let _ = ($(&$x,)*);
    }};
}

#[cfg(test)]
mod tests {
    #[test]
    fn macros_take_format_arguments_with_any_backend() {
        let id = "s-1";
        let n = 3u32;
        trace!("t {} {}", id, n);
        debug!("d {}", id);
        info!("i {}", n);
        warn!("w {} {}", id, n,);
        // With `defmt` and no DEFMT_LOG, error is the one level compiled in, and a test binary
        // has no global logger to link it against.
        #[cfg(not(feature = "defmt"))]
        error!("e {}", id);
    }
}
