//! `--wire-mode`: whether a binary offers the native wire mode at registration.

use std::fmt;
use std::str::FromStr;

use tether_core::wire::Extensions;

/// Which wire modes a binary offers its peer. The mode in use is decided at registration: native
/// only when both ends offer it, compat otherwise (a PipeOps peer never offers it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WireMode {
    /// Offer native (binary frames, per-stream credit); fall back to compat if the peer does not.
    #[default]
    Auto,
    /// Never offer native: always speak the compat JSON protocol.
    Compat,
}

impl WireMode {
    /// `extensions` with the native offer set for this mode.
    #[must_use]
    pub const fn apply(self, extensions: Extensions) -> Extensions {
        Extensions {
            native: matches!(self, Self::Auto) && extensions.native,
            ..extensions
        }
    }
}

impl FromStr for WireMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "compat" => Ok(Self::Compat),
            other => Err(format!(
                "unknown wire mode {other:?} (expected auto or compat)"
            )),
        }
    }
}

impl fmt::Display for WireMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Compat => "compat",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compat_withdraws_only_the_native_offer() {
        let all = Extensions::ALL;
        assert_eq!(WireMode::Auto.apply(all), all);
        let compat = WireMode::Compat.apply(all);
        assert!(!compat.native);
        assert_eq!(
            Extensions {
                native: true,
                ..compat
            },
            all
        );
        assert_eq!("compat".parse::<WireMode>(), Ok(WireMode::Compat));
        assert!("native".parse::<WireMode>().is_err());
    }
}
