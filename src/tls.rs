//! The rustls client configuration credproxy uses for a provider: its API
//! (`proxy/forward`) and its token endpoint (`tokens/endpoint.rs`) alike.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::config::ProviderConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {source}")]
    CaFile {
        key: String,
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{key}: {source}")]
    Roots { key: String, source: rustls::Error },
    #[error("{key}: the host and port cannot be used as an HTTP authority")]
    Authority { key: String },
    #[error("{key}: the HTTP client for the token endpoint cannot be built")]
    Client { key: String },
}

/// The rustls client configuration for one provider: webpki's roots, plus
/// the provider's `ca_file` if it names one. Also used for the token endpoint.
pub fn tls_config(provider: &ProviderConfig) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &provider.ca_file {
        let key = format!("providers.{}.ca_file", provider.name);
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::CaFile {
                key: key.clone(),
                path: path.display().to_string(),
                source,
            })?;
        for cert in certs {
            roots.add(cert).map_err(|source| TlsError::Roots {
                key: key.clone(),
                source,
            })?;
        }
    }
    let provider_impl = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider_impl)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Roots {
            key: format!("providers.{}", provider.name),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}
