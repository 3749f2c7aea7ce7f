//! A network namespace joined to the host by several veth pairs: one subnet
//! per link, so a server inside (tgtd) is reachable over several independent
//! paths, each of which a test can cut (`ip link set down`) and restore.
//! Needs root. Everything is removed when dropped.

use std::process::Command;

/// One veth pair: `host_ip` on `host_if` here, `inner_ip` on `inner_if` inside.
pub struct Link {
    /// Host-side interface.
    pub host_if: String,
    /// The namespace's interface (the one cut by [`Netns::set_link`]).
    pub inner_if: String,
    /// Our address on this link.
    pub host_ip: String,
    /// The namespace's address on this link (a portal's host).
    pub inner_ip: String,
}

/// A network namespace with [`Link`]s to the host.
pub struct Netns {
    /// Its name (under /var/run/netns).
    pub name: String,
    /// The links, in creation order.
    pub links: Vec<Link>,
}

/// Runs `ip ARGS`; a failure fails the test.
pub fn ip(args: &[&str]) {
    let out = Command::new(super::require_tool("ip", "iproute2"))
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {} failed (network namespaces need root): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Netns {
    /// A namespace `vhiser-<tag>-<pid>` with `links` veth pairs: link k is
    /// 10.`net`.N.4k+1 here and 10.`net`.N.4k+2 inside (/30 each), where N
    /// comes from the process id and a counter. `tag` (short, unique per
    /// test) and `net` (per test binary) keep them apart.
    pub fn new(tag: &str, net: u8, links: usize) -> Netns {
        assert!(links <= 60, "at most 60 links");
        // Distinct subnets for up to 4 namespaces per process (tests run
        // in parallel threads).
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 4;
        let id = (std::process::id() % 64) * 4 + seq;
        let name = format!("vhiser-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let mut ns = Netns {
            name: name.clone(),
            links: Vec::new(),
        };
        ip(&["netns", "add", &name]);
        let inner = |a: &[&str]| {
            let mut v = vec!["netns", "exec", name.as_str(), "ip"];
            v.extend_from_slice(a);
            ip(&v);
        };
        inner(&["link", "set", "lo", "up"]);
        for k in 0..links {
            let host_if = format!("vh{tag}{id}h{k}");
            let inner_if = format!("vh{tag}{id}n{k}");
            let _ = Command::new("ip").args(["link", "del", &host_if]).output();
            let host_ip = format!("10.{net}.{id}.{}", 4 * k + 1);
            let inner_ip = format!("10.{net}.{id}.{}", 4 * k + 2);
            ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &inner_if,
            ]);
            // Recorded at once, so Drop removes it even if a later step fails.
            ns.links.push(Link {
                host_if: host_if.clone(),
                inner_if: inner_if.clone(),
                host_ip: host_ip.clone(),
                inner_ip: inner_ip.clone(),
            });
            ip(&["link", "set", &inner_if, "netns", &name]);
            ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
            ip(&["link", "set", &host_if, "up"]);
            inner(&["addr", "add", &format!("{inner_ip}/30"), "dev", &inner_if]);
            inner(&["link", "set", &inner_if, "up"]);
        }
        ns
    }

    /// Takes link `k` down on the namespace's side, like a cut cable: the
    /// host keeps its route (without carrier), so packets are lost and
    /// connects time out (taking the host side down instead would send them
    /// along the default route, where a transparent proxy may answer). `up`
    /// restores it.
    pub fn set_link(&self, k: usize, up: bool) {
        ip(&self
            .link_args(k, up)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>());
    }

    /// The `ip` arguments of [`set_link`](Self::set_link), for another thread.
    pub fn link_args(&self, k: usize, up: bool) -> Vec<String> {
        let state = if up { "up" } else { "down" };
        [
            "netns",
            "exec",
            &self.name,
            "ip",
            "link",
            "set",
            &self.links[k].inner_if,
            state,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = Command::new("ip")
                .args(["link", "del", &l.host_if])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
