//! A provider as data: the description every part of credproxy reads (the
//! hot path, the token endpoint, the connect flows, the pages), filled in
//! from a `[providers.NAME]` table over a preset (`spark`, `zillow`) or a
//! scheme's defaults (`oauth2`, `static`).
//!
//! Nothing here runs a request: `provider/` turns a [`Description`] into
//! slots, injections and scrubbers; this module only reads, defaults and
//! checks the table, naming the key of anything it refuses.

use std::collections::BTreeMap;

use http::header::HeaderName;
use serde::Deserialize;

use super::{invalid, ConfigError};

/// `kind`: a preset (Spark's or Zillow's values filled in) or a scheme the
/// table itself describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// FBS's Spark API: `Authorization: OAuth TOKEN`, JSON token bodies.
    Spark,
    /// Zillow Rental Feeds: `accessToken`, `clientId`, `apiKey` query parameters,
    /// form token bodies with HTTP Basic client authentication.
    Zillow,
    /// Any OAuth 2 API, described by its table.
    #[serde(rename = "oauth2")]
    OAuth2,
    /// A stored API key or personal access token, never refreshed.
    Static,
    /// Spark's original API-key authentication: a Spark session opened by
    /// credproxy, every request signed.
    SparkApiKey,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Spark => "spark",
            ProviderKind::Zillow => "zillow",
            ProviderKind::OAuth2 => "oauth2",
            ProviderKind::Static => "static",
            ProviderKind::SparkApiKey => "spark_api_key",
        }
    }

    /// The scheme a kind is an instance of.
    pub fn scheme(self) -> Scheme {
        match self {
            ProviderKind::Spark | ProviderKind::Zillow | ProviderKind::OAuth2 => Scheme::OAuth2,
            ProviderKind::Static => Scheme::Static,
            ProviderKind::SparkApiKey => Scheme::SparkApiKey,
        }
    }

    /// The `api_base` of a kind whose provider has one home.
    pub fn default_api_base(self) -> Option<&'static str> {
        match self {
            ProviderKind::Spark | ProviderKind::SparkApiKey => Some("https://sparkapi.com"),
            ProviderKind::Zillow => Some("https://rentalsapi.zillowgroup.com"),
            ProviderKind::OAuth2 | ProviderKind::Static => None,
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a provider's sessions get their credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Access and refresh tokens from a token endpoint, refreshed.
    OAuth2,
    /// One stored key, injected as an access token would be, never refreshed.
    Static,
    /// Spark's API key and secret: credproxy opens Spark's session (its
    /// `AuthToken` is the session's access token, reopened as a refresh
    /// is) and signs every request (`provider/spark.rs`).
    SparkApiKey,
}

/// How the grant's parameters travel to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantBody {
    /// `application/x-www-form-urlencoded` (RFC 6749).
    Form,
    /// A JSON object (Spark).
    Json,
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// HTTP Basic (RFC 6749 §2.3.1).
    Basic,
    /// `client_id` and `client_secret` in the grant body.
    Body,
}

/// What a template may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    AccessToken,
    ClientId,
    ApiKey,
}

impl Placeholder {
    const ALL: [(&'static str, Placeholder); 3] = [
        ("access_token", Placeholder::AccessToken),
        ("client_id", Placeholder::ClientId),
        ("api_key", Placeholder::ApiKey),
    ];
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Value(Placeholder),
}

/// A value with placeholders, `Bearer {access_token}`: parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub pieces: Vec<Piece>,
}

