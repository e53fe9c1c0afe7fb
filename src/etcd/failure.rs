//! What went wrong talking to etcd, said as a person acts on it. etcd-client's errors print
//! tonic's status with its whole source chain in Rust debug form (632 characters for a refused
//! connection); these say what failed and why in a few words.

use std::error::Error as _;

use crate::error::Error;

/// How a request to etcd failed, for a person.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made (the reason: "connection refused", "timed out", ...).
    Unreachable(String),
    /// Something answered, but not etcd's gRPC API (an HTTP/1 server, another service).
    NotEtcd,
    /// The connection closed under the request: after a reply that is not HTTP/2 (hyper races
    /// its protocol error), from a TLS server reached over plain HTTP, or a member going down.
    Closed,
    /// etcd answered with an error: its message.
    Answered(String),
}

/// Sorts `error` out: see [`Failure`].
pub fn classify(error: &etcd_client::Error) -> Failure {
    if let Some(io) = io_cause(error) {
        return Failure::Unreachable(io_reason(io));
    }
    match error {
        etcd_client::Error::GRpcStatus(status)
            if status.code() == tonic::Code::Cancelled && status.source().is_some() =>
        {
            Failure::Closed
        }
        etcd_client::Error::GRpcStatus(status) => from_status(status.code(), status.message()),
        etcd_client::Error::IoError(e) => Failure::Unreachable(io_reason(e)),
        other => Failure::Answered(other.to_string()),
    }
}

/// [`classify`] for a status without a source to look into.
fn from_status(code: tonic::Code, message: &str) -> Failure {
    // Not HTTP/2 at all, or a gRPC server without etcd's services (fencelog's own API).
    if message.starts_with("h2 protocol error") || code == tonic::Code::Unimplemented {
        return Failure::NotEtcd;
    }
    let message = if message.is_empty() {
        code.description()
    } else {
        message
    };
    match code {
        tonic::Code::Unavailable => Failure::Unreachable(message.to_owned()),
        _ => Failure::Answered(message.to_owned()),
    }
}

/// What an I/O error says: the error it carries (a TLS refusal: "invalid peer certificate:
/// UnknownIssuer"), else its kind ("connection refused", without the OS's error number).
fn io_reason(error: &std::io::Error) -> String {
    match error.get_ref() {
        Some(inner) => inner.to_string(),
        None => error.kind().to_string(),
    }
}

/// The I/O error at the bottom of `error`'s sources (a refused or timed-out connect), if any.
fn io_cause(error: &etcd_client::Error) -> Option<&std::io::Error> {
    // etcd-client does not give its status as a source: start from the status's own.
    let mut cause = match error {
        etcd_client::Error::GRpcStatus(status) => status.source(),
        other => other.source(),
    };
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cause = error.source();
    }
    None
}

/// One line for an etcd error, without the source chain: how [`Error::Etcd`] displays.
pub fn describe(error: &etcd_client::Error) -> String {
    match classify(error) {
        Failure::Unreachable(reason) => format!("cannot connect: {reason}"),
        Failure::NotEtcd => "the endpoint does not answer etcd's gRPC API".to_owned(),
        Failure::Closed => "the connection closed before etcd answered".to_owned(),
        Failure::Answered(message) => message,
    }
}

/// `error`, naming `endpoints` when etcd could not be reached there or is not etcd at all: what
/// a client command or a starting daemon says when its `--etcd` is wrong.
pub fn at_endpoints(endpoints: &[String], error: Error) -> Error {
    let Error::Etcd(etcd) = &error else {
        return error;
    };
    let endpoints = endpoints.join(",");
    match classify(etcd) {
        Failure::Unreachable(reason) => Error::EtcdUnreachable { endpoints, reason },
        Failure::NotEtcd => Error::NotEtcd { endpoints },
        Failure::Closed => Error::EtcdClosed { endpoints },
        Failure::Answered(_) => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_h2_protocol_error_means_the_endpoint_is_not_etcd() {
        assert_eq!(
            from_status(tonic::Code::Internal, "h2 protocol error: http2 error"),
            Failure::NotEtcd
        );
    }

    #[test]
    fn a_grpc_server_without_etcds_services_is_not_etcd() {
        assert_eq!(
            from_status(tonic::Code::Unimplemented, ""),
            Failure::NotEtcd
        );
    }

    #[test]
    fn an_unavailable_status_is_unreachable_with_its_message() {
        assert_eq!(
            from_status(tonic::Code::Unavailable, "tcp connect error"),
            Failure::Unreachable("tcp connect error".into())
        );
    }

    #[test]
    fn any_other_status_is_what_etcd_answered() {
        assert_eq!(
            from_status(
                tonic::Code::InvalidArgument,
                "etcdserver: request is too large"
            ),
            Failure::Answered("etcdserver: request is too large".into())
        );
        assert_eq!(
            from_status(tonic::Code::DeadlineExceeded, ""),
            Failure::Answered(tonic::Code::DeadlineExceeded.description().into())
        );
    }

    #[test]
    fn an_io_error_under_the_status_gives_the_reason() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let mut status = tonic::Status::unavailable("tcp connect error");
        status.set_source(std::sync::Arc::new(refused));
        let error = etcd_client::Error::GRpcStatus(status);
        assert_eq!(
            classify(&error),
            Failure::Unreachable("connection refused".into())
        );
    }

    #[test]
    fn an_io_error_carrying_an_error_gives_that_errors_message() {
        let tls = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        );
        let mut status = tonic::Status::unavailable("tcp connect error");
        status.set_source(std::sync::Arc::new(tls));
        assert_eq!(
            classify(&etcd_client::Error::GRpcStatus(status)),
            Failure::Unreachable("invalid peer certificate: UnknownIssuer".into())
        );
    }

    #[test]
    fn a_connection_closed_under_the_request_is_said_so() {
        let mut status = tonic::Status::cancelled("operation was canceled");
        // hyper's own error type in the real case; any error that is not an I/O one here.
        status.set_source(std::sync::Arc::new(std::fmt::Error));
        assert_eq!(
            classify(&etcd_client::Error::GRpcStatus(status)),
            Failure::Closed
        );
        let bare = tonic::Status::cancelled("the request was cancelled");
        assert_eq!(
            classify(&etcd_client::Error::GRpcStatus(bare)),
            Failure::Answered("the request was cancelled".into())
        );
    }

    #[test]
    fn only_a_connection_failure_names_the_endpoints() {
        let endpoints = ["http://127.0.0.1:2999".to_owned()];
        let unavailable = tonic::Status::unavailable("tcp connect error");
        let named = at_endpoints(&endpoints, Error::Etcd(unavailable.into()));
        assert_eq!(
            named.to_string(),
            "cannot reach etcd at http://127.0.0.1:2999: tcp connect error"
        );
        let refused = tonic::Status::permission_denied("etcdserver: permission denied");
        let kept = at_endpoints(&endpoints, Error::Etcd(refused.into()));
        assert!(matches!(kept, Error::Etcd(_)), "{kept}");
    }
}
