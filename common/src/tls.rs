//! Who may talk to whom: the cluster's own certificate authority, the
//! identities its certificates carry, and the TLS 1.3 configurations built
//! from them (rustls, ring).
//!
//! ## Identities
//! Every certificate is signed by the cluster's CA and names exactly one
//! [`Identity`] as a DNS subject-alternative name:
//!
//! | identity          | name in the certificate   | extended key usage     |
//! |-------------------|---------------------------|------------------------|
//! | the coordinator   | `coordinator.treaty`      | server + client auth   |
//! | participant `N`   | `participant-N.treaty`    | server + client auth   |
//! | client `NAME`     | `NAME.client.treaty`      | client auth only       |
//!
//! Names are identities, not host names: a node is reached at whatever
//! address it has, and the peer checks the identity it expects instead of
//! the address (the coordinator expects `participant-3` at participant 3's
//! address; a client accepts any node). A client certificate cannot serve
//! (no server-auth usage), so a client can never pose as a node.
//!
//! ## Invariants
//! * Every connection, in both directions, presents a certificate signed by
//!   the cluster's CA; a handshake without one, or with another CA's, fails.
//! * A server learns its caller's [`Identity`] from the certificate and
//!   nothing else; what the caller may do is decided per RPC from it.
//! * `ca.key` is needed only to issue certificates (`treaty certs`), never by
//!   a running node.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};

/// The CA certificate every node and client trusts.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key: only `treaty certs` needs it.
pub const CA_KEY: &str = "ca.key";
/// The name of the default client identity `treaty certs create` issues.
pub const DEFAULT_CLIENT: &str = "admin";

const DOMAIN: &str = "treaty";
/// The server name a client uses when any node of the cluster will do.
const ANY_NODE: &str = "any-node.treaty";

/// Who is at the other end of a connection, as its certificate says.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Identity {
    Coordinator,
    Participant(u64),
    Client(String),
}

impl Identity {
    /// The DNS name that carries this identity in a certificate.
    pub fn dns_name(&self) -> String {
        match self {
            Identity::Coordinator => format!("coordinator.{DOMAIN}"),
            Identity::Participant(id) => format!("participant-{id}.{DOMAIN}"),
            Identity::Client(name) => format!("{name}.client.{DOMAIN}"),
        }
    }

    /// Reads an identity back from a certificate's DNS name.
    pub fn from_dns_name(name: &str) -> Option<Identity> {
        let stem = name.strip_suffix(&format!(".{DOMAIN}"))?;
        if stem == "coordinator" {
            return Some(Identity::Coordinator);
        }
        if let Some(client) = stem.strip_suffix(".client") {
            return valid_client_name(client).then(|| Identity::Client(client.to_string()));
        }
        let id = stem.strip_prefix("participant-")?;
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        id.parse().ok().filter(|id| *id > 0).map(Identity::Participant)
    }

    /// The file name (without `.pem` / `.key`) of this identity's
    /// certificate and key in a certificates directory.
    pub fn file_stem(&self) -> String {
        match self {
            Identity::Coordinator => "coordinator".into(),
            Identity::Participant(id) => format!("participant-{id}"),
            Identity::Client(name) => format!("client-{name}"),
        }
    }

    /// Coordinator or participant (may serve, and may call node-only RPCs).
    pub fn is_node(&self) -> bool {
        !matches!(self, Identity::Client(_))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Coordinator => f.write_str("the coordinator"),
            Identity::Participant(id) => write!(f, "participant {id}"),
            Identity::Client(name) => write!(f, "client {name:?}"),
        }
    }
}

/// Client names are DNS labels: 1 to 63 of `a-z`, `0-9` and `-`.
pub fn valid_client_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// What a connecting side expects to find at the other end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    Coordinator,
    Participant(u64),
    /// Any node of the cluster (a client talking to an endpoint).
    AnyNode,
}