impl Template {
    /// Parses `text`; an unknown placeholder or a stray brace is refused
    /// (the message names the placeholder, never a value).
    pub fn parse(key: &str, text: &str) -> Result<Template, ConfigError> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    pieces.push(Piece::Text(rest.to_owned()));
                    break;
                }
                Some(at) if rest.as_bytes()[at] == b'}' => {
                    return Err(invalid(key, "has a `}` that closes no placeholder"));
                }
                Some(at) => {
                    if at > 0 {
                        pieces.push(Piece::Text(rest[..at].to_owned()));
                    }
                    let after = &rest[at + 1..];
                    let Some(end) = after.find('}') else {
                        return Err(invalid(key, "has a `{` that is never closed"));
                    };
                    let name = &after[..end];
                    let Some(&(_, p)) = Placeholder::ALL.iter().find(|(n, _)| *n == name) else {
                        let shown: String = name
                            .chars()
                            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .take(32)
                            .collect();
                        return Err(invalid(
                            key,
                            format!(
                                "names an unknown placeholder `{{{shown}}}` (use {{access_token}}, {{client_id}} or {{api_key}})"
                            ),
                        ));
                    };
                    pieces.push(Piece::Value(p));
                    rest = &after[end + 1..];
                }
            }
        }
        Ok(Template { pieces })
    }

    /// A template of one literal text (for presets).
    fn of(pieces: Vec<Piece>) -> Template {
        Template { pieces }
    }

    pub fn uses(&self, p: Placeholder) -> bool {
        self.pieces.contains(&Piece::Value(p))
    }

    /// The text around the template's one `{access_token}`, when it has
    /// exactly one and nothing else: where a caller may put its session key.
    pub fn around_access_token(&self) -> Option<(String, String)> {
        let mut before = String::new();
        let mut after = String::new();
        let mut seen = false;
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) if seen => after.push_str(t),
                Piece::Text(t) => before.push_str(t),
                Piece::Value(Placeholder::AccessToken) if !seen => seen = true,
                Piece::Value(_) => return None,
            }
        }
        seen.then_some((before, after))
    }

    /// The value with the placeholders filled in.
    pub fn fill(&self, value: impl Fn(Placeholder) -> String) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Value(p) => out.push_str(&value(*p)),
            }
        }
        out
    }
}

/// `expired` and `throttled`: which answers mean what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    /// The statuses; for `throttled`, 429 counts whatever the body says.
    pub status: Vec<u16>,
    /// A code to find in a JSON error body (a `code` field at the top or
    /// one object down, as Spark's `{"D": {"Code": 1550}}`); with it, a
    /// listed status means this signal only when the body carries it.
    pub json_code: Option<JsonCode>,
}

/// A JSON error code: a number or a string.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum JsonCode {
    Number(i64),
    Text(String),
}

impl Signal {
    fn status(status: &[u16]) -> Signal {
        Signal {
            status: status.to_vec(),
            json_code: None,
        }
    }

    /// Whether `status` may mean this signal (the body decides when a
    /// JSON code is set, unless `always` is that status).
    pub fn names(&self, status: u16) -> bool {
        self.status.contains(&status)
    }
}

/// What only Spark does, switched on by Spark's preset and carried out in
/// `provider/spark.rs`: the Bearer scheme kept on `/Reso` paths, the
/// hybrid OpenID connect flow, `X-SparkApi-User-Agent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Plain,
    Spark,
}

/// A provider, described: everything the rest of credproxy asks of it.
#[derive(Debug, Clone)]
pub struct Description {
    pub scheme: Scheme,
    pub dialect: Dialect,
    pub grant_body: GrantBody,
    pub client_auth: ClientAuth,
    /// Also sends `redirect_uri` when refreshing (both presets' documents
    /// show it; RFC 6749 sends it only with a code).
    pub redirect_uri_on_refresh: bool,
    /// Sent space-separated as `scope` when connecting.
    pub scopes: Vec<String>,
    /// Injected headers, in order.
    pub headers: Vec<(HeaderName, Template)>,
    /// Injected query parameters, in order, appended after the caller's.
    pub query: Vec<(String, Template)>,
    pub expired: Signal,
    pub throttled: Signal,
    /// Answers that say the credential itself is bad (Spark's 1000 and
    /// 1010 on a signed request): the session needs reauthorization at once.
    pub revoked: Vec<Signal>,
    /// Query parameters removed from the caller's query though no template
    /// writes them (Spark's `ApiKey`, `ApiSig`, `ApiUser`: the signature
    /// writes them).
    pub owned_query: Vec<String>,
    /// A path (after the provider's prefix) the pages show in an example call.
    pub example_path: String,
}

impl Description {
    /// Whether any injected value uses `p`.
    pub fn uses(&self, p: Placeholder) -> bool {
        self.headers.iter().any(|(_, t)| t.uses(p)) || self.query.iter().any(|(_, t)| t.uses(p))
    }
}

