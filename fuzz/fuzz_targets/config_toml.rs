//! Config text: any UTF-8 through `Config::from_toml`, the parse and validation `aqd run` and `reload` use.
//! Checked besides "no panic": every error names the file it was given; a validation error names a line of
//! the text; validating the same text twice gives the same result.

#![no_main]

use std::path::Path;

use detector_user::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

const PATH: &str = "/etc/aqd/fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let result = Config::from_toml(text, Path::new(PATH));
    match &result {
        Ok(config) => {
            assert!(!config.rate_classes.is_empty(), "no default rate class");
        }
        Err(e) => {
            assert!(e.to_string().starts_with(PATH), "{e}");
            if let ConfigError::Invalid { line, .. } = e {
                // A span at the very end of the text (after its last newline) is on the line after the last.
                assert!(
                    *line >= 1 && *line <= text.lines().count() + 1,
                    "line {line}: {e}"
                );
            }
        }
    }
    let again = Config::from_toml(text, Path::new(PATH));
    match (&result, &again) {
        // Debug, not ==: a float field may hold NaN.
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("two validations of the same text disagree"),
    }
});