impl Expect {
    fn server_name(&self) -> ServerName<'static> {
        let name = match self {
            Expect::Coordinator => Identity::Coordinator.dns_name(),
            Expect::Participant(id) => Identity::Participant(*id).dns_name(),
            Expect::AnyNode => ANY_NODE.to_string(),
        };
        ServerName::try_from(name).expect("identity names are valid DNS names")
    }
}

/// Errors creating, reading or using certificates, with what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CertError(pub String);

fn err(msg: impl Into<String>) -> CertError {
    CertError(msg.into())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The identity named by a DER certificate's subject-alternative names.
pub fn identity_of(cert: &[u8]) -> Option<Identity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(name) => Identity::from_dns_name(name),
        _ => None,
    })
}

// ---------------------------------------------------------------------------
// Creating certificates

fn validity(params: &mut rcgen::CertificateParams) {
    let year = 1970
        + (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
            / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
}

fn write_private(path: &Path, contents: &str) -> Result<(), CertError> {
    use std::io::Write as _;
    #[cfg(unix)]
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
    }
    .map_err(|e| err(format!("cannot write {}: {e}", path.display())))?;
    #[cfg(not(unix))]
    let mut f = std::fs::File::create_new(path).map_err(|e| err(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(contents.as_bytes()).map_err(|e| err(format!("cannot write {}: {e}", path.display())))
}

fn write_public(path: &Path, contents: &str) -> Result<(), CertError> {
    std::fs::write(path, contents).map_err(|e| err(format!("cannot write {}: {e}", path.display())))
}

/// Creates a new cluster CA in `dir` (which must not hold one yet) and
/// certificates for the coordinator, participants `1..=participants` and
/// the client `admin`.
pub fn create(dir: &Path, participants: u64) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    if dir.join(CA_CERT).exists() {
        return Err(err(format!(
            "{} already holds a cluster CA ({CA_CERT}); refusing to replace it, since every certificate it signed \
             would stop working: use `treaty certs issue` to add certificates, or pick an empty directory",
            dir.display()
        )));
    }
    let ca_key = rcgen::KeyPair::generate().map_err(|e| err(format!("generating the CA key: {e}")))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "Treaty cluster CA");
    params.distinguished_name.push(rcgen::DnType::OrganizationName, format!("treaty-{:016x}", rand::random::<u64>()));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    validity(&mut params);
    let ca = params.self_signed(&ca_key).map_err(|e| err(format!("signing the CA: {e}")))?;
    write_private(&dir.join(CA_KEY), &ca_key.serialize_pem())?;
    write_public(&dir.join(CA_CERT), &ca.pem())?;
    let mut ids = vec![Identity::Coordinator];
    ids.extend((1..=participants).map(Identity::Participant));
    ids.push(Identity::Client(DEFAULT_CLIENT.into()));
    for id in ids {
        sign(dir, &ca, &ca_key, &id)?;
    }
    Ok(())
}

/// Issues one more certificate from the CA in `dir` (a new participant, a
/// named client). Refuses to overwrite an existing one.
pub fn issue(dir: &Path, identity: &Identity) -> Result<PathBuf, CertError> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|e| {
            err(format!(
                "cannot read {}: {e} (issuing needs the CA made by `treaty certs create`, including {CA_KEY})",
                dir.join(name).display()
            ))
        })
    };
    let ca_key = rcgen::KeyPair::from_pem(&read(CA_KEY)?).map_err(|e| err(format!("reading {CA_KEY}: {e}")))?;
    let params = rcgen::CertificateParams::from_ca_cert_pem(&read(CA_CERT)?)
        .map_err(|e| err(format!("reading {CA_CERT}: {e}")))?;
    let ca = params.self_signed(&ca_key).map_err(|e| err(format!("loading the CA: {e}")))?;
    sign(dir, &ca, &ca_key, identity)
}

