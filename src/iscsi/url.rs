//! Target URLs in the syntax QEMU and libiscsi use:
//! `iscsi://[user@]host[:port]/target-iqn/lun` and `iser://...`.
//!
//! Passwords in the URL (`user%password@`) are refused: secrets come from a
//! file or the environment, never from the command line.

use thiserror::Error;

/// Default iSCSI port (RFC 7143).
pub const DEFAULT_PORT: u16 = 3260;

/// Transport chosen by the URL scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// iSCSI over TCP.
    Tcp,
    /// iSCSI over iSER (RDMA).
    Iser,
}

/// A parsed target URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetUrl {
    /// Transport.
    pub scheme: Scheme,
    /// CHAP user name, if given.
    pub user: Option<String>,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port (or RDMA CM port).
    pub port: u16,
    /// Target IQN (or EUI/NAA name).
    pub target: String,
    /// LUN number.
    pub lun: u16,
}

/// Why a URL was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid target URL {url:?}: {reason}")]
pub struct UrlError {
    /// The URL.
    pub url: String,
    /// What is wrong.
    pub reason: String,
}

impl TargetUrl {
    /// Parses `iscsi://[user@]host[:port]/iqn/lun`.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let bad = |reason: &str| UrlError {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = if let Some(r) = url.strip_prefix("iscsi://") {
            (Scheme::Tcp, r)
        } else if let Some(r) = url.strip_prefix("iser://") {
            (Scheme::Iser, r)
        } else {
            return Err(bad("expected iscsi:// or iser://"));
        };
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("missing /target-name/lun"))?;
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => {
                if u.contains('%') || u.contains(':') {
                    return Err(bad(
                        "passwords do not belong in URLs: give the CHAP secret with --chap-secret-file or VHOST_ISER_CHAP_SECRET",
                    ));
                }
                if u.is_empty() {
                    return Err(bad("empty user name"));
                }
                (Some(u.to_string()), h)
            }
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in IPv6 address"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => DEFAULT_PORT,
                None => return Err(bad("junk after IPv6 address")),
            };
            (h.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse::<u16>().map_err(|_| bad("bad port"))?,
                ),
                None => (hostport.to_string(), DEFAULT_PORT),
            }
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        if port == 0 {
            return Err(bad("port 0"));
        }
        let (target, lun) = path
            .rsplit_once('/')
            .ok_or_else(|| bad("missing /lun after the target name"))?;
        if target.is_empty() || target.contains('/') {
            return Err(bad("bad target name"));
        }
        let lun: u16 = lun
            .parse()
            .ok()
            .filter(|&l: &u16| l < 16384)
            .ok_or_else(|| bad("LUN must be a number below 16384"))?;
        Ok(TargetUrl {
            scheme,
            user,
            host,
            port,
            target: target.to_string(),
            lun,
        })
    }

    /// "host:port" (IPv6 in brackets), for connecting and log lines.
    pub fn portal(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The LUN, SAM-encoded (peripheral addressing below 256, flat above).
    pub fn lun_wire(&self) -> u64 {
        let l = self.lun as u64;
        if l < 256 {
            l << 48
        } else {
            (0x4000 | l) << 48
        }
    }
}

/// The default initiator name: stable for a host, derived from its name.
pub fn default_initiator_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string());
    let clean: String = host
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("iqn.2026-11.io.vhost-iser:{clean}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_style_urls() {
        let u = TargetUrl::parse("iscsi://127.0.0.1:3270/iqn.2026-11.test:disk/1").unwrap();
        assert_eq!(u.scheme, Scheme::Tcp);
        assert_eq!(u.portal(), "127.0.0.1:3270");
        assert_eq!(u.target, "iqn.2026-11.test:disk");
        assert_eq!(u.lun, 1);
        assert_eq!(u.lun_wire(), 1 << 48);
        let u = TargetUrl::parse("iser://alice@[fe80::1]/iqn.x:y/300").unwrap();
        assert_eq!(u.scheme, Scheme::Iser);
        assert_eq!(u.user.as_deref(), Some("alice"));
        assert_eq!(u.port, 3260);
        assert_eq!(u.portal(), "[fe80::1]:3260");
        assert_eq!(u.lun_wire(), (0x4000 | 300) << 48);
    }

    #[test]
    fn refuses_bad_urls_and_passwords() {
        for bad in [
            "http://x/iqn/1",
            "iscsi://host",
            "iscsi://host/iqn",
            "iscsi://host/iqn/x",
            "iscsi://host:99999/iqn/1",
            "iscsi://:3260/iqn/1",
            "iscsi://host//1",
            "iscsi://host/iqn/70000",
        ] {
            assert!(TargetUrl::parse(bad).is_err(), "{bad}");
        }
        let e = TargetUrl::parse("iscsi://alice%secret@host/iqn/1").unwrap_err();
        assert!(e.reason.contains("passwords"));
        assert!(!e.reason.contains("secret@"));
    }

    #[test]
    fn initiator_name_is_an_iqn() {
        let n = default_initiator_name();
        assert!(n.starts_with("iqn.2026-11.io.vhost-iser:"));
        assert!(n.chars().all(|c| c.is_ascii_graphic()));
    }
}
