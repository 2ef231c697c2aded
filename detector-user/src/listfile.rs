//! Address list files: one address or CIDR per line, `#` or `;` comments — which also reads ipset/FireHOL
//! `.netset` files and the `add SET ADDR` lines of `ipset save`.

use std::path::Path;

use ipnet::IpNet;

use crate::{config::parse_cidr, lockout::Guard};

/// One rejected line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

/// Every network in `text`, or every bad line (all of them, so one pass fixes the file).
pub fn parse(text: &str) -> Result<Vec<IpNet>, Vec<LineError>> {
    parse_numbered(text).map(|nets| nets.into_iter().map(|(_, net)| net).collect())
}

/// [`parse`], with the line (from 1) each network is on.
pub fn parse_numbered(text: &str) -> Result<Vec<(usize, IpNet)>, Vec<LineError>> {
    let mut nets = Vec::new();
    let mut errors = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.split(['#', ';']).next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with("create ") {
            continue;
        }
        // `ipset save`: "add <set> <addr> [options]".
        let item = match line.strip_prefix("add ") {
            Some(rest) => rest.split_whitespace().nth(1).unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        match parse_cidr(item) {
            Ok(net) => nets.push((index + 1, net)),
            Err(message) => errors.push(LineError {
                line: index + 1,
                message,
            }),
        }
    }
    if errors.is_empty() { Ok(nets) } else { Err(errors) }
}

/// Reads and parses a list file; errors name the file and line.
pub fn load(path: &Path) -> Result<Vec<IpNet>, String> {
    load_numbered(path).map(|nets| nets.into_iter().map(|(_, net)| net).collect())
}

/// [`load`], with the line each network is on.
pub fn load_numbered(path: &Path) -> Result<Vec<(usize, IpNet)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_numbered(&text).map_err(|errors| {
        let shown: Vec<String> = errors
            .iter()
            .take(10)
            .map(|e| format!("{}:{}: {}", path.display(), e.line, e.message))
            .collect();
        let more = errors.len().saturating_sub(shown.len());
        let tail = if more > 0 {
            format!("\n… and {more} more bad lines")
        } else {
            String::new()
        };
        format!("{}{tail}", shown.join("\n"))
    })
}

/// Refuses a deny file with any entry touching a management network (the lockout guard; no force for
/// files): the error names the file and line of each such entry.
pub fn check_deny(path: &Path, nets: &[(usize, IpNet)], guard: &Guard) -> Result<(), String> {
    let refused: Vec<String> = nets
        .iter()
        .filter_map(|(line, net)| {
            let e = guard.check_management(crate::lockout::Verb::Deny, *net).err()?;
            Some(format!("{}:{line}: {e}", path.display()))
        })
        .take(10)
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(refused.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_netset_and_ipset_save() {
        let text = "# FireHOL style\n192.0.2.0/24\n198.51.100.7 ; trailing\n\n2001:db8::/48\n\
                    create blk hash:net family inet\nadd blk 203.0.113.0/25 timeout 300\n";
        let nets = parse(text).unwrap();
        let shown: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            shown,
            [
                "192.0.2.0/24",
                "198.51.100.7/32",
                "2001:db8::/48",
                "203.0.113.0/25"
            ]
        );
    }

    #[test]
    fn deny_files_may_not_touch_management() {
        let guard = Guard::new(["198.19.11.0/24".parse().unwrap()]);
        let nets = parse_numbered("# bogons\n10.0.0.0/8\n\n::/8\n198.19.11.9\n").unwrap();
        let e = check_deny(Path::new("/etc/aqd/deny.netset"), &nets, &guard).unwrap_err();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 2, "{e}");
        assert!(
            lines[0].starts_with("/etc/aqd/deny.netset:4: refusing to deny ::/8"),
            "{e}"
        );
        assert!(
            lines[1].starts_with("/etc/aqd/deny.netset:5: refusing to deny 198.19.11.9/32"),
            "{e}"
        );
        assert!(check_deny(Path::new("f"), &nets[..1], &guard).is_ok());
    }

    #[test]
    fn reports_every_bad_line() {
        let errors = parse("10.0.0.0/8\nnot-an-ip\n10.0.0.1/24\n").unwrap_err();
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), [2, 3]);
        assert!(errors[1].message.contains("10.0.0.0/24"));
    }
}
