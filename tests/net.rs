//! The TCP server through its Rust API: echo with data checked end to end.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ioengine::net::{Connection, NetBackend, ServerHandler, ServerOptions, TcpServer};

/// Echoes everything; counts connections and closes.
#[derive(Default)]
struct Echo {
    connected: AtomicUsize,
    closed: AtomicUsize,
}

impl ServerHandler for Echo {
    fn on_connect(&self, _conn: &Connection) {
        self.connected.fetch_add(1, Ordering::SeqCst);
    }
    fn on_data(&self, conn: &Connection, data: &[u8]) -> usize {
        conn.send(data).expect("send on an open connection");
        data.len()
    }
    fn on_close(&self, _conn: &Connection, _error: i32) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

fn server(backend: NetBackend, threads: usize, handler: Arc<dyn ServerHandler>) -> Option<TcpServer> {
    let mut opts = ServerOptions::new("127.0.0.1:0".parse().unwrap());
    opts.backend = backend;
    opts.threads = threads;
    match TcpServer::bind(&opts, handler) {
        Ok(server) => {
            server.start().unwrap();
            Some(server)
        }
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIP {backend}: {e}");
            None
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const BACKENDS: [NetBackend; 2] = [NetBackend::Uring, NetBackend::Epoll];

#[test]
fn many_clients_get_every_byte_back() {
    for (backend, threads) in BACKENDS.into_iter().flat_map(|b| [(b, 0), (b, 2)]) {
        let echo = Arc::new(Echo::default());
        let Some(server) = server(backend, threads, echo.clone()) else { continue };
        assert_eq!(server.backend(), backend);
        let addr = server.local_addr();
        std::thread::scope(|s| {
            for client in 0..16u64 {
                s.spawn(move || {
                    let mut stream = TcpStream::connect(addr).unwrap();
                    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    for round in 0..20u64 {
                        let msg =
                            pattern(client * 1000 + round, 1 + ((client * 7919 + round * 104729) % 70_000) as usize);
                        let mut reader = stream.try_clone().unwrap();
                        let expected = msg.clone();
                        let echo = std::thread::spawn(move || {
                            let mut back = vec![0u8; expected.len()];
                            reader.read_exact(&mut back).unwrap();
                            assert!(back == expected, "echoed bytes differ");
                        });
                        stream.write_all(&msg).unwrap();
                        echo.join().unwrap();
                    }
                    stream.shutdown(Shutdown::Write).unwrap();
                    let mut rest = Vec::new();
                    stream.read_to_end(&mut rest).unwrap();
                    assert!(rest.is_empty());
                });
            }
        });
        server.stop().unwrap();
        assert_eq!(echo.connected.load(Ordering::SeqCst), 16);
        assert_eq!(echo.closed.load(Ordering::SeqCst), 16);
        let stats = server.stats();
        assert_eq!(stats.accepted, 16);
        assert_eq!(stats.connections, 0);
        assert_eq!(stats.cq_overflows, 0);
    }
}
