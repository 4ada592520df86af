//! TLS material for the federation: one certificate authority per
//! federation, and certificates that name their holder's cluster, role and
//! name, so that a peer is known by what its certificate says.
//!
//! A certificate carries two subject alternative names:
//! - the URI `hanse://CLUSTER/ROLE/NAME`: the holder's identity;
//! - the DNS name `hanse`: what clients verify every server against (a
//!   server is then known by its identity, checked after the handshake).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

/// The DNS name every Hanse certificate carries and clients verify.
pub const SERVER_NAME: &str = "hanse";
/// ALPN protocol of Hanse's QUIC transport.
pub const ALPN: &[u8] = b"hanse/1";
const URI_SCHEME: &str = "hanse://";

/// What a certificate's holder is allowed to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A Raft server of a cluster.
    Server,
    /// A node agent.
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }

    pub fn from_word(w: &str) -> Option<Role> {
        match w {
            "server" => Some(Role::Server),
            "agent" => Some(Role::Agent),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub cluster: String,
    pub role: Role,
    pub name: String,
}

impl Identity {
    pub fn new(cluster: &str, role: Role, name: &str) -> Identity {
        Identity { cluster: cluster.into(), role, name: name.into() }
    }

    pub fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}/{}", self.cluster, self.role.as_str(), self.name)
    }

    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(URI_SCHEME)?;
        let mut parts = rest.split('/');
        let (cluster, role, name) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !valid_label(cluster) || !valid_label(name) {
            return None;
        }
        Some(Identity { cluster: cluster.into(), role: Role::from_word(role)?, name: name.into() })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.cluster, self.role.as_str(), self.name)
    }
}

/// Cluster and holder names: 1 to 63 letters, digits and `-`, as in DNS.
pub fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}: no PEM {1} found")]
    Pem(String, &'static str),
    #[error("invalid name `{0}`: use 1 to 63 letters, digits and `-`")]
    Name(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A certificate and its private key, PEM-encoded as written to disk.
#[derive(Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for PemPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PemPair { .. }")
    }
}

/// Makes a federation's certificate authority, valid for `days`.
pub fn create_ca(federation: &str, days: u32) -> Result<PemPair, TlsError> {
    if !valid_label(federation) {
        return Err(TlsError::Name(federation.into()));
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, format!("Hanse federation CA {federation}"));
    params.distinguished_name.push(DnType::OrganizationName, "Hanse");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Issues a certificate for `identity`, signed by `ca`, valid from now for
/// `days`. A server's also names `localhost`, 127.0.0.1 and ::1, so a CLI
/// on its machine can verify its HTTPS API (see [`issue_with_names`]).
pub fn issue(ca: &PemPair, identity: &Identity, days: u32) -> Result<PemPair, TlsError> {
    issue_with_names(ca, identity, days, &[])
}

/// [`issue`], a server's certificate also naming `names` (DNS names or IP
/// addresses: those its API is reached by). An agent's names none of
/// these: it cannot pass for an API server.
pub fn issue_with_names(ca: &PemPair, identity: &Identity, days: u32, names: &[String]) -> Result<PemPair, TlsError> {
    issue_server(ca, identity, days, names, &[])
}

/// [`issue_with_names`], a server's certificate also naming the
/// jurisdictions its cluster may claim in gossip (see
/// [`jurisdictions_of`]); an agent's names none.
pub fn issue_server(
    ca: &PemPair,
    identity: &Identity,
    days: u32,
    names: &[String],
    jurisdictions: &[String],
) -> Result<PemPair, TlsError> {
    let now = time::OffsetDateTime::now_utc();
    let from = now - time::Duration::hours(1);
    issue_named(ca, identity, from, now + time::Duration::days(i64::from(days)), names, jurisdictions)
}

/// Issues a certificate valid between two instants (tests use this for
/// expired certificates).
pub fn issue_between(
    ca: &PemPair,
    identity: &Identity,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<PemPair, TlsError> {
    issue_named(ca, identity, not_before, not_after, &[], &[])
}

fn issue_named(
    ca: &PemPair,
    identity: &Identity,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
    names: &[String],
    jurisdictions: &[String],
) -> Result<PemPair, TlsError> {
    if !valid_label(&identity.cluster) {
        return Err(TlsError::Name(identity.cluster.clone()));
    }
    if !valid_label(&identity.name) {
        return Err(TlsError::Name(identity.name.clone()));
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    params.subject_alt_names.push(SanType::URI(identity.uri().try_into()?));
    if identity.role == Role::Server {
        let local = ["localhost", "127.0.0.1", "::1"].map(String::from);
        for name in local.iter().chain(names) {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into().map_err(|_| TlsError::Name(name.clone()))?),
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        for j in jurisdictions {
            if !valid_label(j) {
                return Err(TlsError::Name(j.clone()));
            }
            let uri = format!("{URI_SCHEME}{}/{JURISDICTION_ROLE}/{j}", identity.cluster);
            params.subject_alt_names.push(SanType::URI(uri.try_into()?));
        }
    }
    params.distinguished_name.push(DnType::CommonName, identity.to_string());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Reads `cert.pem` and `key.pem` style files.
pub fn read_pair(cert: &Path, key: &Path) -> Result<PemPair, TlsError> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| TlsError::Io(p.display().to_string(), e));
    Ok(PemPair { cert_pem: read(cert)?, key_pem: read(key)? })
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok).collect();
    if certs.is_empty() { Err(TlsError::Pem(what.into(), "CERTIFICATE")) } else { Ok(certs) }
}

fn key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map(PrivateKeyDer::Pkcs8)
        .or_else(|_| PrivateKeyDer::from_pem_slice(pem.as_bytes()))
        .map_err(|_| TlsError::Pem(what.into(), "PRIVATE KEY"))
}

