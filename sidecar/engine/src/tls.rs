//! Network identity: each network has its own CA; every node holds a certificate signed by it, and every
//! path is mutual TLS 1.3 (inside QUIC) checked against that CA alone.
//!
//! Files in a certificate directory (made by `endophyte certs`):
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the network CA's certificate (subject O = network name) |
//! | `ca.key` | the CA's private key; only `endophyte certs issue` needs it, keep it off the nodes |
//! | `<node>.pem`, `<node>.key` | a node's certificate (SAN DNS = node name, O = network) and key |
//!
//! A peer whose certificate was not signed by this network's CA is refused during the handshake, and the
//! error names both networks (read from the certificates' organization fields).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName as RustlsDn, SignatureScheme,
};

/// ALPN protocol id of Endophyte replication paths.
pub const ALPN: &[u8] = b"endophyte/1";

/// Errors creating, loading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: not a PEM {what}: {why}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Certificate or key.
        what: &'static str,
        /// Parser detail.
        why: String,
    },
    /// rcgen failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A node name that cannot be a DNS name.
    #[error("node name {0:?} must be a DNS-style name: letters, digits, '-' and '.'")]
    BadName(String),
    /// The CA file is not a CA of an Endophyte network.
    #[error("{path}: the certificate names no network (no organization in its subject)")]
    NoNetwork {
        /// The file.
        path: PathBuf,
    },
    /// quinn refused the TLS configuration.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn check_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(TlsError::BadName(name.to_owned()))
    }
}

fn write_file(path: &Path, data: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(data.as_bytes()).map_err(io_err(path))
}

/// Creates a new network: a self-signed CA for `network` in `dir` (`ca.pem`, `ca.key`).
///
/// # Errors
/// [`TlsError`] on a bad name or an I/O failure. Refuses to overwrite an existing `ca.key`.
pub fn init_network(dir: &Path, network: &str) -> Result<(), TlsError> {
    check_name(network)?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let key_path = dir.join("ca.key");
    if key_path.exists() {
        return Err(TlsError::Io {
            path: key_path,
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a network CA already exists here",
            ),
        });
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, network);
    dn.push(
        DnType::CommonName,
        format!("Endophyte network {network} CA"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&dir.join("ca.pem"), &cert.pem(), false)
}

/// Issues a node certificate for `node` signed by the CA in `dir` (`<node>.pem`, `<node>.key`).
///
/// # Errors
/// [`TlsError`] when the CA is missing or unreadable, or on a bad name.
pub fn issue_node(dir: &Path, node: &str) -> Result<(), TlsError> {
    check_name(node)?;
    let ca_path = dir.join("ca.pem");
    let ca_pem = std::fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?;
    let network = network_of_pem(&ca_path, &ca_pem)?;
    let key_path = dir.join("ca.key");
    let ca_key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, network.as_str());
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(node.try_into()?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&dir.join(format!("{node}.key")), &key.serialize_pem(), true)?;
    write_file(&dir.join(format!("{node}.pem")), &cert.pem(), false)
}

fn network_of_pem(path: &Path, pem: &str) -> Result<String, TlsError> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: "certificate",
        why: e.to_string(),
    })?;
    organization(&der, false).ok_or_else(|| TlsError::NoNetwork {
        path: path.to_owned(),
    })
}

/// The organization (network name) of a certificate's subject, or of its issuer.
fn organization(der: &[u8], issuer: bool) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = if issuer {
        cert.issuer()
    } else {
        cert.subject()
    };
    let org = name.iter_organization().next()?;
    org.as_str().ok().map(str::to_owned)
}

