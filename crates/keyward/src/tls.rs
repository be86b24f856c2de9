//! TLS with rustls (ring provider): `keyward serve`'s listeners (`--tls-cert`, `--tls-key`) and
//! the CLI's `--url https://…` (system roots plus `--ca-cert`).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file given by `flag` cannot be used.
    #[error("{flag} {path}: {message}")]
    File { flag: &'static str, path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(flag: &'static str, path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::File { flag, path: path.display().to_string(), message: message.into() }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates in `path` (at least one).
fn certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_error(flag, path, format!("cannot read it: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(flag, path, format!("not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(flag, path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

/// The server side: the certificate chain in `cert` (leaf first) and its private key in `key`,
/// both PEM. Every error names the flag and the file.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates("--tls-cert", cert)?;
    let pem = std::fs::read(key).map_err(|e| file_error("--tls-key", key, format!("cannot read it: {e}")))?;
    let private = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| file_error("--tls-key", key, format!("holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| file_error("--tls-key", key, format!("does not fit the certificate in {}: {e}", cert.display())))?;
    // The admin API and the feed speak HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client side: the system's roots, plus the certificates in `ca_cert` if given.
pub fn client_config(ca_cert: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    // Unreadable system certificates are skipped: --ca-cert may be all that is needed.
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = ca_cert {
        for cert in certificates("--ca-cert", path)? {
            roots.add(cert).map_err(|e| file_error("--ca-cert", path, format!("not a usable CA certificate: {e}")))?;
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A connection the HTTP server reads and writes: plain TCP or TLS over it.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listening socket for `axum::serve`, with or without TLS.
pub struct Incoming {
    inner: Inner,
    local: SocketAddr,
}

enum Inner {
    Plain(TcpListener),
    /// Connections whose handshake is done. Handshakes run in their own tasks, so a slow or
    /// silent client never holds up the others.
    Tls(tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>),
}

impl Incoming {
    pub fn plain(listener: TcpListener) -> io::Result<Incoming> {
        Ok(Incoming { local: listener.local_addr()?, inner: Inner::Plain(listener) })
    }

    /// Must be called within a tokio runtime: it starts the task that accepts and handshakes.
    pub fn tls(listener: TcpListener, config: Arc<ServerConfig>) -> io::Result<Incoming> {
        let local = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(handshakes(listener, tokio_rustls::TlsAcceptor::from(config), tx));
        Ok(Incoming { local, inner: Inner::Tls(rx) })
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Box<dyn Conn>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Box<dyn Conn>, SocketAddr) {
        match &mut self.inner {
            Inner::Plain(listener) => {
                let (stream, addr) = accept_tcp(listener).await;
                (Box::new(stream), addr)
            }
            Inner::Tls(rx) => match rx.recv().await {
                Some((stream, addr)) => (Box::new(stream), addr),
                // The accepting task ended (the runtime is shutting down): accept nothing more.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Accepts the next TCP connection, riding out errors as `axum::serve` does: a failed
/// connection is skipped, anything else (out of file descriptors) waits a second.
async fn accept_tcp(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) => {}
            Err(e) => {
                tracing::error!(error = %e, "accepting a connection");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn handshakes(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    tx: tokio::sync::mpsc::Sender<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
) {
    while !tx.is_closed() {
        let (tcp, addr) = accept_tcp(&listener).await;
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&acceptor, tcp)).await {
                Ok(Ok(Some(stream))) => {
                    let _ = tx.send((stream, addr)).await;
                }
                Ok(Ok(None)) => tracing::debug!(client = %addr, "plain HTTP on the TLS port: answered 400"),
                Ok(Err(e)) => tracing::debug!(client = %addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(client = %addr, "TLS handshake timed out"),
            }
        });
    }
}

/// What a plain-HTTP request to a TLS port gets, instead of a connection closed on it.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncache-control: no-store\r\nconnection: close\r\ncontent-length: 119\r\n\r\n{\"success\":false,\"error\":{\"code\":\"TLS_REQUIRED\",\"message\":\"this port speaks HTTPS: use an https:// URL\",\"details\":{}}}\n";

/// TLS handshake; `None` if the client spoke plain HTTP (answered with a 400 and closed).
async fn handshake(acceptor: &tokio_rustls::TlsAcceptor, mut tcp: TcpStream) -> io::Result<Option<tokio_rustls::server::TlsStream<TcpStream>>> {
    let mut first = [0u8; 1];
    // 0x16 opens every TLS handshake record; a plain request starts with a method's letter.
    if tcp.peek(&mut first).await? == 1 && first[0].is_ascii_alphabetic() {
        // Read what the client sent, so closing does not reset the connection under the answer.
        let mut request = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut request)).await;
        tcp.write_all(PLAIN_HTTP_ANSWER).await?;
        tcp.shutdown().await?;
        return Ok(None);
    }
    acceptor.accept(tcp).await.map(Some)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_plain_http_answer_has_the_length_it_says() {
        let text = std::str::from_utf8(PLAIN_HTTP_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
        assert_eq!(body.len(), len);
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "TLS_REQUIRED");
    }

    #[test]
    fn a_missing_file_is_named_with_its_flag() {
        let err = server_config(Path::new("/nonexistent/cert.pem"), Path::new("/nonexistent/key.pem")).unwrap_err().to_string();
        assert!(err.starts_with("--tls-cert /nonexistent/cert.pem: cannot read it"), "{err}");
        let err = client_config(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err().to_string();
        assert!(err.starts_with("--ca-cert /nonexistent/ca.pem: cannot read it"), "{err}");
    }

    #[test]
    fn a_file_without_pem_is_refused() {
        let dir = std::env::temp_dir().join(format!("keyward-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let err = server_config(&junk, &junk).unwrap_err().to_string();
        assert!(err.contains("--tls-cert") && err.contains("holds no PEM certificate"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