fn roots(ca_pem: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server's TLS 1.3 configuration: it presents `pair` and requires every
/// client to present a certificate signed by the federation's CA.
pub fn server_config(ca_pem: &str, pair: &PemPair) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&pair.cert_pem, "certificate")?, key(&pair.key_pem, "key")?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The HTTPS API's configuration: it presents the server's certificate
/// (`pair`); clients authenticate with tokens, not certificates.
pub fn http_server_config(pair: &PemPair) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs(&pair.cert_pem, "certificate")?, key(&pair.key_pem, "key")?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A client's TLS 1.3 configuration: it trusts only the federation's CA
/// and presents `pair`.
pub fn client_config(ca_pem: &str, pair: &PemPair) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(certs(&pair.cert_pem, "certificate")?, key(&pair.key_pem, "key")?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The identity a (verified) end-entity certificate names.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<Identity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => Identity::from_uri(uri),
        _ => None,
    })
}

/// The role word in the URI that names a jurisdiction a cluster may
/// claim: `hanse://CLUSTER/jurisdiction/NAME`.
pub const JURISDICTION_ROLE: &str = "jurisdiction";

/// The jurisdictions a (verified) certificate lets its cluster claim: the
/// names of its `hanse://CLUSTER/jurisdiction/NAME` URIs for the cluster
/// its identity names. None for a certificate that names none.
pub fn jurisdictions_of(cert: &CertificateDer<'_>) -> Vec<String> {
    let Some(identity) = identity_of(cert) else { return Vec::new() };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return Vec::new() };
    let Ok(Some(san)) = parsed.subject_alternative_name() else { return Vec::new() };
    let prefix = format!("{URI_SCHEME}{}/{JURISDICTION_ROLE}/", identity.cluster);
    let mut out: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(&prefix),
            _ => None,
        })
        .filter(|j| valid_label(j))
        .map(str::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Signature schemes a [`Signer`] may use, best first.
const SCHEMES: [rustls::SignatureScheme; 5] = [
    rustls::SignatureScheme::ED25519,
    rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
    rustls::SignatureScheme::ECDSA_NISTP384_SHA384,
    rustls::SignatureScheme::RSA_PSS_SHA256,
    rustls::SignatureScheme::RSA_PKCS1_SHA256,
];

/// Signs what a server publishes beyond TLS (its gossip identity and
/// summaries) with its certificate's key, so that any member can check it
/// against the federation's CA ([`Trust`]).
pub struct Signer {
    cert: CertificateDer<'static>,
    signer: Box<dyn rustls::sign::Signer>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signer({:?})", identity_of(&self.cert))
    }
}

