//! What only Spark does, once: its preset (`config/provider.rs`) switches
//! it on with `Dialect::Spark`, and the generic code calls in here.
//!
//! - A caller's `Authorization` may carry its key under `OAuth` or
//!   `Bearer`; the Bearer scheme is kept when the caller chose it, and used
//!   on the RESO Web API's paths (`/Reso/OData...`), which take only Bearer.
//! - `X-SparkApi-User-Agent` is added from `user_agent` when the caller sent
//!   none.
//! - The connect flow is Spark's hybrid OpenID + OAuth 2 one unless the
//!   authorisation URL is its plain OAuth 2 endpoint (`.../oauth2`), and the
//!   callback's code may come as `openid.spark.code`.

use http::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use url::Url;

use crate::secrets::session::KeyHash;

use super::Slot;

/// Spark's application identification header.
pub const USER_AGENT: http::HeaderName = http::HeaderName::from_static("x-sparkapi-user-agent");

/// Reads a caller's `Authorization: OAuth KEY` or `Bearer KEY` (any case,
/// any spacing) into `slot`; other schemes carry no key.
pub(super) fn read_authorization(value: &HeaderValue, slot: &mut Slot) {
    let Ok(text) = value.to_str() else { return };
    let Some((scheme, rest)) = text.trim().split_once(' ') else {
        return;
    };
    let token = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        slot.bearer = true;
    }
    if (slot.bearer || scheme.eq_ignore_ascii_case("oauth")) && !token.is_empty() {
        slot.key = Some(KeyHash::of(token.as_bytes()));
    }
}

/// After the generic injection wrote `Authorization: OAuth TOKEN`: the
/// Bearer form where the caller chose it or the RESO Web API needs it, and
/// the user agent when the caller sent none.
pub(super) fn inject(
    headers: &mut HeaderMap,
    bearer: Option<&HeaderValue>,
    user_agent: Option<&HeaderValue>,
    slot: &Slot,
    path: &str,
) {
    if let Some(bearer) = bearer.filter(|_| slot.bearer || is_reso_path(path)) {
        headers.insert(AUTHORIZATION, bearer.clone());
    }
    if let Some(ua) = user_agent {
        if !headers.contains_key(&USER_AGENT) {
            headers.insert(USER_AGENT, ua.clone());
        }
    }
}

fn is_reso_path(path: &str) -> bool {
    path.get(..11)
        .is_some_and(|p| p.eq_ignore_ascii_case("/reso/odata"))
}

/// Whether `authorize_url` is Spark's OpenID endpoint (the hybrid flow)
/// rather than its plain OAuth 2 one.
pub fn is_openid(authorize_url: &Url) -> bool {
    !authorize_url
        .path()
        .trim_end_matches('/')
        .ends_with("/oauth2")
}

/// The hybrid flow's authorisation URL: OpenID carries no state
/// parameter, so it rides in `return_to`'s query.
pub fn openid_authorize(url: &mut Url, redirect_uri: &Url, client_id: &str, state: &str) {
    let mut return_to = redirect_uri.clone();
    return_to.query_pairs_mut().append_pair("state", state);
    url.query_pairs_mut()
        .append_pair("openid.mode", "checkid_setup")
        .append_pair("openid.return_to", return_to.as_str())
        .append_pair("openid.spark.client_id", client_id)
        .append_pair("openid.spark.combined_flow", "true");
}

/// The query parameter that carries the code in the hybrid flow's callback
/// (the plain OAuth 2 `code` is read too).
pub const OPENID_CODE: &str = "openid.spark.code";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reso_path_detection() {
        assert!(is_reso_path("/Reso/OData/Property"));
        assert!(is_reso_path("/reso/odata"));
        assert!(!is_reso_path("/v1/listings"));
        assert!(!is_reso_path("/Reso"));
    }
}

/// Spark's API-key authentication: what a session holds and how a request
/// is signed (`kind = "spark_api_key"`).
///
/// A session's sealed "refresh token" is its [`ApiKeyCredentials`] (the key,
/// its secret, the optional `ApiUser`); its sealed "access token" is the
/// same with the open Spark session's `AuthToken`. Opening a Spark session
/// is then what a refresh is (one at a time per key, across instances), and
/// the hot path reads everything from the access token.
pub mod api_key {
    use md5::{Digest, Md5};
    use secrecy::{ExposeSecret, SecretString};
    use serde::{Deserialize, Serialize};

    /// The key, its secret and the optional `ApiUser`, and once a Spark
    /// session is open, its `AuthToken`.
    #[derive(Serialize, Deserialize)]
    pub struct ApiKeyCredentials {
        pub api_key: String,
        #[serde(with = "secret")]
        pub api_secret: SecretString,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub api_user: Option<String>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pub auth_token: String,
    }