fn sign(dir: &Path, ca: &rcgen::Certificate, ca_key: &rcgen::KeyPair, id: &Identity) -> Result<PathBuf, CertError> {
    let stem = id.file_stem();
    let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
    if cert_path.exists() || key_path.exists() {
        return Err(err(format!("{} already exists: remove it first to issue a new one", cert_path.display())));
    }
    let key = rcgen::KeyPair::generate().map_err(|e| err(format!("generating a key: {e}")))?;
    let mut params =
        rcgen::CertificateParams::new(vec![id.dns_name()]).map_err(|e| err(format!("certificate name: {e}")))?;
    params.distinguished_name.push(rcgen::DnType::CommonName, id.dns_name());
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if id.is_node() {
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]
    };
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    let cert = params.signed_by(&key, ca, ca_key).map_err(|e| err(format!("signing {stem}: {e}")))?;
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok(cert_path)
}

// ---------------------------------------------------------------------------
// Using certificates

/// A process's TLS setup: who it is and the configurations for both ends.
pub struct Tls {
    me: Identity,
    dir: PathBuf,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("me", &self.me).field("dir", &self.dir).finish()
    }
}

impl Tls {
    /// Loads `ca.pem` and `me`'s certificate and key from `dir`, and checks
    /// that the certificate really names `me` and is signed by the CA.
    pub fn load(dir: &Path, me: Identity) -> Result<Tls, CertError> {
        let stem = me.file_stem();
        let hint = match &me {
            Identity::Client(_) => {
                "the directory `treaty certs create` wrote (or `treaty certs issue DIR client NAME`)"
            }
            _ => "the directory `treaty certs create DIR --participants N` wrote",
        };
        let ca_path = dir.join(CA_CERT);
        let ca = CertificateDer::from_pem_file(&ca_path)
            .map_err(|e| err(format!("cannot read {}: {e}: --certs must point at {hint}", ca_path.display())))?;
        let cert_path = dir.join(format!("{stem}.pem"));
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&cert_path).and_then(|it| it.collect()).map_err(|e| {
                err(format!(
                    "cannot read {} ({me}'s certificate): {e}: --certs must point at {hint}",
                    cert_path.display()
                ))
            })?;
        let key_path = dir.join(format!("{stem}.key"));
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| err(format!("cannot read {} ({me}'s key): {e}", key_path.display())))?;
        let leaf = chain.first().ok_or_else(|| err(format!("{} holds no certificate", cert_path.display())))?;
        match identity_of(leaf) {
            Some(id) if id == me => {}
            Some(id) => {
                return Err(err(format!(
                    "{} names {id}, but this process is {me}: use the certificate made for {me}",
                    cert_path.display()
                )))
            }
            None => return Err(err(format!("{} names no Treaty identity", cert_path.display()))),
        }
        let mut roots = RootCertStore::empty();
        roots.add(ca).map_err(|e| err(format!("{}: {e}", ca_path.display())))?;
        let roots = Arc::new(roots);
        let provider = provider();
        // The node's own certificate must chain to the CA it will demand of
        // others: a mismatch would fail every handshake, so say it now.
        let check = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| err(format!("{}: {e}", ca_path.display())))?;
        if me.is_node() {
            let name = ServerName::try_from(me.dns_name()).expect("valid name");
            check.verify_server_cert(leaf, &chain[1..], &name, &[], UnixTime::now()).map_err(|e| {
                err(format!(
                    "{} is not valid under {}: {e} (certificates from another `treaty certs create`?)",
                    cert_path.display(),
                    ca_path.display()
                ))
            })?;
        }
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| err(format!("client verifier: {e}")))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| err(format!("{}: {e}", key_path.display())))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NodeVerifier { inner: check }))
            .with_client_auth_cert(chain, key)
            .map_err(|e| err(format!("{}: {e}", key_path.display())))?;
        Ok(Tls { me, dir: dir.to_path_buf(), server: Arc::new(server), client: Arc::new(client) })
    }

    pub fn me(&self) -> &Identity {
        &self.me
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    pub(crate) fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client.clone())
    }

    pub(crate) fn server_name(expect: &Expect) -> ServerName<'static> {
        expect.server_name()
    }
}