impl Signer {
    /// The signer of `pair`'s key, its certificate the first of the file.
    pub fn new(pair: &PemPair) -> Result<Signer, TlsError> {
        let cert = certs(&pair.cert_pem, "certificate")?.swap_remove(0);
        let key = key(&pair.key_pem, "key")?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| TlsError::Config(format!("the key cannot sign: {e}")))?;
        let signer = signing
            .choose_scheme(&SCHEMES)
            .ok_or_else(|| TlsError::Config("the key's type signs with no scheme Hanse verifies".into()))?;
        Ok(Signer { cert, signer })
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        self.cert.as_ref()
    }

    /// The TLS signature scheme (its IANA number) signatures are made with.
    pub fn scheme(&self) -> u16 {
        u16::from(self.signer.scheme())
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        // ring's signers fail only on a broken random source.
        self.signer.sign(message).expect("signing with a loaded key")
    }
}

/// What a certificate verified by [`Trust`] says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub identity: Identity,
    /// See [`jurisdictions_of`].
    pub jurisdictions: Vec<String>,
}

/// The federation's CA, for checking certificates and signatures that
/// arrive outside TLS (gossip). Pure: the time is an input.
///
/// Results are remembered by a SHA-256 of what was checked (at most
/// [`TRUST_MEMO_MAX`], forgotten all at once past it; a certificate's for
/// an hour of its time input at most), so members that share a `Trust`
/// verify each certificate and signature once.
pub struct Trust {
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    certs: std::sync::Mutex<std::collections::HashMap<[u8; 32], CertVerdict>>,
    signatures: std::sync::Mutex<std::collections::HashMap<[u8; 32], bool>>,
}

/// A certificate's verdict, and the time input it was reached at.
type CertVerdict = (u64, Result<Verified, String>);

/// Results a [`Trust`] remembers, of each kind.
pub const TRUST_MEMO_MAX: usize = 8_192;
/// How long (of its `now_ms` input) a certificate's verdict is remembered.
const CERT_MEMO_MS: u64 = 3_600_000;

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Trust { .. }")
    }
}

