//! Messages leasegate writes to clients itself, encoded with pgwire's codecs. Errors and
//! notices get their SQLSTATE, severity and text from the session error type.

use bytes::BytesMut;
use pgwire::messages::Message;
use pgwire::messages::response::{ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{Authentication, BackendKeyData, SecretKey};

use super::sqlstate::SqlState;

/// Severity of an error or notice leasegate reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Severity {
    /// Ends the session.
    Fatal,
    /// Informational, the session continues.
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "FATAL",
            Severity::Warning => "WARNING",
        }
    }
}

fn fields(severity: Severity, code: SqlState, message: &str) -> Vec<(u8, String)> {
    vec![
        (b'S', severity.as_str().to_owned()),
        (b'V', severity.as_str().to_owned()),
        (b'C', code.code().to_owned()),
        (b'M', message.to_owned()),
    ]
}

/// Appends an ErrorResponse with the given SQLSTATE and message.
pub(crate) fn error_response(
    buf: &mut BytesMut,
    severity: Severity,
    code: SqlState,
    message: &str,
) {
    // Encoding into a BytesMut only fails for messages over 2 GiB.
    let _ = ErrorResponse::new(fields(severity, code, message)).encode(buf);
}

/// Appends a NoticeResponse with the given SQLSTATE and message.
pub(crate) fn notice_response(
    buf: &mut BytesMut,
    severity: Severity,
    code: SqlState,
    message: &str,
) {
    let _ = NoticeResponse::new(fields(severity, code, message)).encode(buf);
}

/// Appends AuthenticationOk.
pub(crate) fn authentication_ok(buf: &mut BytesMut) {
    let _ = Authentication::Ok.encode(buf);
}

/// Appends BackendKeyData with a 4-byte secret (protocol 3.0).
pub(crate) fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    let _ = BackendKeyData::new(pid, SecretKey::I32(secret)).encode(buf);
}

/// Appends ReadyForQuery with the transaction status byte the upstream reported.
pub(crate) fn ready_for_query(buf: &mut BytesMut, status: u8) {
    let status = TransactionStatus::try_from(status).unwrap_or(TransactionStatus::Idle);
    let _ = ReadyForQuery::new(status).encode(buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_layout() {
        let mut buf = BytesMut::new();
        let code = SqlState::InvalidAuthorizationSpecification;
        error_response(&mut buf, Severity::Fatal, code, "no");
        assert_eq!(buf[0], b'E');
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        assert_eq!(len + 1, buf.len());
        let body = &buf[5..];
        assert_eq!(body, b"SFATAL\0VFATAL\0C28000\0Mno\0\0");
    }

    #[test]
    fn startup_completion_messages() {
        let mut buf = BytesMut::new();
        authentication_ok(&mut buf);
        assert_eq!(&buf[..], b"R\0\0\0\x08\0\0\0\0");
        buf.clear();
        backend_key_data(&mut buf, 1, 2);
        assert_eq!(&buf[..], b"K\0\0\0\x0c\0\0\0\x01\0\0\0\x02");
        buf.clear();
        ready_for_query(&mut buf, b'T');
        assert_eq!(&buf[..], b"Z\0\0\0\x05T");
    }
}
