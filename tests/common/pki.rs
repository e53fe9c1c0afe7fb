//! Certificates made in the test: a CA, and certificates it signs for servers and clients.

use std::path::{Path, PathBuf};

use fencelog::credentials::ClientCertificate;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA that signs a certificate and key pair per name, written as PEM files.
pub struct Authority {
    dir: PathBuf,
    name: &'static str,
    /// The CA's certificate (PEM).
    pub cert: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    pub fn new(dir: &Path, name: &'static str) -> Authority {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("fencelog test CA {name}"));
        let cert = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert, params.self_signed(&key).unwrap().pem()).unwrap();
        Authority {
            dir: dir.to_owned(),
            name,
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `common_name` (also its subject alternative names); expired if
    /// `expired`.
    pub fn issue(&self, common_name: &str, expired: bool) -> ClientCertificate {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec![common_name.to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let stem = format!(
            "{}-{common_name}{}",
            self.name,
            if expired { "-expired" } else { "" }
        );
        let (cert, key_path) = (
            self.dir.join(format!("{stem}.pem")),
            self.dir.join(format!("{stem}-key.pem")),
        );
        let signed = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(&cert, signed.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        ClientCertificate {
            cert,
            key: key_path,
        }
    }
}