/// How a process talks to the others: TLS with its identity, or (for tests
/// on loopback and for measuring the difference) plaintext.
#[derive(Clone, Debug)]
pub enum Security {
    Tls(Arc<Tls>),
    /// No encryption and no authentication: every caller may do anything.
    Insecure,
}

impl Security {
    pub fn tls(dir: &Path, me: Identity) -> Result<Security, CertError> {
        Ok(Security::Tls(Arc::new(Tls::load(dir, me)?)))
    }

    pub fn is_insecure(&self) -> bool {
        matches!(self, Security::Insecure)
    }
}

/// Checks a server's certificate: signed by the cluster's CA, valid for
/// serving, and naming the node the caller expects (any node, for clients).
#[derive(Debug)]
struct NodeVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = identity_of(end_entity)
            .filter(Identity::is_node)
            .ok_or_else(|| rustls::Error::General("the server's certificate names no Treaty node".into()))?;
        let expected = server_name.to_str();
        if expected != ANY_NODE && expected != found.dns_name() {
            let want = Identity::from_dns_name(&expected).map_or(expected.to_string(), |i| i.to_string());
            return Err(rustls::Error::General(format!(
                "the node at this address is {found}, not {want}: check the addresses in --participants / --coordinator"
            )));
        }
        let name = ServerName::try_from(found.dns_name()).expect("valid name");
        self.inner.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_names() {
        for id in [
            Identity::Coordinator,
            Identity::Participant(1),
            Identity::Participant(42),
            Identity::Client("admin".into()),
            Identity::Client("batch-7".into()),
        ] {
            assert_eq!(Identity::from_dns_name(&id.dns_name()), Some(id.clone()), "{id}");
        }
        for bad in [
            "participant-0.treaty",
            "participant-.treaty",
            "participant-+3.treaty",
            "participant-3.evil",
            "coordinator.treaty.evil",
            "Admin.client.treaty",
            ".client.treaty",
            "x.y.client.treaty",
        ] {
            assert_eq!(Identity::from_dns_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn created_certificates_name_their_holders_and_load() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path(), 3).unwrap();
        for id in [Identity::Coordinator, Identity::Participant(3), Identity::Client(DEFAULT_CLIENT.into())] {
            let tls = Tls::load(dir.path(), id.clone()).unwrap();
            assert_eq!(tls.me(), &id);
        }
        // A certificate is only good for the identity it names.
        std::fs::copy(dir.path().join("participant-2.pem"), dir.path().join("participant-9.pem")).unwrap();
        std::fs::copy(dir.path().join("participant-2.key"), dir.path().join("participant-9.key")).unwrap();
        let e = Tls::load(dir.path(), Identity::Participant(9)).unwrap_err().to_string();
        assert!(e.contains("names participant 2") && e.contains("participant 9"), "{e}");
        // Creating twice would orphan every issued certificate.
        let e = create(dir.path(), 3).unwrap_err().to_string();
        assert!(e.contains("already holds a cluster CA"), "{e}");
        // More certificates later, from the same CA.
        issue(dir.path(), &Identity::Participant(4)).unwrap();
        Tls::load(dir.path(), Identity::Participant(4)).unwrap();
        assert!(issue(dir.path(), &Identity::Participant(4)).is_err(), "no silent overwrite");
        // A node certificate from another CA is refused at load time.
        let other = tempfile::tempdir().unwrap();
        create(other.path(), 1).unwrap();
        std::fs::copy(other.path().join(CA_CERT), dir.path().join(CA_CERT)).unwrap();
        let e = Tls::load(dir.path(), Identity::Participant(1)).unwrap_err().to_string();
        assert!(e.contains("not valid under"), "{e}");
    }
}