    impl std::fmt::Debug for ApiKeyCredentials {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("ApiKeyCredentials([redacted])")
        }
    }

    mod secret {
        use secrecy::{ExposeSecret, SecretString};
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(s: &SecretString, out: S) -> Result<S::Ok, S::Error> {
            out.serialize_str(s.expose_secret())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
            String::deserialize(d).map(SecretString::from)
        }
    }

    impl ApiKeyCredentials {
        /// A new session's key: its tokens as stored before any Spark
        /// session is open, `(access token, refresh token)`. The access
        /// token's lifetime is zero, so the first request opens one.
        pub fn new_session(
            api_key: String,
            api_secret: SecretString,
            api_user: Option<String>,
        ) -> (SecretString, SecretString) {
            let creds = ApiKeyCredentials {
                api_key,
                api_secret,
                api_user,
                auth_token: String::new(),
            };
            (creds.to_secret(), creds.to_secret())
        }

        /// Read from a sealed token's text; `None` when it is not one.
        pub fn read(text: &SecretString) -> Option<ApiKeyCredentials> {
            serde_json::from_str(text.expose_secret()).ok()
        }

        /// As a sealed token's text.
        pub fn to_secret(&self) -> SecretString {
            SecretString::from(serde_json::to_string(self).unwrap_or_default())
        }

        /// The same key with a Spark session's `AuthToken`.
        pub fn with_auth_token(&self, auth_token: String) -> ApiKeyCredentials {
            ApiKeyCredentials {
                api_key: self.api_key.clone(),
                api_secret: self.api_secret.clone(),
                api_user: self.api_user.clone(),
                auth_token,
            }
        }

        /// `ApiSig` of `POST /v1/session`: `md5(secret + "ApiKey" + key)`.
        pub fn session_signature(&self) -> String {
            let mut md5 = Md5::new();
            md5.update(self.api_secret.expose_secret().as_bytes());
            md5.update(b"ApiKey");
            md5.update(self.api_key.as_bytes());
            hex(&md5.finalize())
        }

        /// `ApiSig` of a request: `md5(secret + "ApiKey" + key +
        /// "ServicePath" + path + params + body)`, `params` every query
        /// parameter but `ApiSig`, form-decoded, sorted by name (a repeated
        /// name in the order sent), each written as name then value.
        pub fn request_signature(&self, path: &str, query: &str, body: &[u8]) -> String {
            let mut params: Vec<(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> =
                url::form_urlencoded::parse(query.as_bytes())
                    .filter(|(name, _)| name != "ApiSig")
                    .collect();
            params.sort_by(|a, b| a.0.cmp(&b.0));
            let mut md5 = Md5::new();
            md5.update(self.api_secret.expose_secret().as_bytes());
            md5.update(b"ApiKey");
            md5.update(self.api_key.as_bytes());
            md5.update(b"ServicePath");
            md5.update(path.as_bytes());
            for (name, value) in &params {
                md5.update(name.as_bytes());
                md5.update(value.as_bytes());
            }
            md5.update(body);
            hex(&md5.finalize())
        }
    }

    fn hex(bytes: &[u8]) -> String {
        use std::fmt::Write;
        bytes.iter().fold(String::with_capacity(32), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn creds() -> ApiKeyCredentials {
            ApiKeyCredentials {
                api_key: "key1".into(),
                api_secret: SecretString::from("s3cr3t"),
                api_user: None,
                auth_token: String::new(),
            }
        }

        #[test]
        fn signatures_match_sparks_recipe() {
            // printf 's3cr3tApiKeykey1' | md5sum
            assert_eq!(
                creds().session_signature(),
                "ffe523584af6e5221451183cdd900666"
            );
            // printf 's3cr3tApiKeykey1ServicePath/v1/listingsAuthTokentok1_limit1b2 x{"a":1}' | md5sum
            // (`+` decoded to a space, names sorted, ApiSig left out)
            assert_eq!(
                creds().request_signature(
                    "/v1/listings",
                    "_limit=1&b=2+x&ApiSig=old&AuthToken=tok1",
                    br#"{"a":1}"#
                ),
                "25faed0cf85dec06cc9253fcfd395fa0"
            );
        }

        #[test]
        fn credentials_round_trip_and_never_print() {
            let c = creds().with_auth_token("tok1".into());
            let back = ApiKeyCredentials::read(&c.to_secret()).expect("reads");
            assert_eq!(back.auth_token, "tok1");
            assert_eq!(back.api_secret.expose_secret(), "s3cr3t");
            assert!(!format!("{back:?}").contains("s3cr3t"));
        }
    }
}