impl Trust {
    pub fn new(ca_pem: &str) -> Result<Trust, TlsError> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Trust {
            verifier,
            algorithms: provider().signature_verification_algorithms,
            certs: Default::default(),
            signatures: Default::default(),
        })
    }

    /// Checks that `cert_der` was issued by the CA and is valid at
    /// `now_ms` (unix milliseconds); returns the identity it names and the
    /// jurisdictions it allows. Errors say why, for a log line.
    pub fn verify_cert(&self, cert_der: &[u8], now_ms: u64) -> Result<Verified, String> {
        let key = digest(&[cert_der]);
        let memo = self.certs.lock().expect("memo lock").get(&key).cloned();
        if let Some((_, result)) = memo.filter(|(at, _)| now_ms >= *at && now_ms - at < CERT_MEMO_MS) {
            return result;
        }
        let result = self.verify_cert_now(cert_der, now_ms);
        let mut memo = self.certs.lock().expect("memo lock");
        if memo.len() >= TRUST_MEMO_MAX {
            memo.clear();
        }
        memo.insert(key, (now_ms, result.clone()));
        result
    }

    fn verify_cert_now(&self, cert_der: &[u8], now_ms: u64) -> Result<Verified, String> {
        let cert = CertificateDer::from(cert_der);
        let now = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_millis(now_ms));
        self.verifier.verify_client_cert(&cert, &[], now).map_err(|e| e.to_string())?;
        let identity = identity_of(&cert).ok_or("the certificate names no hanse:// identity")?;
        Ok(Verified { jurisdictions: jurisdictions_of(&cert), identity })
    }

    /// Whether `signature` over `message` was made, with `scheme` (see
    /// [`Signer::scheme`]), by the key of `cert_der`.
    pub fn verify_signature(&self, cert_der: &[u8], scheme: u16, message: &[u8], signature: &[u8]) -> bool {
        let key = digest(&[cert_der, &scheme.to_be_bytes(), message, signature]);
        if let Some(ok) = self.signatures.lock().expect("memo lock").get(&key) {
            return *ok;
        }
        let ok = self.verify_signature_now(cert_der, scheme, message, signature);
        let mut memo = self.signatures.lock().expect("memo lock");
        if memo.len() >= TRUST_MEMO_MAX {
            memo.clear();
        }
        memo.insert(key, ok);
        ok
    }

    fn verify_signature_now(&self, cert_der: &[u8], scheme: u16, message: &[u8], signature: &[u8]) -> bool {
        let cert = CertificateDer::from(cert_der);
        let Ok(ee) = webpki::EndEntityCert::try_from(&cert) else { return false };
        let scheme = rustls::SignatureScheme::from(scheme);
        let Some((_, algorithms)) = self.algorithms.mapping.iter().find(|(s, _)| *s == scheme) else { return false };
        algorithms.iter().any(|alg| ee.verify_signature(*alg, message, signature).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uris_round_trip_and_refuse_junk() {
        let id = Identity::new("eu-west", Role::Server, "s1");
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        for bad in [
            "hanse://eu-west/server",
            "hanse://eu/admin/x",
            "http://eu/server/x",
            "hanse://e u/server/x",
            "hanse://a/server/b/c",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn signatures_and_jurisdictions_verify_against_the_ca_only() {
        let ca = create_ca("f", 1).unwrap();
        let id = Identity::new("eu-west", Role::Server, "s1");
        let pair = issue_server(&ca, &id, 1, &[], &["eu".into(), "gdpr".into()]).unwrap();
        let signer = Signer::new(&pair).unwrap();
        let trust = Trust::new(&ca.cert_pem).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as u64 * 1_000;
        let v = trust.verify_cert(signer.cert_der(), now).unwrap();
        assert_eq!((v.identity, v.jurisdictions), (id.clone(), vec!["eu".to_string(), "gdpr".to_string()]));
        let sig = signer.sign(b"summary");
        assert!(trust.verify_signature(signer.cert_der(), signer.scheme(), b"summary", &sig));
        assert!(!trust.verify_signature(signer.cert_der(), signer.scheme(), b"summarY", &sig), "tampered");
        let other = Signer::new(&issue(&ca, &id, 1).unwrap()).unwrap();
        assert!(!trust.verify_signature(other.cert_der(), other.scheme(), b"summary", &sig), "another key");
        assert!(jurisdictions_of(&CertificateDer::from(other.cert_der())).is_empty(), "none unless issued");
        // Another federation's CA, and a certificate out of its dates.
        let stranger = Signer::new(&issue(&create_ca("f", 1).unwrap(), &id, 1).unwrap()).unwrap();
        assert!(trust.verify_cert(stranger.cert_der(), now).is_err());
        assert!(trust.verify_cert(signer.cert_der(), now + 3 * 86_400_000).is_err(), "expired");
        assert!(issue_server(&ca, &id, 1, &[], &["not a label".into()]).is_err());
    }

    #[test]
    fn issued_certificates_name_their_holder() {
        let ca = create_ca("test", 1).unwrap();
        let id = Identity::new("us-east", Role::Agent, "node-7");
        let pair = issue(&ca, &id, 1).unwrap();
        let der = certs(&pair.cert_pem, "x").unwrap().remove(0);
        assert_eq!(identity_of(&der), Some(id));
        assert!(server_config(&ca.cert_pem, &pair).is_ok());
        assert!(client_config(&ca.cert_pem, &pair).is_ok());
        assert!(matches!(issue(&ca, &Identity::new("bad name", Role::Agent, "x"), 1), Err(TlsError::Name(_))));
    }
}
