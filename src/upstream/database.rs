//! A `[[databases]]` entry ready to connect to: the configuration with its TLS connector,
//! built when the configuration loads. Connecting is TCP with NODELAY and keepalive, then,
//! when the entry asks for it, SSLRequest and TLS; or, for a `host` that is a directory (as
//! libpq reads it), the server's Unix socket `<host>/.s.PGSQL.<port>` in plaintext. Exactly
//! one byte is read after the SSLRequest, so a server cannot slip plaintext bytes in front of
//! the TLS handshake (CVE-2021-23222).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

use super::error::UpstreamError;
use super::stream::UpstreamStream;
use crate::config::DatabaseConfig;
use crate::config::socket_dir::upstream_socket;
use crate::tls::TlsError;
use crate::tls::upstream::{connector, server_name};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// What a session or a cancel connects to.
pub(crate) struct Database {
    /// The configured entry.
    pub config: DatabaseConfig,
    /// TLS towards the upstream, `None` for `tls = "disable"`.
    pub tls: Option<TlsConnector>,
}

impl Database {
    /// The entry with its TLS connector (its CA bundle is read here).
    pub(crate) fn new(config: &DatabaseConfig) -> Result<Database, TlsError> {
        Ok(Database {
            tls: connector(config)?,
            config: config.clone(),
        })
    }

    /// Connects to the entry's upstream. The caller bounds the time.
    pub(crate) async fn connect(&self) -> Result<UpstreamStream, UpstreamError> {
        let db = &self.config;
        if let Some(path) = upstream_socket(&db.host, db.port) {
            let unix =
                UnixStream::connect(&path)
                    .await
                    .map_err(|error| UpstreamError::Connect {
                        database: db.name.clone(),
                        error,
                    })?;
            return Ok(UpstreamStream::Local(unix));
        }
        let tcp = TcpStream::connect((db.host.as_str(), db.port))
            .await
            .map_err(|error| UpstreamError::Connect {
                database: db.name.clone(),
                error,
            })?;
        crate::net::tune_socket(&tcp, db.tcp_keepalive);
        let Some(connector) = &self.tls else {
            return Ok(UpstreamStream::Plain(tcp));
        };
        let mut tcp = tcp;
        tcp.write_all(&SSL_REQUEST).await?;
        let answer = tcp.read_u8().await?;
        if answer != b'S' {
            return Err(UpstreamError::Tls {
                database: db.name.clone(),
                reason: "the server does not accept TLS".into(),
            });
        }
        let stream = connector
            .connect(server_name(&db.host), tcp)
            .await
            .map_err(|e| UpstreamError::Tls {
                database: db.name.clone(),
                reason: e.to_string(),
            })?;
        Ok(UpstreamStream::Tls(Box::new(stream)))
    }
}
