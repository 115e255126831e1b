//! The provider's authorisation pages, as a person sees them: a login page, a
//! consent page, and a redirect back to the application with a code (or a
//! refusal).
//!
//! Three flows share the pages:
//! - Spark's OpenID+OAuth 2 hybrid flow at `/openid` (`openid.mode=checkid_setup`,
//!   `openid.return_to`, `openid.spark.client_id`, `openid.spark.combined_flow=true`),
//!   answered with `openid.mode=id_res&openid.spark.code=CODE` or `openid.mode=cancel`;
//! - Spark's plain OAuth 2 flow at `/oauth2`, Zillow's and acme's at
//!   `/oauth/authorize` (`response_type=code`, `client_id`, `redirect_uri`,
//!   `state`; an optional `scope`, recorded as it came), answered with
//!   `code=CODE&state=S` or `error=access_denied&state=S`.
//!
//! `GET {page}` checks the request and shows the login form, which carries the
//! original parameters in hidden fields; `POST {page}/login` checks them again
//! and, for any non-empty username and password, shows the consent form. That
//! form carries only a one-time ticket, which holds the checked request on the
//! server side, so the consent step can neither be skipped nor pointed at
//! another redirect URI; `POST {page}/consent` redeems it and redirects.
//! Every value echoed into a page is HTML-escaped, and every value appended to
//! a redirect is form-urlencoded.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, Response, StatusCode};

use crate::{lock, random_token, Kind, Shared};

/// Login and consent forms are small; anything bigger is refused.
const MAX_FORM: usize = 64 * 1024;

/// The name the consent page gives the application asking for access.
const APP_NAME: &str = "credproxy-tests";

/// Form fields of the login step; never carried over as request parameters.
const LOGIN_FIELDS: [&str; 2] = ["username", "password"];

/// Which protocol an authorisation page speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Spark's OpenID+OAuth 2 hybrid flow.
    Hybrid,
    /// Plain OAuth 2 authorisation code flow (Spark's `/oauth2`, Zillow).
    OAuth2,
}

/// Which step of the flow a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// `GET {page}?...`: the authorisation request itself.
    Start,
    /// `POST {page}/login`: the login form.
    Login,
    /// `POST {page}/consent`: the consent form.
    Consent,
}

/// The authorisation pages' own state.
#[derive(Default)]
pub(crate) struct State {
    /// The raw query of the last `GET` of an authorisation page.
    pub(crate) last_query: std::sync::Mutex<Option<String>>,
    /// Consent tickets not yet redeemed: one per successful login.
    tickets: std::sync::Mutex<HashMap<String, AuthRequest>>,
}

/// The entry path of each authorisation page of `kind`.
pub(crate) fn pages(kind: Kind) -> &'static [(&'static str, Flow)] {
    match kind {
        Kind::Spark => &[("/openid", Flow::Hybrid), ("/oauth2", Flow::OAuth2)],
        Kind::Zillow | Kind::OAuth2 => &[("/oauth/authorize", Flow::OAuth2)],
    }
}

/// The page, flow and step `path` belongs to, if it is an authorisation page.
pub(crate) fn route(kind: Kind, path: &str) -> Option<(&'static str, Flow, Step)> {
    pages(kind).iter().find_map(|&(page, flow)| {
        let step = match path.strip_prefix(page)? {
            "" => Step::Start,
            "/login" => Step::Login,
            "/consent" => Step::Consent,
            _ => return None,
        };
        Some((page, flow, step))
    })
}

