//! An echo upstream: answers every request with 200 and a JSON account of what it received.
//! One thread per connection, keep-alive, `Content-Length` and chunked request bodies. The same
//! loop serves `AuthServer`, the bench's minimal `ext_authz` service.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A running echo server on a loopback port. Stops on drop.
pub struct Echo {
    port: u16,
    stop: Arc<AtomicBool>,
}

/// What a handler sees of a request.
pub struct Seen<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    pub body_bytes: usize,
}

type Handler = Arc<dyn Fn(&Seen<'_>) -> (u16, String) + Send + Sync>;

fn echo_handler(seen: &Seen<'_>) -> (u16, String) {
    let reply = serde_json::json!({"method": seen.method, "path": seen.path, "headers": seen.headers, "body_bytes": seen.body_bytes});
    (200, reply.to_string())
}

impl Echo {
    /// Starts on `127.0.0.1:port` (0 for a free port).
    pub fn start(port: u16) -> std::io::Result<Echo> {
        Echo::start_with(port, Arc::new(echo_handler))
    }

    /// A server answering with `handler` instead of echoing.
    pub fn start_with(port: u16, handler: Handler) -> std::io::Result<Echo> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(conn) = conn {
                    let handler = Arc::clone(&handler);
                    std::thread::spawn(move || serve(conn, &*handler));
                }
            }
        });
        Ok(Echo { port, stop })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the acceptor so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(conn: TcpStream, handler: &(dyn Fn(&Seen<'_>) -> (u16, String) + Send + Sync)) {
    let _ = conn.set_nodelay(true);
    let Ok(mut out) = conn.try_clone() else { return };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let request_line = String::from_utf8_lossy(&line).trim_end().to_string();
        let mut parts = request_line.split(' ');
        let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let mut headers: Vec<(String, String)> = Vec::new();
        loop {
            let mut h = Vec::new();
            if reader.read_until(b'\n', &mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = String::from_utf8_lossy(&h).trim_end().to_string();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut body_bytes = 0usize;
        if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            let mut body = vec![0u8; len];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            body_bytes = len;
        } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size = String::new();
                if reader.read_line(&mut size).unwrap_or(0) == 0 {
                    return;
                }
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
                let mut chunk = vec![0u8; n + 2];
                if reader.read_exact(&mut chunk).is_err() {
                    return;
                }
                body_bytes += n;
                if n == 0 {
                    break;
                }
            }
        }
        let (status, reply) = handler(&Seen { method: &method, path: &path, headers: &headers, body_bytes });
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let head = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
            if status == 200 { "OK" } else { "Denied" },
            reply.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        // One write: a head and a body in two segments meet Nagle and delayed ACKs (40 ms).
        let mut response = head.into_bytes();
        response.extend_from_slice(reply.as_bytes());
        if out.write_all(&response).is_err() || close {
            return;
        }
    }
}

/// A minimal `ext_authz` HTTP service: 200 if `x-api-key` is one of `keys`, else 403.
pub fn auth_server(keys: std::collections::HashSet<String>) -> std::io::Result<Echo> {
    Echo::start_with(
        0,
        Arc::new(move |seen: &Seen<'_>| {
            let ok = seen.headers.iter().any(|(n, v)| n == "x-api-key" && keys.contains(v));
            if ok {
                (200, String::new())
            } else {
                (403, String::new())
            }
        }),
    )
}
