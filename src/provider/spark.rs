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
    bearer: &HeaderValue,
    user_agent: Option<&HeaderValue>,
    slot: &Slot,
    path: &str,
) {
    if slot.bearer || is_reso_path(path) {
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