/// A checked authorisation request.
#[derive(Clone, Debug)]
struct AuthRequest {
    flow: Flow,
    /// Every parameter as received, in order, for the hidden fields.
    params: Vec<(String, String)>,
    /// `openid.return_to` or `redirect_uri`, exactly as received.
    redirect: String,
    /// OAuth 2 only: the `state` to echo.
    state: Option<String>,
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    page: &'static str,
    flow: Flow,
    step: Step,
) -> Response<Body> {
    let kind = shared.opts.kind;
    let method = req.method().clone();
    match (step, method) {
        (Step::Start, Method::GET | Method::HEAD) => {
            let query = req.uri().query().unwrap_or("").to_owned();
            *lock(&shared.authorize.last_query) = Some(query.clone());
            let params = parse_pairs(query.as_bytes());
            match check(&shared, flow, params) {
                Ok(request) => login_page(kind, page, &request, "", None),
                Err(problems) => bad_request(kind, &problems),
            }
        }
        (Step::Start, _) => method_not_allowed(kind, "GET, HEAD"),
        (Step::Login | Step::Consent, Method::POST) => {
            let form = match Limited::new(req.into_body(), MAX_FORM).collect().await {
                Ok(collected) => parse_pairs(&collected.to_bytes()),
                Err(_) => {
                    return bad_request(kind, &["The form could not be read.".to_owned()]);
                }
            };
            if step == Step::Login {
                login(&shared, page, flow, form)
            } else {
                consent(&shared, form)
            }
        }
        (Step::Login | Step::Consent, _) => method_not_allowed(kind, "POST"),
    }
}

/// The login form was sent: the consent page, or the login page again.
fn login(
    shared: &Shared,
    page: &'static str,
    flow: Flow,
    form: Vec<(String, String)>,
) -> Response<Body> {
    let kind = shared.opts.kind;
    let field = |name: &str| {
        form.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let username = field("username");
    let password = field("password");
    let params = form
        .iter()
        .filter(|(name, _)| !LOGIN_FIELDS.contains(&name.as_str()))
        .cloned()
        .collect();
    let request = match check(shared, flow, params) {
        Ok(request) => request,
        Err(problems) => return bad_request(kind, &problems),
    };
    if username.trim().is_empty() || password.is_empty() {
        let error = "Enter both a username and a password.";
        return login_page(kind, page, &request, &username, Some(error));
    }
    let ticket = random_token("ticket-");
    lock(&shared.authorize.tickets).insert(ticket.clone(), request.clone());
    consent_page(kind, page, &request, &username, &ticket)
}

/// The consent form was sent: redirect back to the application.
fn consent(shared: &Shared, form: Vec<(String, String)>) -> Response<Body> {
    let kind = shared.opts.kind;
    let field = |name: &str| {
        form.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let allowed = match field("decision") {
        Some("allow") => true,
        Some("deny") => false,
        _ => return bad_request(kind, &["Choose Allow or Deny.".to_owned()]),
    };
    let request = field("ticket").and_then(|t| lock(&shared.authorize.tickets).remove(t));
    let Some(request) = request else {
        return bad_request(
            kind,
            &[
                "This sign-in has expired or was already used: start again from the application."
                    .to_owned(),
            ],
        );
    };
    let mut answer: Vec<(&str, String)> = Vec::new();
    match (request.flow, allowed) {
        (Flow::Hybrid, true) => {
            answer.push(("openid.mode", "id_res".into()));
            answer.push(("openid.spark.code", shared.mint_code()));
        }
        (Flow::Hybrid, false) => answer.push(("openid.mode", "cancel".into())),
        (Flow::OAuth2, true) => answer.push(("code", shared.mint_code())),
        (Flow::OAuth2, false) => answer.push(("error", "access_denied".into())),
    }
    if let Some(state) = &request.state {
        answer.push(("state", state.clone()));
    }
    redirect(kind, &append_query(&request.redirect, &answer))
}

/// What an authorisation request's parameter must be.
enum Rule {
    /// Exactly this value.
    Equals(&'static str),
    /// The stand-in's client id.
    Client,
    /// A redirect URI fit to send the person back to.
    Redirect,
}

/// The required parameters of each flow, in the order they are checked.
fn rules(flow: Flow) -> &'static [(&'static str, Rule)] {
    match flow {
        Flow::Hybrid => &[
            ("openid.mode", Rule::Equals("checkid_setup")),
            ("openid.return_to", Rule::Redirect),
            ("openid.spark.client_id", Rule::Client),
            ("openid.spark.combined_flow", Rule::Equals("true")),
        ],
        Flow::OAuth2 => &[
            ("response_type", Rule::Equals("code")),
            ("client_id", Rule::Client),
            ("redirect_uri", Rule::Redirect),
        ],
    }
}

/// Checks an authorisation request's parameters; every problem found, in
/// words a person can act on, when it is not acceptable.
fn check(
    shared: &Shared,
    flow: Flow,
    params: Vec<(String, String)>,
) -> Result<AuthRequest, Vec<String>> {
    let mut problems = Vec::new();
    let mut redirect = None;
    for (name, rule) in rules(flow) {
        let Some(value) = single(&params, name, &mut problems) else {
            continue;
        };
        match rule {
            Rule::Equals(expected) if value != *expected => {
                problems.push(format!("{name} is \"{value}\"; it must be \"{expected}\"."));
            }
            Rule::Client if value != shared.opts.client_id => {
                problems.push(format!(
                    "{name} \"{value}\" is not a client this provider knows."
                ));
            }
            Rule::Redirect => match check_redirect(&value) {
                Ok(()) => redirect = Some(value),
                Err(why) => problems.push(format!("{name} \"{value}\" {why}.")),
            },
            _ => {}
        }
    }
    // OAuth 2's state is optional, but not ambiguous.
    let mut states = params.iter().filter(|(n, _)| n == "state").map(|(_, v)| v);
    let state = match (flow, states.next(), states.next()) {
        (Flow::OAuth2, Some(_), Some(_)) => {
            problems.push("The parameter state is given more than once.".to_owned());
            None
        }
        (Flow::OAuth2, state, _) => state.cloned(),
        (Flow::Hybrid, ..) => None,
    };
    match redirect {
        Some(redirect) if problems.is_empty() => Ok(AuthRequest {
            flow,
            params,
            redirect,
            state,
        }),
        _ => Err(problems),
    }
}

/// The one value of parameter `name`; a missing or repeated one (ambiguous,
/// so refused) is a problem.
fn single(params: &[(String, String)], name: &str, problems: &mut Vec<String>) -> Option<String> {
    let mut values = params.iter().filter(|(n, _)| n == name).map(|(_, v)| v);
    match (values.next(), values.next()) {
        (None, _) => {
            problems.push(format!("The parameter {name} is missing."));
            None
        }
        (Some(_), Some(_)) => {
            problems.push(format!("The parameter {name} is given more than once."));
            None
        }
        (Some(v), None) => Some(v.clone()),
    }
}

/// A redirect URI must be an absolute http(s) URL without a fragment, fit to
/// be sent back as it is in a `Location` header.
fn check_redirect(uri: &str) -> Result<(), &'static str> {
    if !uri.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must not contain spaces, control or non-ASCII characters");
    }
    if uri.contains('#') {
        return Err("must not contain a fragment (#)");
    }
    match url::Url::parse(uri) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(()),
        _ => Err("is not an absolute http or https URL"),
    }
}

