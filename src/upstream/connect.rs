//! Opening the upstream connection: TCP with NODELAY and keepalive, then, when the database
//! entry asks for it, SSLRequest and TLS. Exactly one byte is read after the SSLRequest, so a
//! server cannot slip plaintext bytes in front of the TLS handshake (CVE-2021-23222).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{UpstreamError, UpstreamStream};
use crate::config::DatabaseConfig;
use crate::tls::upstream::server_name;

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Connects to the database entry's upstream. The caller bounds the time.
pub async fn connect(
    db: &DatabaseConfig,
    tls: Option<&TlsConnector>,
) -> Result<UpstreamStream, UpstreamError> {
    let tcp = TcpStream::connect((db.host.as_str(), db.port))
        .await
        .map_err(|source| UpstreamError::Connect {
            database: db.name.clone(),
            source,
        })?;
    crate::net::tune_socket(&tcp, db.tcp_keepalive);
    let Some(connector) = tls else {
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
