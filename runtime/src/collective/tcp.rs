//! Ranks that are processes, on one machine or several, joined by torchrun's rendezvous: every
//! process reads `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` (and `LOCAL_RANK`, its GPU
//! on its machine); rank 0 listens on `MASTER_PORT`, the others connect to it.
//!
//! A collective is a star through rank 0: each other rank sends its buffer, rank 0 adds them in
//! rank order starting from zero (its own first) and sends the sum back, so the sums are those of
//! [`LocalGroup`](super::LocalGroup) and of one process accumulating every rank's micro-batch.
//! Between GPUs the gradients go through NCCL instead (its unique id handed out here); this star
//! carries the host values (losses, the starting step) and, on the CPU reference, the gradients.
//!
//! A rank that dies closes its connections (the kernel does so even after SIGKILL), so the ranks
//! reading from it fail at once with its rank named; one that hangs is given up on after the
//! collective timeout. Either way every rank stops with an error, and rank 0 writes nothing more.

use super::Collective;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Opens every connection: protocol and version.
const MAGIC: &[u8; 8] = b"WEFTDP01";

/// How long the ranks wait for each other at the rendezvous, and for one collective, unless
/// `WEFT_COLLECTIVE_TIMEOUT` (seconds) says otherwise: long enough for rank 0 to evaluate and
/// write a checkpoint while the others wait for a sum.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The collective timeout `WEFT_COLLECTIVE_TIMEOUT` sets (whole seconds, at least 1), else
/// [`DEFAULT_TIMEOUT`].
pub fn timeout() -> Result<Duration, String> {
    timeout_from(std::env::var("WEFT_COLLECTIVE_TIMEOUT").ok())
}

fn timeout_from(v: Option<String>) -> Result<Duration, String> {
    match v {
        None => Ok(DEFAULT_TIMEOUT),
        Some(v) => {
            v.trim().parse::<u64>().ok().filter(|&n| (1..=1 << 20).contains(&n)).map(Duration::from_secs).ok_or_else(
                || format!("WEFT_COLLECTIVE_TIMEOUT={v:?} is not a whole number of seconds from 1 to {}", 1 << 20),
            )
        }
    }
}

/// What a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    F32 = 1,
    F64 = 2,
    Bytes = 3,
}

/// Where this rank stands in its group, from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    pub rank: usize,
    pub world: usize,
    /// This rank's GPU on its machine (`LOCAL_RANK`, else the rank).
    pub local_rank: usize,
    pub addr: String,
    pub port: u16,
    pub timeout: Duration,
}

impl Rendezvous {
    /// The rendezvous the environment describes; None when `WORLD_SIZE` is not set (a process
    /// on its own).
    pub fn from_env() -> Result<Option<Rendezvous>, String> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Rendezvous>, String> {
        let Some(world) = var("WORLD_SIZE") else { return Ok(None) };
        let number = |k: &str, v: &str, max: u64| -> Result<u64, String> {
            v.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{k}={v:?} is not a whole number up to {max}"))
        };
        let need = |k: &str| {
            var(k).ok_or_else(|| format!("WORLD_SIZE is set, so {k} must be too (torchrun's rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"))
        };
        let world = number("WORLD_SIZE", &world, 1 << 16)? as usize;
        let rank = number("RANK", &need("RANK")?, 1 << 16)? as usize;
        if world == 0 || rank >= world {
            return Err(format!("RANK={rank} is not below WORLD_SIZE={world}"));
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", &v, 1 << 10)? as usize,
            None => rank,
        };
        let addr = need("MASTER_ADDR")?;
        let port = number("MASTER_PORT", &need("MASTER_PORT")?, 65535)? as u16;
        if port == 0 {
            return Err("MASTER_PORT=0 names no port".into());
        }
        let timeout = timeout_from(var("WEFT_COLLECTIVE_TIMEOUT"))?;
        Ok(Some(Rendezvous { rank, world, local_rank, addr, port, timeout }))
    }
}

/// One rank's connections: rank 0 holds one to each other rank (index r − 1), the others one to
/// rank 0.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    links: Vec<Mutex<TcpStream>>,
    aborted: AtomicBool,
    timeout: Duration,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> String {
    move |e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!("{what}: no answer (timed out)"),
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe => format!("{what}: the connection closed (the rank stopped)"),
        _ => format!("{what}: {e}"),
    }
}