fn parse_pairs(bytes: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(bytes).into_owned().collect()
}

/// `base` with `pairs` appended to its query (form-urlencoded).
fn append_query(base: &str, pairs: &[(&str, String)]) -> String {
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let separator = match base.find('?') {
        None => "?",
        Some(_) if base.ends_with('?') || base.ends_with('&') => "",
        Some(_) => "&",
    };
    format!("{base}{separator}{query}")
}

/// Escapes text for HTML element content and quoted attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn provider_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Spark => "Spark",
        Kind::Zillow => "Zillow",
        Kind::OAuth2 => "Acme",
    }
}

/// The provider's colour, for the header bar and the main buttons.
fn brand_colour(kind: Kind) -> &'static str {
    match kind {
        Kind::Spark => "#0b5cad",
        Kind::Zillow => "#0041d9",
        Kind::OAuth2 => "#2f6f4f",
    }
}

const STYLE: &str = "\
*{box-sizing:border-box}\
body{margin:0;background:#eef1f5;color:#1c2630;\
font:16px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif}\
header{background:var(--brand);color:#fff;padding:14px 20px;font-size:18px;font-weight:600}\
header small{font-weight:400;opacity:.85;margin-left:6px}\
main{max-width:440px;margin:32px auto;padding:0 16px}\
.card{background:#fff;border-radius:12px;box-shadow:0 1px 4px rgba(16,32,48,.15);padding:24px}\
h1{font-size:22px;line-height:1.3;margin:0 0 12px}\
p{margin:0 0 12px}\
label{display:block;font-weight:600;margin:16px 0 6px}\
input{width:100%;padding:11px 12px;font:inherit;color:inherit;\
border:1px solid #aab5c0;border-radius:8px;background:#fff}\
input:focus{outline:3px solid color-mix(in srgb,var(--brand) 35%,transparent);border-color:var(--brand)}\
button{width:100%;padding:12px 16px;font:inherit;font-weight:600;border-radius:8px;cursor:pointer;\
border:1px solid var(--brand);background:var(--brand);color:#fff;margin-top:24px}\
button.secondary{background:#fff;color:#1c2630;border-color:#aab5c0}\
.buttons{display:flex;gap:12px;margin-top:8px}\
.buttons button{flex:1;margin-top:16px}\
.error{background:#fdecea;color:#8a1c12;border:1px solid #f3bfb9;border-radius:8px;padding:10px 12px}\
.note{color:#56636f;font-size:14px}\
.where{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:14px;\
overflow-wrap:anywhere;background:#f3f5f8;border-radius:6px;padding:8px 10px}\
ul.error{padding:10px 12px 10px 32px;margin:0 0 12px}\
li{margin-bottom:6px;overflow-wrap:anywhere}\
li:last-child{margin-bottom:0}";

