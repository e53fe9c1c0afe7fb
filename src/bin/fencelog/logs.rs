//! Where the daemons' and the client commands' logs go and what they hold: stderr, text or
//! JSON, coloured only on a terminal, at fencelog's level.
//!
//! `RUST_LOG` is read as fencelog's users mean it: a bare level (`RUST_LOG=debug`) is
//! fencelog's level, not every crate's (at debug, h2's frames were two thirds of a daemon's
//! log); `target=level` directives pass as given (`RUST_LOG=debug,h2=trace`); other crates stay
//! at `warn`. A `RUST_LOG` that does not parse is reported in the log and ignored.

use std::ffi::OsStr;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// The crate whose level a bare `RUST_LOG` level sets: the library and this binary alike.
const OWN_TARGET: &str = "fencelog";
/// The level of every other crate unless `RUST_LOG` names it.
const OTHERS_LEVEL: &str = "warn";
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Logs to stderr at `default_level` for fencelog, unless `RUST_LOG` says otherwise.
pub fn init(format: LogFormat, default_level: &str) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let wanted = directives(rust_log.as_deref(), default_level);
    let (filter, refused) = match EnvFilter::builder().parse(&wanted) {
        Ok(filter) => (filter, None),
        Err(e) => (
            EnvFilter::new(directives(None, default_level)),
            Some(e.to_string()),
        ),
    };
    let colour = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    if let (Some(refused), Some(rust_log)) = (refused, rust_log) {
        tracing::warn!(
            "RUST_LOG={rust_log:?} is not a log filter ({refused}); logging at fencelog's default level {default_level} (e.g. RUST_LOG=debug, or RUST_LOG=debug,h2=trace)"
        );
    }
}

/// The filter directives for `rust_log`: see the module's doc.
fn directives(rust_log: Option<&str>, default_level: &str) -> String {
    let mut own = default_level.to_owned();
    let mut named = Vec::new();
    for directive in rust_log.unwrap_or_default().split(',').map(str::trim) {
        if directive.is_empty() {
            continue;
        }
        if LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            own = directive.to_owned();
        } else if let Some(level) = directive.strip_prefix(&format!("{OWN_TARGET}=")) {
            own = level.to_owned();
        } else {
            named.push(directive);
        }
    }
    let mut all = vec![OTHERS_LEVEL.to_owned(), format!("{OWN_TARGET}={own}")];
    all.extend(named.into_iter().map(str::to_owned));
    all.join(",")
}

/// Whether to colour the log: on a terminal, unless `NO_COLOR` is set to anything but empty
/// (<https://no-color.org>). A log file or a pipe never gets escape codes.
fn colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.map_or(true, OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_rust_log_fencelog_logs_at_its_default_and_the_rest_at_warn() {
        assert_eq!(directives(None, "info"), "warn,fencelog=info");
        assert_eq!(directives(Some(""), "warn"), "warn,fencelog=warn");
    }

    #[test]
    fn a_bare_level_is_fencelogs_level_not_every_crates() {
        assert_eq!(directives(Some("debug"), "info"), "warn,fencelog=debug");
        assert_eq!(directives(Some("TRACE"), "info"), "warn,fencelog=TRACE");
    }

    #[test]
    fn directives_naming_a_crate_pass_as_given() {
        assert_eq!(
            directives(Some("debug, h2=trace,sled=info"), "info"),
            "warn,fencelog=debug,h2=trace,sled=info"
        );
        assert_eq!(
            directives(Some("fencelog::node=trace"), "info"),
            "warn,fencelog=info,fencelog::node=trace"
        );
    }

    #[test]
    fn fencelogs_own_directive_replaces_its_default() {
        assert_eq!(
            directives(Some("fencelog=error"), "info"),
            "warn,fencelog=error"
        );
    }

    #[test]
    fn every_directive_built_parses_and_a_bad_level_does_not() {
        for rust_log in [None, Some("debug"), Some("debug,h2=trace"), Some("off")] {
            let built = directives(rust_log, "info");
            assert!(EnvFilter::builder().parse(&built).is_ok(), "{built}");
        }
        let bad = directives(Some("fencelog=loud"), "info");
        assert!(EnvFilter::builder().parse(&bad).is_err(), "{bad}");
    }

    #[test]
    fn colour_only_on_a_terminal_and_never_under_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