/// The node name a peer proved with its certificate on `conn`: the subject's common name (what
/// [`issue_node`] writes, equal to its DNS name). `None` when the peer sent no certificate (the TLS
/// verifier refuses that before any stream opens) or it has no common name.
pub fn peer_node(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// A node's identity in its network: the CA it trusts and its own certificate and key.
#[derive(Debug)]
pub struct Identity {
    /// The network's name (the CA's organization).
    pub network: String,
    /// This node's name (its certificate's DNS name).
    pub node: String,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads `ca.pem`, `<node>.pem` and `<node>.key` from `dir`.
    ///
    /// # Errors
    /// [`TlsError`] naming the missing or unreadable file.
    pub fn load(dir: &Path, node: &str) -> Result<Self, TlsError> {
        let ca_path = dir.join("ca.pem");
        let ca_pem = std::fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?;
        let network = network_of_pem(&ca_path, &ca_pem)?;
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| TlsError::Pem {
                path: ca_path.clone(),
                what: "certificate",
                why: e.to_string(),
            })?
            .into_owned();
        let cert_path = dir.join(format!("{node}.pem"));
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::Pem {
                path: cert_path.clone(),
                what: "certificate",
                why: e.to_string(),
            })?;
        if chain.is_empty() {
            // Text without a CERTIFICATE block parses as an empty chain; the handshake would fail later
            // with "peer sent no certificates", naming nothing.
            return Err(TlsError::Pem {
                path: cert_path,
                what: "certificate",
                why: "it holds no PEM CERTIFICATE block".into(),
            });
        }
        let key_path = dir.join(format!("{node}.key"));
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Pem {
            path: key_path.clone(),
            what: "private key",
            why: e.to_string(),
        })?;
        Ok(Self {
            network,
            node: node.to_owned(),
            ca,
            chain,
            key,
        })
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(roots)
    }

    /// QUIC client configuration for paths from this node: TLS 1.3, this node's certificate, peers checked
    /// against the network CA only; the default congestion controller.
    ///
    /// # Errors
    /// [`TlsError`] when rustls or quinn refuse the configuration.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        self.client_config_with(Congestion::default())
    }

    /// [`Identity::client_config`] with congestion controller `congestion`.
    ///
    /// # Errors
    /// [`TlsError`] when rustls or quinn refuse the configuration.
    pub fn client_config_with(
        &self,
        congestion: Congestion,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Quic(e.to_string()))?;
        let verifier = NetworkServerVerifier {
            inner,
            network: self.network.clone(),
        };
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(Arc::new(transport_config(congestion)));
        Ok(cfg)
    }

    /// QUIC server configuration for a node accepting paths: client certificates required and checked
    /// against the network CA only.
    ///
    /// # Errors
    /// [`TlsError`] when rustls or quinn refuse the configuration.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider.clone())
                .build()
                .map_err(|e| TlsError::Quic(e.to_string()))?;
        let verifier = NetworkClientVerifier {
            inner,
            network: self.network.clone(),
        };
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
        // A backup sends little (acknowledgements, Welcome, Pong): its controller hardly matters.
        cfg.transport_config(Arc::new(transport_config(Congestion::default())));
        Ok(cfg)
    }
}

/// Congestion controller of the paths a node sends on.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// Loss-based (CUBIC, RFC 8312), the default. On a path with random loss its rate is bounded near
    /// `MSS / RTT x 1.22 / sqrt(loss)` (Mathis et al., 1997) whatever the link's rate: the bench measured
    /// about 0.2 MB/s per path at 100 ms and 0.5 % loss on a 12.5 MB/s link.
    #[default]
    Cubic,
    /// Model-based (BBR, quinn's implementation): paces at the measured bottleneck rate and does not take
    /// random loss for congestion, so a lossy long path is used at its rate (the same link: 12.5 MB/s).
    /// Not the default: with the host's CPUs saturated, its bandwidth estimate collapsed on loopback
    /// (70 ms RTT, a 2 x 64 MiB copy in 5.5 s instead of under 1 s), which CUBIC did not do.
    Bbr,
}

/// QUIC transport settings of a path: windows large enough for a loopback or LAN path at full speed,
/// keep-alives, an idle timeout that declares a silent path dead after 3 s, and the congestion controller
/// `congestion`.
pub fn transport_config(congestion: Congestion) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    match congestion {
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
        }
    }
    t.max_idle_timeout(Some(
        Duration::from_secs(3)
            .try_into()
            .expect("3 s fits a VarInt"),
    ));
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    t.stream_receive_window((32u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    t.max_concurrent_uni_streams(0u8.into());
    t.max_concurrent_bidi_streams(4u8.into());
    t
}

/// Rewrites "unknown issuer" into an error that names both networks.
fn explain(
    err: rustls::Error,
    cert: &CertificateDer<'_>,
    network: &str,
    role: &str,
) -> rustls::Error {
    match &err {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => {
            let theirs = organization(cert, true).unwrap_or_else(|| "an unknown CA".into());
            let subject = organization(cert, false).unwrap_or_default();
            rustls::Error::General(format!(
                "{role} certificate (organization {subject:?}) was issued by network {theirs:?}, \
                 not by this node's network {network:?}: refusing a peer from another network"
            ))
        }
        _ => err,
    }
}

#[derive(Debug)]
struct NetworkServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    network: String,
}

impl ServerCertVerifier for NetworkServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| explain(e, end_entity, &self.network, "the backup's"))
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

#[derive(Debug)]
struct NetworkClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    network: String,
}

impl ClientCertVerifier for NetworkClientVerifier {
    fn root_hint_subjects(&self) -> &[RustlsDn] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| explain(e, end_entity, &self.network, "the client's"))
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
