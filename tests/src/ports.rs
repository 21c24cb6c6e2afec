//! Loopback ports for the tests, without the bind-`:0`-and-close race.
//!
//! - A server the tests run themselves binds `127.0.0.1:0` and keeps the
//!   listener ([`bind_loopback`]); its port is what the listener reports.
//! - A program that must be told its port up front (lighttpd, nginx, Caddy,
//!   Prometheus, PostgreSQL, etcd and kube-apiserver, VictoriaLogs, the
//!   agent daemon) gets one from [`reserve`], and is started through
//!   [`start_on_reserved_port`], which tries another port when the program
//!   says the one it was given was taken meanwhile.
//!
//! [`reserve`] never hands out the same port twice in this process, and
//! takes ports below the kernel's ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`), so neither another test of
//! this process nor an outgoing connection (which the kernel gives an
//! ephemeral port) can be handed it by the kernel between the check and
//! the program's bind. Another process on the machine (a parallel test
//! binary) starts at a different offset, and the bind check skips what it
//! holds; what is left is the rare program that takes the port between the
//! check and the start, for which the start is retried.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

/// A listener on a free loopback port: the port is `local_addr()`'s.
pub fn bind_loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

/// The reserved range: below the ephemeral range, above the well-known
/// and the common registered service ports.
fn range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 20000;
    assert!(
        ephemeral_low > low + 1000,
        "the ephemeral port range starts at {ephemeral_low}: no room below it for test ports"
    );
    (low, ephemeral_low)
}

struct Allocator {
    next: u32,
    handed: HashSet<u16>,
}

/// A loopback port no one listens on now, never handed out before in this
/// process. For programs that must be told their port: start them with
/// [`start_on_reserved_port`].
pub fn reserve() -> u16 {
    static ALLOC: OnceLock<Mutex<Allocator>> = OnceLock::new();
    let (low, high) = range();
    let span = u32::from(high - low);
    let alloc = ALLOC.get_or_init(|| {
        Mutex::new(Allocator {
            // Parallel test processes start far apart.
            next: std::process::id().wrapping_mul(7919) % span,
            handed: HashSet::new(),
        })
    });
    let mut a = alloc.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..span {
        let port = low + (a.next % span) as u16;
        a.next = a.next.wrapping_add(1);
        if a.handed.contains(&port) {
            continue;
        }
        // Free now (for a listener: std sets SO_REUSEADDR, as servers do).
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            a.handed.insert(port);
            return port;
        }
    }
    panic!("no free loopback port left in {low}..{high}");
}

/// What a start on a reserved port can say.
pub enum Start<T> {
    Up(T),
    /// The port was taken between [`reserve`] and the program's bind (the
    /// program's own words, for the message if every try fails).
    PortTaken(String),
}

impl<T> Start<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Start<U> {
        match self {
            Start::Up(t) => Start::Up(f(t)),
            Start::PortTaken(why) => Start::PortTaken(why),
        }
    }
}

/// Starts a program on a port from [`reserve`], with another port when
/// `start` says the port was taken; panics after five tries.
pub fn start_on_reserved_port<T>(what: &str, mut start: impl FnMut(u16) -> Start<T>) -> T {
    start_on_reserved_ports(what, 1, |ports| start(ports[0]))
}

/// [`start_on_reserved_port`] for a program (or a set of programs started
/// together) told `n` ports up front: all `n` are new on every try.
pub fn start_on_reserved_ports<T>(
    what: &str,
    n: usize,
    mut start: impl FnMut(&[u16]) -> Start<T>,
) -> T {
    let mut said = Vec::new();
    for _ in 0..5 {
        let ports: Vec<u16> = (0..n).map(|_| reserve()).collect();
        match start(&ports) {
            Start::Up(t) => return t,
            Start::PortTaken(why) => said.push(format!("ports {ports:?}: {why}")),
        }
    }
    panic!(
        "{what}: every try found a reserved port taken before it could bind:\n{}",
        said.join("\n")
    );
}

/// Whether a program's output says its listen address was in use.
pub fn says_address_in_use(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("address already in use") || t.contains("eaddrinuse")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_never_handed_twice_and_lie_below_the_ephemeral_range() {
        let (low, high) = range();
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let p = reserve();
            assert!((low..high).contains(&p), "{p}");
            assert!(seen.insert(p), "{p} handed twice");
        }
    }

    #[test]
    fn a_start_that_finds_its_port_taken_gets_another() {
        let mut tried = Vec::new();
        let got = start_on_reserved_port("test", |port| {
            tried.push(port);
            if tried.len() < 3 {
                Start::PortTaken("Address already in use".into())
            } else {
                Start::Up(port)
            }
        });
        assert_eq!(tried.len(), 3);
        assert_eq!(got, tried[2]);
        assert_ne!(tried[0], tried[1]);
    }
}
