//! An echo upstream: answers every request with 200 and a JSON account of what it received.

use std::sync::Arc;
use std::thread::JoinHandle;

/// A running echo server on a loopback port. Stops on drop.
pub struct Echo {
    server: Arc<tiny_http::Server>,
    port: u16,
    workers: Vec<JoinHandle<()>>,
}

impl Echo {
    /// Starts on `127.0.0.1:port` (0 for a free port).
    pub fn start(port: u16) -> std::io::Result<Echo> {
        let server = tiny_http::Server::http(("127.0.0.1", port)).map_err(std::io::Error::other)?;
        let port = server.server_addr().to_ip().map_or(port, |a| a.port());
        let server = Arc::new(server);
        let workers = (0..4)
            .map(|_| {
                let server = Arc::clone(&server);
                std::thread::spawn(move || {
                    while let Ok(mut req) = server.recv() {
                        let mut body = String::new();
                        let _ = std::io::Read::read_to_string(req.as_reader(), &mut body);
                        let headers: Vec<(String, String)> = req
                            .headers()
                            .iter()
                            .map(|h| (h.field.as_str().as_str().to_ascii_lowercase(), h.value.as_str().to_string()))
                            .collect();
                        let reply = serde_json::json!({
                            "method": req.method().as_str(),
                            "path": req.url(),
                            "headers": headers,
                            "body_bytes": body.len(),
                        });
                        let response = tiny_http::Response::from_string(reply.to_string()).with_header(
                            tiny_http::Header::from_bytes(&b"content-type"[..], &b"application/json"[..])
                                .unwrap_or_else(|_| unreachable!()),
                        );
                        let _ = req.respond(response);
                    }
                })
            })
            .collect();
        Ok(Echo { server, port, workers })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Blocks until the server is stopped from elsewhere (used by `cargo xtask up`).
    pub fn wait(mut self) {
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.server.unblock();
        for _ in 1..self.workers.len() {
            self.server.unblock();
        }
    }
}