/// The keys of a table that describe the provider (`[providers.NAME]`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInject {
    headers: Option<BTreeMap<String, String>>,
    query: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSignal {
    status: RawStatus,
    json_code: Option<JsonCode>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawStatus {
    One(i64),
    Many(Vec<i64>),
}

/// The describing keys of a `[providers.NAME]` table, as read.
pub(super) struct RawDescription {
    pub scopes: Option<Vec<String>>,
    pub grant_body: Option<GrantBody>,
    pub client_auth: Option<ClientAuth>,
    pub inject: Option<RawInject>,
    pub expired: Option<RawSignal>,
    pub throttled: Option<RawSignal>,
}

/// Spark's values (its OAuth 2 document): `Authorization: OAuth TOKEN`,
/// JSON grants with the client in the body, 401 expired, 429 or 503 with
/// code 1550 throttled.
fn spark() -> Description {
    Description {
        scheme: Scheme::OAuth2,
        dialect: Dialect::Spark,
        grant_body: GrantBody::Json,
        client_auth: ClientAuth::Body,
        redirect_uri_on_refresh: true,
        scopes: Vec::new(),
        headers: vec![(
            http::header::AUTHORIZATION,
            Template::of(vec![
                Piece::Text("OAuth ".into()),
                Piece::Value(Placeholder::AccessToken),
            ]),
        )],
        query: Vec::new(),
        expired: Signal::status(&[401]),
        throttled: Signal {
            status: vec![429, 503],
            json_code: Some(JsonCode::Number(1550)),
        },
        revoked: Vec::new(),
        owned_query: Vec::new(),
        example_path: "/v1/listings?_limit=1".to_owned(),
    }
}

/// Spark's API-key authentication (its original scheme): the session's
/// `AuthToken` in the query, every request signed; a 401 with code 1020
/// means the Spark session ended (reopen and replay), 1000 and 1010 that
/// the key itself is bad.
fn spark_api_key() -> Description {
    let coded = |n| Signal {
        status: vec![401],
        json_code: Some(JsonCode::Number(n)),
    };
    Description {
        scheme: Scheme::SparkApiKey,
        headers: Vec::new(),
        query: vec![(
            "AuthToken".to_owned(),
            Template::of(vec![Piece::Value(Placeholder::AccessToken)]),
        )],
        expired: coded(1020),
        revoked: vec![coded(1000), coded(1010)],
        owned_query: vec!["ApiKey".into(), "ApiSig".into(), "ApiUser".into()],
        ..spark()
    }
}

/// Zillow's values (its Rental Feeds document): `accessToken`, `clientId`
/// and `apiKey` query parameters, form grants with HTTP Basic.
fn zillow() -> Description {
    let param = |name: &str, p| (name.to_owned(), Template::of(vec![Piece::Value(p)]));
    Description {
        scheme: Scheme::OAuth2,
        dialect: Dialect::Plain,
        grant_body: GrantBody::Form,
        client_auth: ClientAuth::Basic,
        redirect_uri_on_refresh: true,
        scopes: Vec::new(),
        headers: Vec::new(),
        query: vec![
            param("accessToken", Placeholder::AccessToken),
            param("clientId", Placeholder::ClientId),
            param("apiKey", Placeholder::ApiKey),
        ],
        expired: Signal::status(&[401]),
        throttled: Signal::status(&[429]),
        revoked: Vec::new(),
        owned_query: Vec::new(),
        example_path: "/listings/v1/listingsForUser".to_owned(),
    }
}

/// An `oauth2` or `static` table's defaults: `Authorization: Bearer TOKEN`,
/// RFC 6749's form grant with HTTP Basic.
fn plain(scheme: Scheme) -> Description {
    Description {
        scheme,
        dialect: Dialect::Plain,
        grant_body: GrantBody::Form,
        client_auth: ClientAuth::Basic,
        redirect_uri_on_refresh: false,
        scopes: Vec::new(),
        headers: vec![(
            http::header::AUTHORIZATION,
            Template::of(vec![
                Piece::Text("Bearer ".into()),
                Piece::Value(Placeholder::AccessToken),
            ]),
        )],
        query: Vec::new(),
        expired: Signal::status(&[401]),
        throttled: Signal::status(&[429]),
        revoked: Vec::new(),
        owned_query: Vec::new(),
        example_path: "/".to_owned(),
    }
}

/// The description a kind starts from, before the table's own keys.
pub fn preset(kind: ProviderKind) -> Description {
    match kind {
        ProviderKind::Spark => spark(),
        ProviderKind::Zillow => zillow(),
        ProviderKind::OAuth2 => plain(Scheme::OAuth2),
        ProviderKind::Static => plain(Scheme::Static),
        ProviderKind::SparkApiKey => spark_api_key(),
    }
}

/// The presets and schemes as a Markdown table (README's "Providers"),
/// written from [`preset`] so that the two never differ.
pub fn presets_table() -> String {
    let code = |t: &str| format!("`{t}`");
    let mut out = String::from(
        "| kind | injected | token grant | refresh and replay on | holds the budget |\n| --- | --- | --- | --- | --- |\n",
    );
    for kind in [
        ProviderKind::Spark,
        ProviderKind::Zillow,
        ProviderKind::SparkApiKey,
        ProviderKind::OAuth2,
        ProviderKind::Static,
    ] {
        let d = preset(kind);
        let show = |t: &Template| {
            t.fill(|p| match p {
                Placeholder::AccessToken => "{access_token}".into(),
                Placeholder::ClientId => "{client_id}".into(),
                Placeholder::ApiKey => "{api_key}".into(),
            })
        };
        let mut injected: Vec<String> = d
            .headers
            .iter()
            .map(|(n, t)| code(&format!("{}: {}", header_case(n.as_str()), show(t))))
            .collect();
        injected.extend(
            d.query
                .iter()
                .map(|(n, t)| code(&format!("{n}={}", show(t)))),
        );
        let grant = match d.scheme {
            Scheme::Static => "none: a stored key, never refreshed".to_owned(),
            Scheme::SparkApiKey => "`POST /v1/session`, signed with the key's secret".to_owned(),
            Scheme::OAuth2 => format!(
                "{} body, client by {}",
                match d.grant_body {
                    GrantBody::Form => "form",
                    GrantBody::Json => "JSON",
                },
                match d.client_auth {
                    ClientAuth::Basic => "HTTP Basic",
                    ClientAuth::Body => "the body",
                }
            ),
        };
        let signal = |s: &Signal| {
            let statuses: Vec<String> = s.status.iter().map(u16::to_string).collect();
            match &s.json_code {
                None => statuses.join(", "),
                Some(JsonCode::Number(n)) => format!("{} (code {n})", statuses.join(", ")),
                Some(JsonCode::Text(t)) => format!("{} (code {t})", statuses.join(", ")),
            }
        };
        let expired = match d.scheme {
            Scheme::Static => "never (a 401 goes back as it came)".to_owned(),
            Scheme::OAuth2 | Scheme::SparkApiKey => signal(&d.expired),
        };
        if d.scheme == Scheme::SparkApiKey {
            injected.push("every request signed (`ApiSig`)".to_owned());
        }
        out.push_str(&format!(
            "| `{kind}` | {} | {grant} | {expired} | {} |\n",
            injected.join(" and "),
            signal(&d.throttled)
        ));
    }
    out
}

/// `authorization` as people write it: `Authorization`.
pub fn header_case(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Headers a template may not set: framing, routing and hop-by-hop ones,
/// which the proxy owns, and the ones that carry a session key to it.
const RESERVED_HEADERS: [&str; 14] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "expect",
    "content-encoding",
    "cookie",
];

/// Whether a query parameter's name can be kept from the caller: plain
/// ASCII letters, digits, `-`, `_` and `.` (a name with `%`, `+`, `[`,
/// `=`, `&`, `;` or a space has spellings a server may read as it that
/// credproxy cannot tell apart).
fn ownable_query_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Fills `kind`'s preset with the table's keys and checks the result.
pub(super) fn describe(
    name: &str,
    kind: ProviderKind,
    raw: RawDescription,
    session_header: Option<&str>,
) -> Result<Description, ConfigError> {
    let key = |k: &str| format!("providers.{name}.{k}");
    let mut d = preset(kind);
    if d.scheme == Scheme::SparkApiKey {
        for (given, k) in [
            (raw.scopes.is_some(), "scopes"),
            (raw.grant_body.is_some(), "grant_body"),
            (raw.client_auth.is_some(), "client_auth"),
            (raw.inject.is_some(), "inject"),
        ] {
            if given {
                return Err(invalid(
                    key(k),
                    "is not used by kind = \"spark_api_key\": Spark's session and signature are fixed by its API",
                ));
            }
        }
    }
    if let Some(scopes) = raw.scopes {
        for s in &scopes {
            // RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
            if s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
            {
                return Err(invalid(
                    key("scopes"),
                    "each scope must be printable ASCII without spaces, `\"` or `\\` (RFC 6749 §3.3)",
                ));
            }
        }
        d.scopes = scopes;
    }
    if let Some(g) = raw.grant_body {
        d.grant_body = g;
    }
    if let Some(c) = raw.client_auth {
        d.client_auth = c;
    }
    if let Some(inject) = raw.inject {
        if inject.headers.is_some() || inject.query.is_some() {
            d.headers.clear();
            d.query.clear();
        }
        for (h, text) in inject.headers.unwrap_or_default() {
            let k = key(&format!("inject.headers.{h}"));
            let header = HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| invalid(&k, "is not a valid header name"))?;
            if RESERVED_HEADERS.contains(&header.as_str())
                || session_header.is_some_and(|s| s.eq_ignore_ascii_case(header.as_str()))
            {
                return Err(invalid(
                    &k,
                    "is a header credproxy owns (framing, hop-by-hop or the session header); it cannot be injected",
                ));
            }
            let template = Template::parse(&k, &text)?;
            if text.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
                return Err(invalid(&k, "must not contain control characters"));
            }
            if d.headers.iter().any(|(n, _)| *n == header) {
                return Err(invalid(&k, "is given twice (header names ignore case)"));
            }
            d.headers.push((header, template));
        }
        for (q, text) in inject.query.unwrap_or_default() {
            let k = key(&format!("inject.query.{q}"));
            if !ownable_query_name(&q) {
                return Err(invalid(
                    &k,
                    "cannot be kept from the caller: a query parameter credproxy injects must be named with ASCII letters, digits, `-`, `_` and `.` only",
                ));
            }
            if d.query.iter().any(|(n, _)| fold_name(n) == fold_name(&q)) {
                return Err(invalid(
                    &k,
                    "is the same parameter as another injected one (names ignore case, and `.` reads as `_`)",
                ));
            }
            d.query.push((q, Template::parse(&k, &text)?));
        }
    }
    if !d.uses(Placeholder::AccessToken) {
        return Err(invalid(
            key("inject"),
            "injects no {access_token}: name it in a header or query template",
        ));
    }
    for (field, raw, target) in [
        ("expired", raw.expired, &mut d.expired),
        ("throttled", raw.throttled, &mut d.throttled),
    ] {
        let Some(raw) = raw else { continue };
        let status = match raw.status {
            RawStatus::One(s) => vec![s],
            RawStatus::Many(v) => v,
        };
        if status.is_empty() {
            return Err(invalid(key(&format!("{field}.status")), "names no status"));
        }
        let mut out = Vec::with_capacity(status.len());
        for s in status {
            let s = u16::try_from(s)
                .ok()
                .filter(|s| (400..=599).contains(s))
                .ok_or_else(|| {
                    invalid(
                        key(&format!("{field}.status")),
                        "must be an error status (400 to 599): a 2xx or 3xx answer is never a refusal",
                    )
                })?;
            out.push(s);
        }
        *target = Signal {
            status: out,
            json_code: raw.json_code,
        };
    }
    Ok(d)
}

