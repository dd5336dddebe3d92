//! The principal named by a client certificate (DESIGN §5): the first URI SAN, else the
//! first DNS SAN, else the subject CN. The certificate was already verified by the TLS
//! layer (chain, validity, revocation); this only reads the name.

use x509_cert::der::Decode;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::Certificate;

/// Longest principal name taken from a certificate.
const MAX_LEN: usize = 256;

/// The principal of a DER certificate, if it names one.
pub fn principal_from_der(der: &[u8]) -> Option<String> {
    let cert = Certificate::from_der(der).ok()?;
    let tbs = cert.tbs_certificate();
    let mut uri = None;
    let mut dns = None;
    for ext in tbs.extensions().into_iter().flatten() {
        if ext.extn_id != x509_cert::der::oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME {
            continue;
        }
        let san = SubjectAltName::from_der(ext.extn_value.as_bytes()).ok()?;
        for name in san.0 {
            match name {
                GeneralName::UniformResourceIdentifier(s) if uri.is_none() => {
                    uri = Some(s.as_str().to_string())
                }
                GeneralName::DnsName(s) if dns.is_none() => dns = Some(s.as_str().to_string()),
                _ => {}
            }
        }
    }
    let name = uri.or(dns).or_else(|| {
        tbs.subject()
            .common_name()
            .ok()
            .flatten()
            .map(|cn| cn.value().into_owned())
    })?;
    (!name.is_empty() && name.len() <= MAX_LEN && !name.chars().any(char::is_control))
        .then_some(name)
}
