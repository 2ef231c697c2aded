//! List files (plain lists, FireHOL `.netset`, `ipset save`): any UTF-8 through `listfile::parse`, what
//! `aqd import`, `allow_files` and `deny_files` read. Checked besides "no panic": every network has no host
//! bits set; printed one per line, the networks parse back to themselves; the bad lines are reported once
//! each, in order, within the text.

#![no_main]

use detector_user::listfile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count();
    match listfile::parse(text) {
        Ok(nets) => {
            assert!(nets.len() <= lines);
            for net in &nets {
                assert_eq!(net.trunc(), *net, "{net} has host bits set");
            }
            let printed: String = nets.iter().map(|n| format!("{n}\n")).collect();
            assert_eq!(listfile::parse(&printed), Ok(nets));
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            assert!(errors.windows(2).all(|w| w[0].line < w[1].line), "{errors:?}");
            assert!(
                errors.iter().all(|e| e.line >= 1 && e.line <= lines),
                "{errors:?}"
            );
            assert!(errors.iter().all(|e| !e.message.is_empty()));
        }
    }
});