impl TcpGroup {
    /// Joins the group `r` describes: rank 0 waits for every other rank, the others connect to
    /// it (retrying until rank 0 listens), each within `r.timeout`.
    pub fn join(r: &Rendezvous) -> Result<TcpGroup, String> {
        let deadline = Instant::now() + r.timeout;
        let links = if r.rank == 0 { Self::accept_all(r, deadline)? } else { vec![Self::connect(r, deadline)?] };
        for l in &links {
            l.set_nodelay(true).map_err(|e| format!("TCP_NODELAY: {e}"))?;
            l.set_read_timeout(Some(r.timeout)).map_err(|e| format!("read timeout: {e}"))?;
            l.set_write_timeout(Some(r.timeout)).map_err(|e| format!("write timeout: {e}"))?;
        }
        let links = links.into_iter().map(Mutex::new).collect();
        Ok(TcpGroup { rank: r.rank, world: r.world, links, aborted: AtomicBool::new(false), timeout: r.timeout })
    }

    fn accept_all(r: &Rendezvous, deadline: Instant) -> Result<Vec<TcpStream>, String> {
        let listener = TcpListener::bind(("0.0.0.0", r.port))
            .map_err(|e| format!("rank 0 cannot listen on port {} (MASTER_PORT): {e}", r.port))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut peers: Vec<Option<TcpStream>> = (1..r.world).map(|_| None).collect();
        while peers.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false).map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
                    let mut hello = [0u8; 16];
                    // A stray connection (a port scanner, a rank of another run) is dropped.
                    if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                        eprintln!("warning: rank 0 dropped a connection from {from} that is not a weft rank");
                        continue;
                    }
                    let rank = u32::from_le_bytes(hello[8..12].try_into().unwrap()) as usize;
                    let world = u32::from_le_bytes(hello[12..16].try_into().unwrap()) as usize;
                    if world != r.world {
                        return Err(format!("rank {rank} (from {from}) has WORLD_SIZE={world}, rank 0 {}", r.world));
                    }
                    match peers.get_mut(rank.wrapping_sub(1)) {
                        Some(slot @ None) => {
                            s.write_all(MAGIC).map_err(io_err(format!("rank 0 answering rank {rank}")))?;
                            *slot = Some(s);
                        }
                        Some(Some(_)) => {
                            return Err(format!("two processes have RANK={rank} (the second from {from})"))
                        }
                        None => return Err(format!("a process from {from} has RANK={rank}, not 1 to {}", r.world - 1)),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = peers
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(format!(
                            "rank 0 waited {} s on port {} and rank(s) {} never joined",
                            r.timeout.as_secs(),
                            r.port,
                            missing.join(", ")
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("rank 0 accepting on port {}: {e}", r.port)),
            }
        }
        Ok(peers.into_iter().map(|p| p.expect("all joined")).collect())
    }

    fn connect(r: &Rendezvous, deadline: Instant) -> Result<TcpStream, String> {
        let target = format!("{}:{}", r.addr, r.port);
        let mut last = String::new();
        loop {
            let addrs: Vec<_> = match target.to_socket_addrs() {
                Ok(a) => a.collect(),
                Err(e) => return Err(format!("MASTER_ADDR {:?}: {e}", r.addr)),
            };
            for a in &addrs {
                match TcpStream::connect_timeout(a, Duration::from_secs(2)) {
                    Ok(mut s) => {
                        let mut hello = MAGIC.to_vec();
                        hello.extend((r.rank as u32).to_le_bytes());
                        hello.extend((r.world as u32).to_le_bytes());
                        s.set_read_timeout(Some(r.timeout)).map_err(|e| e.to_string())?;
                        s.write_all(&hello).map_err(io_err(format!("rank {} greeting rank 0", r.rank)))?;
                        let mut answer = [0u8; 8];
                        s.read_exact(&mut answer).map_err(io_err(format!("rank {} joining at {target}", r.rank)))?;
                        if &answer != MAGIC {
                            return Err(format!("{target} is not rank 0 of a weft run"));
                        }
                        return Ok(s);
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "rank {} could not reach rank 0 at {target} within {} s ({last})",
                    r.rank,
                    r.timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn check(&self) -> Result<(), String> {
        match self.aborted.load(Ordering::SeqCst) {
            true => Err(format!("rank {}: the group was aborted", self.rank)),
            false => Ok(()),
        }
    }

    /// The link to `rank` (rank 0's to each other rank; the others' single link is rank 0's).
    fn link(&self, rank: usize) -> std::sync::MutexGuard<'_, TcpStream> {
        let i = if self.rank == 0 { rank - 1 } else { 0 };
        self.links[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, to: usize, kind: Kind, payload: &[u8]) -> Result<(), String> {
        let mut s = self.link(to);
        let mut head = vec![kind as u8];
        head.extend((payload.len() as u64).to_le_bytes());
        s.write_all(&head)
            .and_then(|()| s.write_all(payload))
            .map_err(io_err(format!("rank {} sending to rank {to}", self.rank)))
    }

    fn receive(&self, from: usize, kind: Kind, bytes: Option<usize>) -> Result<Vec<u8>, String> {
        let mut s = self.link(from);
        let what = || format!("rank {} waiting for rank {from}", self.rank);
        let mut head = [0u8; 9];
        s.read_exact(&mut head).map_err(io_err(what()))?;
        let n = u64::from_le_bytes(head[1..].try_into().unwrap()) as usize;
        if head[0] != kind as u8 || bytes.is_some_and(|b| b != n) {
            return Err(format!(
                "rank {from} sent {n} bytes of kind {} where rank {} expected {} of kind {} (the ranks run different programs or settings)",
                head[0],
                self.rank,
                bytes.unwrap_or(n),
                kind as u8
            ));
        }
        if n > 1 << 36 {
            return Err(format!("rank {from} announced {n} bytes"));
        }
        let mut payload = vec![0u8; n];
        s.read_exact(&mut payload).map_err(io_err(what()))?;
        Ok(payload)
    }

    fn reduce<T: Copy + Default + std::ops::Add<Output = T>, const W: usize>(
        &self,
        buf: &mut [T],
        kind: Kind,
        to: fn(T) -> [u8; W],
        from: fn([u8; W]) -> T,
    ) -> Result<(), String> {
        self.check()?;
        let encode = |v: &[T]| v.iter().flat_map(|&x| to(x)).collect::<Vec<u8>>();
        let decode = |b: &[u8], out: &mut [T]| {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(W)) {
                *o = from(c.try_into().unwrap());
            }
        };
        let r = (|| -> Result<(), String> {
            if self.rank != 0 {
                self.send(0, kind, &encode(buf))?;
                let sum = self.receive(0, kind, Some(buf.len() * W))?;
                decode(&sum, buf);
                return Ok(());
            }
            let mut sum = vec![T::default(); buf.len()];
            for (a, &b) in sum.iter_mut().zip(buf.iter()) {
                *a = *a + b;
            }
            let mut theirs = vec![T::default(); buf.len()];
            for r in 1..self.world {
                decode(&self.receive(r, kind, Some(buf.len() * W))?, &mut theirs);
                for (a, &b) in sum.iter_mut().zip(&theirs) {
                    *a = *a + b;
                }
            }
            let bytes = encode(&sum);
            for r in 1..self.world {
                self.send(r, kind, &bytes)?;
            }
            buf.copy_from_slice(&sum);
            Ok(())
        })();
        if let Err(e) = &r {
            self.abort(e);
        }
        r
    }

    /// Rank 0's `data` on every rank (the others' is replaced).
    pub fn broadcast(&self, data: &mut Vec<u8>) -> Result<(), String> {
        self.check()?;
        let r = if self.rank == 0 {
            (1..self.world).try_for_each(|r| self.send(r, Kind::Bytes, data))
        } else {
            self.receive(0, Kind::Bytes, None).map(|d| *data = d)
        };
        if let Err(e) = &r {
            self.abort(e);
        }
        r
    }

    fn broadcast_from(&self, buf: &mut [f32], root: usize) -> Result<(), String> {
        self.check()?;
        let bytes = buf.len() * 4;
        let r = (|| -> Result<(), String> {
            let encode = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            if self.rank == root && root != 0 {
                return self.send(0, Kind::F32, &encode(buf));
            }
            if self.rank == 0 {
                let payload = if root == 0 { encode(buf) } else { self.receive(root, Kind::F32, Some(bytes))? };
                for r in (1..self.world).filter(|&r| r != root) {
                    self.send(r, Kind::F32, &payload)?;
                }
                if root != 0 {
                    for (o, c) in buf.iter_mut().zip(payload.chunks_exact(4)) {
                        *o = f32::from_le_bytes(c.try_into().unwrap());
                    }
                }
                return Ok(());
            }
            let payload = self.receive(0, Kind::F32, Some(bytes))?;
            for (o, c) in buf.iter_mut().zip(payload.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().unwrap());
            }
            Ok(())
        })();
        if let Err(e) = &r {
            self.abort(e);
        }
        r
    }

    /// How long one collective waits before giving up.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<(), String> {
        self.reduce(buf, Kind::F32, f32::to_le_bytes, f32::from_le_bytes)
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<(), String> {
        self.reduce(buf, Kind::F64, f64::to_le_bytes, f64::from_le_bytes)
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<(), String> {
        self.broadcast_from(buf, root)
    }
    fn abort(&self, _why: &str) {
        // Closing every link tells the ranks on the other end at once.
        if !self.aborted.swap(true, Ordering::SeqCst) {
            for l in &self.links {
                let _ = l.lock().unwrap_or_else(|p| p.into_inner()).shutdown(Shutdown::Both);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn at(rank: usize, world: usize, port: u16) -> Rendezvous {
        Rendezvous { rank, world, local_rank: rank, addr: "127.0.0.1".into(), port, timeout: Duration::from_secs(20) }
    }

    #[test]
    fn reads_torchruns_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(Rendezvous::from_vars(vars(&[])), Ok(None));
        let r = Rendezvous::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((r.rank, r.world, r.local_rank, r.addr.as_str(), r.port), (3, 4, 1, "node0", 29500));
        let e = Rendezvous::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "2")])).unwrap_err();
        assert!(e.contains("RANK=2 is not below WORLD_SIZE=2"), "{e}");
        let e = Rendezvous::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "x")])).unwrap_err();
        assert!(e.contains("MASTER_PORT must be"), "{e}");
        let e = Rendezvous::from_vars(vars(&[("WORLD_SIZE", "two")])).unwrap_err();
        assert!(e.contains("WORLD_SIZE=\"two\""), "{e}");
        assert_eq!(r.timeout, DEFAULT_TIMEOUT);
        let e = timeout_from(Some("0".into())).unwrap_err();
        assert!(e.contains("WEFT_COLLECTIVE_TIMEOUT=\"0\""), "{e}");
        assert_eq!(timeout_from(Some(" 7 ".into())), Ok(Duration::from_secs(7)));
    }

    #[test]
    fn processes_sum_in_rank_order_through_rank_0() {
        let port = free_port();
        let values = [1e8f32, 1.0, -1e8];
        let out: Vec<(Vec<f32>, Vec<u8>)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|rank| {
                    s.spawn(move || {
                        let g = TcpGroup::join(&at(rank, 3, port)).unwrap();
                        let mut b = vec![values[rank], rank as f32];
                        g.all_reduce_f32(&mut b).unwrap();
                        let mut l = [rank as f64 * 0.5];
                        g.all_reduce_f64(&mut l).unwrap();
                        assert_eq!(l[0], 1.5);
                        let mut id = if rank == 0 { b"id".to_vec() } else { vec![] };
                        g.broadcast(&mut id).unwrap();
                        let mut from2 = if rank == 2 { vec![7.0f32, -0.0] } else { vec![0.0; 2] };
                        g.broadcast_f32(&mut from2, 2).unwrap();
                        assert_eq!(
                            from2.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            [7.0f32.to_bits(), (-0.0f32).to_bits()]
                        );
                        (b, id)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (b, id) in out {
            // Rank order from zero: (1e8 + 1) rounds the 1 away; any order adding −1e8 first gives 1.
            assert_eq!(b, vec![((0.0f32 + 1e8) + 1.0) + -1e8, 3.0]);
            assert_eq!(id, b"id");
        }
    }

    #[test]
    fn a_rank_that_stops_ends_the_others_with_its_rank_named() {
        let port = free_port();
        let errors: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|rank| {
                    s.spawn(move || {
                        let g = TcpGroup::join(&at(rank, 3, port)).unwrap();
                        let mut b = [1.0f64];
                        g.all_reduce_f64(&mut b).unwrap();
                        if rank == 2 {
                            drop(g); // as a killed process: its connection closes
                            return String::new();
                        }
                        let t = Instant::now();
                        let e = g.all_reduce_f64(&mut b).unwrap_err();
                        assert!(
                            t.elapsed() < Duration::from_secs(5),
                            "the failure is seen at once, not at the timeout"
                        );
                        e
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errors[0].contains("rank 0 waiting for rank 2") && errors[0].contains("closed"), "{}", errors[0]);
        assert!(errors[1].contains("rank 1 waiting for rank 0") && errors[1].contains("closed"), "{}", errors[1]);
    }

    #[test]
    fn a_rank_that_never_comes_is_named() {
        let port = free_port();
        let r = Rendezvous { timeout: Duration::from_millis(300), ..at(0, 3, port) };
        let e = std::thread::scope(|s| {
            s.spawn(|| TcpGroup::join(&at(1, 3, port)).map(|_| ()));
            TcpGroup::join(&r).map(|_| ()).unwrap_err()
        });
        assert!(e.contains("rank(s) 2 never joined"), "{e}");
    }

    #[test]
    fn two_processes_claiming_one_rank_are_refused() {
        let port = free_port();
        let e = std::thread::scope(|s| {
            s.spawn(|| TcpGroup::join(&at(1, 3, port)).map(|_| ()));
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                TcpGroup::join(&at(1, 3, port)).map(|_| ())
            });
            TcpGroup::join(&at(0, 3, port)).map(|_| ()).unwrap_err()
        });
        assert!(e.contains("two processes have RANK=1"), "{e}");
    }
}
