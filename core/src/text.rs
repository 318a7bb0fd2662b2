//! Fixed-capacity string helpers shared by the relay and the gateway.

use heapless::String;

/// Copies as many whole characters as fit.
pub(crate) fn truncated<const N: usize>(chars: impl IntoIterator<Item = char>) -> String<N> {
    let mut s = String::new();
    for c in chars {
        if s.push(c).is_err() {
            break;
        }
    }
    s
}
