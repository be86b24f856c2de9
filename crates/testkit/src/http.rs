//! A raw HTTP/1.1 client: writes exactly the bytes asked for, reads one response.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Lowercase names, in order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The contract's `error.code`, if the body is a keyward error.
    pub fn code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["error"]["code"].as_str().map(str::to_string)
    }

    /// For echo responses: the headers the upstream received.
    pub fn upstream_headers(&self) -> Vec<(String, String)> {
        let v = self.json();
        v["headers"]
            .as_array()
            .map(|hs| {
                hs.iter()
                    .filter_map(|h| Some((h[0].as_str()?.to_string(), h[1].as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// For echo responses: the first value the upstream received for `name`.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.upstream_headers().into_iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// Sends `GET`-style request `method path` with the given raw headers (plus `host` and
/// `connection: close`) and returns the response.
pub fn request(port: u16, method: &str, path: &str, headers: &[(&str, &[u8])]) -> std::io::Result<Response> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nhost: api.test\r\nconnection: close\r\n").into_bytes();
    for (name, value) in headers {
        raw.extend_from_slice(name.as_bytes());
        raw.extend_from_slice(b": ");
        raw.extend_from_slice(value);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    send_raw(port, &raw)
}

/// Writes `raw` to `127.0.0.1:port` and parses the response (the server must close or frame it).
pub fn send_raw(port: u16, raw: &[u8]) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(raw)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) => return Err(e),
        }
        if let Some(resp) = parse(&buf) {
            return Ok(resp);
        }
    }
    parse_closed(&buf).ok_or_else(|| std::io::Error::other(format!("unparseable response: {:?}", String::from_utf8_lossy(&buf))))
}

/// Parses a complete response, or `None` if more bytes are needed.
fn parse(buf: &[u8]) -> Option<Response> {
    let (status, headers, body_start) = head(buf)?;
    let rest = &buf[body_start..];
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let body = dechunk(rest)?;
        return Some(Response { status, headers, body });
    }
    let len: usize = header("content-length")?.trim().parse().ok()?;
    (rest.len() >= len).then(|| Response { status, headers: headers.clone(), body: rest[..len].to_vec() })
}

/// Parses a response whose end is the connection closing.
fn parse_closed(buf: &[u8]) -> Option<Response> {
    parse(buf).or_else(|| {
        let (status, headers, body_start) = head(buf)?;
        Some(Response { status, headers, body: buf[body_start..].to_vec() })
    })
}

/// A parsed status line and header block, and where the body starts.
type Head = (u16, Vec<(String, String)>, usize);

fn head(buf: &[u8]) -> Option<Head> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut lines = text.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((status, headers, end + 4))
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        if rest.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}