/// A query parameter's name as servers compare it: ASCII case folded, and
/// `.` read as `_` (PHP's rule).
pub fn fold_name(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'.' | b' ' => '_',
            b => b.to_ascii_lowercase() as char,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_and_refuse_unknown_placeholders() {
        let t = Template::parse("k", "Bearer {access_token}").expect("parses");
        assert_eq!(
            t.around_access_token(),
            Some(("Bearer ".to_owned(), String::new()))
        );
        let e = Template::parse("k", "Bearer {acces_token}").expect_err("unknown");
        assert!(e.to_string().contains("{acces_token}"), "{e}");
        assert!(Template::parse("k", "x {access_token").is_err());
        assert!(Template::parse("k", "x }").is_err());
        let two = Template::parse("k", "{client_id}:{access_token}").expect("parses");
        assert_eq!(two.around_access_token(), None);
        assert_eq!(
            two.fill(|p| format!("{p:?}")),
            "ClientId:AccessToken".to_owned()
        );
    }

    #[test]
    fn presets_inject_an_access_token() {
        for kind in [
            ProviderKind::Spark,
            ProviderKind::Zillow,
            ProviderKind::OAuth2,
            ProviderKind::Static,
        ] {
            assert!(preset(kind).uses(Placeholder::AccessToken), "{kind}");
        }
    }
}