/// A whole page: `body` goes inside the card.
fn page(kind: Kind, status: StatusCode, title: &str, body: &str) -> Response<Body> {
    let provider = provider_name(kind);
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} \u{2013} {provider} stand-in</title>\
         <link rel=\"icon\" href=\"data:,\">\
         <style>:root{{--brand:{brand}}}{STYLE}</style></head>\
         <body><header>{provider}<small>stand-in for tests</small></header>\
         <main><div class=\"card\">{body}</div></main></body></html>\n",
        title = escape(title),
        brand = brand_colour(kind),
    );
    let mut resp = Response::new(Body::from(html));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Inline style only: an escaping slip could not run a script.
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert("x-standin", HeaderValue::from_static(kind.name()));
    resp
}

fn hidden_fields(params: &[(String, String)]) -> String {
    params
        .iter()
        .map(|(name, value)| {
            format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                escape(name),
                escape(value)
            )
        })
        .collect()
}

fn login_page(
    kind: Kind,
    page_path: &str,
    request: &AuthRequest,
    username: &str,
    error: Option<&str>,
) -> Response<Body> {
    let provider = provider_name(kind);
    let error = error
        .map(|e| {
            format!(
                "<p id=\"error\" class=\"error\" role=\"alert\">{}</p>",
                escape(e)
            )
        })
        .unwrap_or_default();
    let body = format!(
        "<h1>Sign in to {provider}</h1>\
         <p><strong>{APP_NAME}</strong> wants to access your {provider} account.</p>\
         {error}\
         <form method=\"post\" action=\"{action}\">{hidden}\
         <label for=\"username\">Username</label>\
         <input id=\"username\" name=\"username\" type=\"text\" value=\"{username}\" \
         autocomplete=\"username\" autocapitalize=\"none\" spellcheck=\"false\" autofocus>\
         <label for=\"password\">Password</label>\
         <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\">\
         <button id=\"login\" type=\"submit\">Log in</button>\
         </form>\
         <p class=\"note\" style=\"margin:16px 0 0\">This is a local stand-in: any non-empty \
         username and password sign in.</p>",
        action = escape(&format!("{page_path}/login")),
        hidden = hidden_fields(&request.params),
        username = escape(username),
    );
    page(kind, StatusCode::OK, "Sign in", &body)
}

