//! Choosing Debian's `rustc-web` / `rust-web-src` pair for the cross build, by version.
//!
//! The archive can offer several versions at once (bookworm's main suite and bookworm-security
//! carry different ones, and the security suite replaces its own over time). The cross build
//! needs a compiler at least as new as the workspace's `rust-version` and the library source of
//! exactly that compiler, so it takes the newest version offered for *both* packages and refuses
//! one that is too old with a line that says what was found and what is needed.
//!
//! Pure functions over `apt-cache madison` output, so the choice is tested without an archive.

/// The versions of `package` that `apt-cache madison` lists as binary packages, in its order.
///
/// A madison line reads ` rustc-web | 1.85.0+dfsg3-1~deb12u3 | http://… bookworm/main amd64 Packages`;
/// source lines (`… Sources`) and other packages' lines are skipped.
pub(crate) fn offered_versions(madison: &str, package: &str) -> Vec<String> {
    madison
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('|').map(str::trim);
            let (name, version, origin) = (fields.next()?, fields.next()?, fields.next()?);
            (name == package && !version.is_empty() && origin.ends_with("Packages"))
                .then(|| version.to_owned())
        })
        .collect()
}

/// The upstream `major.minor.patch` of a Debian version (`1:1.96.0+dfsg1-1~deb12u1` gives
/// `(1, 96, 0)`) or of a Cargo `rust-version` (`1.88` gives `(1, 88, 0)`). Missing or
/// unreadable parts count as 0.
pub(crate) fn upstream_version(version: &str) -> (u64, u64, u64) {
    let without_epoch = version.split_once(':').map_or(version, |(_, rest)| rest);
    let upstream = without_epoch.split(['+', '-', '~']).next().unwrap_or("");
    let mut parts = upstream.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// The version to fetch: the newest Debian version offered for both `rustc-web` and
/// `rust-web-src`, given each one's madison output, if it is at least `needed` (a
/// `rust-version`). The error is one line naming what was found and what is needed.
pub(crate) fn choose(
    rustc_madison: &str,
    src_madison: &str,
    needed: &str,
) -> Result<String, String> {
    let compilers = offered_versions(rustc_madison, "rustc-web");
    let sources = offered_versions(src_madison, "rust-web-src");
    // Madison lists the newest first; `max_by_key` keeps the last of equal upstream versions,
    // so walk it reversed to prefer the first listed (the newer Debian revision) on a tie.
    let newest = compilers
        .iter()
        .rev()
        .filter(|v| sources.contains(v))
        .max_by_key(|v| upstream_version(v));
    let Some(newest) = newest else {
        return Err(format!(
            "Debian's archive offers no rustc-web/rust-web-src pair of one version \
             (rustc-web: {}; rust-web-src: {}); the cross build needs rustc >= {needed}",
            list_or_none(&compilers),
            list_or_none(&sources),
        ));
    };
    let (major, minor, patch) = upstream_version(newest);
    if upstream_version(newest) < upstream_version(needed) {
        return Err(format!(
            "the newest rustc-web/rust-web-src Debian's archive offers is {newest} (rustc \
             {major}.{minor}.{patch}); the workspace needs rustc >= {needed} (its rust-version). \
             Newer ones come with bookworm-security: check that it is in the apt sources and \
             that `apt-get update` reached it"
        ));
    }
    Ok(newest.clone())
}

fn list_or_none(versions: &[String]) -> String {
    if versions.is_empty() {
        "none".to_owned()
    } else {
        versions.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN_ONLY_RUSTC: &str = " rustc-web | 1.85.0+dfsg3-1~deb12u3 | http://deb.debian.org/debian bookworm/main amd64 Packages\n";
    const MAIN_ONLY_SRC: &str = "rust-web-src | 1.85.0+dfsg3-1~deb12u3 | http://deb.debian.org/debian bookworm/main amd64 Packages\n";

    const WITH_SECURITY_RUSTC: &str = "\
 rustc-web | 1.96.0+dfsg1-1~deb12u1 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
 rustc-web | 1.85.0+dfsg3-1~deb12u3 | http://deb.debian.org/debian bookworm/main amd64 Packages
 rustc-web | 1.85.0+dfsg3-1~deb12u3 | http://deb.debian.org/debian bookworm/main Sources
";
    const WITH_SECURITY_SRC: &str = "\
rust-web-src | 1.96.0+dfsg1-1~deb12u1 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
rust-web-src | 1.85.0+dfsg3-1~deb12u3 | http://deb.debian.org/debian bookworm/main amd64 Packages
";

    #[test]
    fn reads_binary_versions_from_madison() {
        assert_eq!(
            offered_versions(WITH_SECURITY_RUSTC, "rustc-web"),
            ["1.96.0+dfsg1-1~deb12u1", "1.85.0+dfsg3-1~deb12u3"]
        );
        assert!(offered_versions(WITH_SECURITY_RUSTC, "rust-web-src").is_empty());
        assert!(offered_versions("", "rustc-web").is_empty());
        assert!(offered_versions("garbage without bars\n | | \n", "rustc-web").is_empty());
    }

    #[test]
    fn upstream_versions_compare_numerically() {
        assert_eq!(upstream_version("1.96.0+dfsg1-1~deb12u1"), (1, 96, 0));
        assert_eq!(upstream_version("1:1.100.2-3"), (1, 100, 2));
        assert_eq!(upstream_version("1.88"), (1, 88, 0));
        assert!(upstream_version("1.100.0") > upstream_version("1.96.0"));
        assert!(upstream_version("1.85.0+dfsg3") < upstream_version("1.88"));
    }

    #[test]
    fn takes_the_newest_pair_when_security_offers_one() {
        assert_eq!(
            choose(WITH_SECURITY_RUSTC, WITH_SECURITY_SRC, "1.88").unwrap(),
            "1.96.0+dfsg1-1~deb12u1"
        );
    }

    #[test]
    fn order_of_the_listing_does_not_matter() {
        let rustc: String = WITH_SECURITY_RUSTC
            .lines()
            .rev()
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            choose(&rustc, WITH_SECURITY_SRC, "1.88").unwrap(),
            "1.96.0+dfsg1-1~deb12u1"
        );
    }

    #[test]
    fn refuses_the_main_suite_alone_naming_found_and_needed() {
        let err = choose(MAIN_ONLY_RUSTC, MAIN_ONLY_SRC, "1.88").unwrap_err();
        assert!(err.contains("1.85.0+dfsg3-1~deb12u3"), "{err}");
        assert!(err.contains("rustc 1.85.0"), "{err}");
        assert!(err.contains(">= 1.88"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn a_compiler_without_its_source_is_not_a_pair() {
        // Security has the compiler, but its source is only in main at the old version.
        let err = choose(WITH_SECURITY_RUSTC, MAIN_ONLY_SRC, "1.88").unwrap_err();
        assert!(
            err.contains("1.85.0"),
            "falls back to the only pair, which is too old: {err}"
        );
        let err = choose(WITH_SECURITY_RUSTC, "", "1.88").unwrap_err();
        assert!(err.contains("no rustc-web/rust-web-src pair"), "{err}");
        assert!(err.contains("rust-web-src: none"), "{err}");
    }

    #[test]
    fn an_older_need_takes_the_newest_all_the_same() {
        assert_eq!(
            choose(WITH_SECURITY_RUSTC, WITH_SECURITY_SRC, "1.80").unwrap(),
            "1.96.0+dfsg1-1~deb12u1"
        );
        assert_eq!(
            choose(MAIN_ONLY_RUSTC, MAIN_ONLY_SRC, "1.85").unwrap(),
            "1.85.0+dfsg3-1~deb12u3"
        );
    }
}