fn consent_page(
    kind: Kind,
    page_path: &str,
    request: &AuthRequest,
    username: &str,
    ticket: &str,
) -> Response<Body> {
    let provider = provider_name(kind);
    let body = format!(
        "<h1>Allow {APP_NAME} to access your listings?</h1>\
         <p>Signed in to {provider} as <strong id=\"user\">{username}</strong>.</p>\
         <p>{APP_NAME} will be able to read and change your listings and account data \
         until you revoke its access.</p>\
         <p class=\"note\" style=\"margin-bottom:4px\">Afterwards you will be sent to:</p>\
         <p class=\"where\" id=\"redirect\">{redirect}</p>\
         <form method=\"post\" action=\"{action}\">\
         <input type=\"hidden\" name=\"ticket\" value=\"{ticket}\">\
         <div class=\"buttons\">\
         <button id=\"deny\" class=\"secondary\" type=\"submit\" name=\"decision\" value=\"deny\">Deny</button>\
         <button id=\"allow\" type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\
         </div></form>",
        username = escape(username),
        redirect = escape(&request.redirect),
        action = escape(&format!("{page_path}/consent")),
        ticket = escape(ticket),
    );
    page(kind, StatusCode::OK, "Allow access", &body)
}

fn bad_request(kind: Kind, problems: &[String]) -> Response<Body> {
    let items: String = problems
        .iter()
        .map(|p| format!("<li>{}</li>", escape(p)))
        .collect();
    let body = format!(
        "<h1>This authorisation request cannot be accepted</h1>\
         <ul id=\"problems\" class=\"error\">{items}</ul>\
         <p class=\"note\">Go back to the application and start again.</p>"
    );
    page(kind, StatusCode::BAD_REQUEST, "Invalid request", &body)
}

fn method_not_allowed(kind: Kind, allow: &'static str) -> Response<Body> {
    let body = format!("<h1>Method not allowed</h1><p>Use {allow}.</p>");
    let mut resp = page(
        kind,
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed",
        &body,
    );
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

fn redirect(kind: Kind, location: &str) -> Response<Body> {
    // `check_redirect` admits only visible ASCII, and the appended query is
    // form-urlencoded: the value is always a valid header.
    let Ok(value) = HeaderValue::from_str(location) else {
        return bad_request(kind, &["The redirect URI cannot be used.".to_owned()]);
    };
    let body = format!(
        "<h1>Redirecting</h1><p>Continue to <a href=\"{0}\">{0}</a>.</p>",
        escape(location)
    );
    let mut resp = page(kind, StatusCode::FOUND, "Redirecting", &body);
    resp.headers_mut().insert(LOCATION, value);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<a href="x" title='y'>&</a>"#),
            "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;&lt;/a&gt;"
        );
    }

    #[test]
    fn append_query_picks_the_separator() {
        let pairs = [("code", "a b&c".to_owned())];
        assert_eq!(
            append_query("http://h/cb", &pairs),
            "http://h/cb?code=a+b%26c"
        );
        assert_eq!(
            append_query("http://h/cb?", &pairs),
            "http://h/cb?code=a+b%26c"
        );
        assert_eq!(
            append_query("http://h/cb?x=1", &pairs),
            "http://h/cb?x=1&code=a+b%26c"
        );
        assert_eq!(
            append_query("http://h/cb?x=1&", &pairs),
            "http://h/cb?x=1&code=a+b%26c"
        );
    }

    #[test]
    fn redirect_uris_are_checked() {
        assert!(check_redirect("http://127.0.0.1:8081/callback/spark").is_ok());
        assert!(check_redirect("https://example.test/cb?state=1").is_ok());
        assert!(check_redirect("/callback/spark").is_err());
        assert!(check_redirect("javascript:alert(1)").is_err());
        assert!(check_redirect("http://h/cb#frag").is_err());
        assert!(check_redirect("http://h/c b").is_err());
        assert!(check_redirect("ftp://h/cb").is_err());
    }

    #[test]
    fn routes() {
        assert_eq!(
            route(Kind::Spark, "/openid"),
            Some(("/openid", Flow::Hybrid, Step::Start))
        );
        assert_eq!(
            route(Kind::Spark, "/oauth2/consent"),
            Some(("/oauth2", Flow::OAuth2, Step::Consent))
        );
        assert_eq!(
            route(Kind::Zillow, "/oauth/authorize/login"),
            Some(("/oauth/authorize", Flow::OAuth2, Step::Login))
        );
        assert_eq!(route(Kind::Zillow, "/oauth2"), None);
        assert_eq!(route(Kind::Spark, "/openidx"), None);
        assert_eq!(route(Kind::Spark, "/openid/other"), None);
    }
}
