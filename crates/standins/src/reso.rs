//! Spark's RESO Web API (OData 4): the service document, `$metadata` and
//! the `Property`, `Member` and `Office` collections, with synthetic records,
//! `$top` and `$skiptoken` paging and absolute `@odata.nextLink`s.

use axum::body::Body;
use base64::Engine;
use hyper::header::{HeaderName, HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::encoding::json_as;
use crate::{Recorded, Shared, HOST_REPLICATION};

const JSON: &str = "application/json; charset=utf-8";
/// `$top` when the request has none.
const DEFAULT_TOP: u64 = 10;
/// The largest page, as Spark allows.
const MAX_TOP: u64 = 1000;

/// Where a RESO path points, relative to its prefix.
pub(crate) struct ResoPath<'a> {
    /// The path up to and including the `OData` segment, as received.
    prefix: &'a str,
    /// The rest, without its leading `/` (may be empty).
    rest: &'a str,
}

/// The RESO prefix of `path`: the first `Reso` segment (any case) followed by
/// an `OData` segment.
pub(crate) fn split(path: &str) -> Option<ResoPath<'_>> {
    let mut offset = 0;
    let mut previous_reso = false;
    for segment in path.split('/') {
        let end = offset + segment.len();
        if previous_reso && segment.eq_ignore_ascii_case("odata") {
            let rest = path[end..].strip_prefix('/').unwrap_or("");
            return Some(ResoPath {
                prefix: &path[..end],
                rest,
            });
        }
        previous_reso = segment.eq_ignore_ascii_case("reso");
        offset = end + 1;
    }
    None
}

/// The entity sets with records: name, key field, key letter.
const SETS: [(&str, &str, char); 3] = [
    ("Property", "ListingKey", 'P'),
    ("Member", "MemberKey", 'M'),
    ("Office", "OfficeKey", 'O'),
];

/// What the listener that got the request knows about origins.
pub(crate) struct Origins<'a> {
    /// This listener's origin.
    pub(crate) own: &'a str,
    /// The API host's origin.
    pub(crate) api: &'a str,
    /// This listener is [`HOST_REPLICATION`].
    pub(crate) replication: bool,
}

impl<'a> Origins<'a> {
    pub(crate) fn new(shared: &'a Shared, rec: &Recorded, own: &'a str) -> Origins<'a> {
        Origins {
            own,
            api: &shared.api_origin,
            replication: rec.host == HOST_REPLICATION,
        }
    }
}

/// Answers an authorised request to a RESO path.
pub(crate) fn serve(
    shared: &Shared,
    rec: &Recorded,
    method_override: Option<&str>,
    origins: &Origins<'_>,
    path: ResoPath<'_>,
) -> Response<Body> {
    let escape = shared.opts.json_escape_slashes;
    let readable = rec.method == Method::GET.as_str()
        || rec.method == Method::HEAD.as_str()
        || (rec.method == Method::POST.as_str()
            && method_override.is_some_and(|m| m.trim().eq_ignore_ascii_case("GET")));
    if !readable {
        let mut resp = odata_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "the RESO Web API here is read-only",
            escape,
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let base = format!("{}{}", origins.own, path.prefix);
    let mut resp = match path.rest {
        "" => service_document(&base, escape),
        "$metadata" => metadata(&base),
        rest if rest.contains('/') => {
            odata_error(StatusCode::NOT_FOUND, "no such resource", escape)
        }
        rest => {
            let segment = percent_decode(rest);
            match segment.split_once('(') {
                Some((name, key)) => match key.strip_suffix(')') {
                    Some(key) => single(shared, origins, path.prefix, name, key),
                    None => odata_error(StatusCode::NOT_FOUND, "no such resource", escape),
                },
                None => collection(shared, rec, origins, path.prefix, &segment),
            }
        }
    };
    resp.headers_mut().insert(
        HeaderName::from_static("odata-version"),
        HeaderValue::from_static("4.0"),
    );
    resp
}

fn service_document(base: &str, escape: bool) -> Response<Body> {
    let sets: Vec<Value> = SETS
        .iter()
        .map(|(name, _, _)| json!({"name": name, "kind": "EntitySet", "url": name}))
        .collect();
    json_as(
        StatusCode::OK,
        &json!({"@odata.context": format!("{base}/$metadata"), "value": sets}),
        escape,
        JSON,
    )
}

/// An OData error: `{"error": {"code", "message"}}`.
pub(crate) fn odata_error(status: StatusCode, message: &str, escape: bool) -> Response<Body> {
    json_as(
        status,
        &json!({"error": {"code": status.as_u16().to_string(), "message": message}}),
        escape,
        JSON,
    )
}

/// Record `n` (1-based) of entity set `set`.
fn record(set: usize, n: usize, origins: &Origins<'_>, prefix: &str) -> Value {
    let (name, key_field, letter) = SETS[set];
    let key = format!("{letter}{n:06}");
    let id = |origin: &str| format!("{origin}{prefix}/{name}('{key}')");
    let mut r = Map::new();
    r.insert("@odata.id".into(), id(origins.own).into());
    r.insert(key_field.into(), key.clone().into());
    let timestamp = format!("2024-01-01T00:{:02}:{:02}Z", (n / 60) % 60, n % 60);
    match name {
        "Property" => {
            r.insert("ListingId".into(), format!("{}", 100_000 + n).into());
            r.insert("StandardStatus".into(), "Active".into());
            r.insert("ListPrice".into(), (200_000 + 1_000 * n).into());
            r.insert("UnparsedAddress".into(), format!("{n} Main St").into());
            r.insert("City".into(), "Fargo".into());
            r.insert(
                "PublicRemarks".into(),
                "Bright \"corner\" unit; café & park nearby.".into(),
            );
            r.insert(
                "MediaURL".into(),
                format!("https://cdn.example.com/photos/{key}.jpg").into(),
            );
        }
        "Member" => {
            r.insert("MemberMlsId".into(), format!("{}", 500 + n).into());
            r.insert("MemberFirstName".into(), "Pat".into());
            r.insert("MemberLastName".into(), format!("Agent{n}").into());
            r.insert("MemberEmail".into(), format!("agent{n}@example.com").into());
            r.insert(
                "OfficeKey".into(),
                format!("O{:06}", (n - 1) % 5 + 1).into(),
            );
            r.insert(
                "MemberPhotoURL".into(),
                format!("https://cdn.example.com/members/{key}.jpg").into(),
            );
        }
        _ => {
            r.insert("OfficeName".into(), format!("Office {n} Realty").into());
            r.insert(
                "OfficePhone".into(),
                format!("701-555-{:04}", n % 10_000).into(),
            );
            r.insert(
                "OfficeLogoURL".into(),
                format!("https://cdn.example.com/offices/{key}.png").into(),
            );
        }
    }
    r.insert("ModificationTimestamp".into(), timestamp.into());
    if origins.replication {
        r.insert("ApiHostURL".into(), id(origins.api).into());
    }
    Value::Object(r)
}

/// `$skiptoken` for the page that starts at record index `offset`.
fn skiptoken(offset: u64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("o{offset}"))
}

fn parse_skiptoken(token: &str) -> Option<u64> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    std::str::from_utf8(&bytes)
        .ok()?
        .strip_prefix('o')?
        .parse()
        .ok()
}

fn collection(
    shared: &Shared,
    rec: &Recorded,
    origins: &Origins<'_>,
    prefix: &str,
    name: &str,
) -> Response<Body> {
    let escape = shared.opts.json_escape_slashes;
    let query = rec.query.as_deref().unwrap_or("");
    let mut top = DEFAULT_TOP;
    let mut offset = 0u64;
    let mut count = false;
    // The parameters the next link carries over as they came.
    let mut kept = Vec::new();
    for raw in query.split('&').filter(|p| !p.is_empty()) {
        let Some((name, value)) = form_urlencoded::parse(raw.as_bytes()).next() else {
            continue;
        };
        match name.as_ref() {
            "$top" => match value.parse::<u64>() {
                Ok(n) => top = n.min(MAX_TOP),
                Err(_) => {
                    return odata_error(
                        StatusCode::BAD_REQUEST,
                        "$top must be a non-negative integer",
                        escape,
                    )
                }
            },
            "$skiptoken" => match parse_skiptoken(&value) {
                Some(n) => offset = n,
                None => return odata_error(StatusCode::BAD_REQUEST, "invalid $skiptoken", escape),
            },
            "$count" => count = value.eq_ignore_ascii_case("true"),
            _ => kept.push(raw),
        }
    }
    let set = SETS.iter().position(|(n, _, _)| *n == name);
    let total = if set.is_some() {
        shared.opts.reso_records as u64
    } else {
        0
    };
    let end = offset.saturating_add(top).min(total);
    let value: Vec<Value> = match set {
        Some(set) => (offset..end)
            .map(|i| record(set, i as usize + 1, origins, prefix))
            .collect(),
        None => Vec::new(),
    };
    let mut body = Map::new();
    body.insert(
        "@odata.context".into(),
        format!("{}{prefix}/$metadata#{name}", origins.own).into(),
    );
    if count {
        body.insert("@odata.count".into(), total.into());
    }
    body.insert("value".into(), value.into());
    if top > 0 && end < total {
        let mut link = format!(
            "{}{}?$top={top}&$skiptoken={}",
            origins.own,
            rec.path,
            skiptoken(end)
        );
        for raw in kept {
            link.push('&');
            link.push_str(raw);
        }
        body.insert("@odata.nextLink".into(), link.into());
    }
    json_as(StatusCode::OK, &Value::Object(body), escape, JSON)
}

fn single(
    shared: &Shared,
    origins: &Origins<'_>,
    prefix: &str,
    name: &str,
    key: &str,
) -> Response<Body> {
    let escape = shared.opts.json_escape_slashes;
    let key = key
        .strip_prefix('\'')
        .and_then(|k| k.strip_suffix('\''))
        .unwrap_or(key);
    let found = SETS
        .iter()
        .position(|(n, _, _)| *n == name)
        .and_then(|set| {
            let letter = SETS[set].2;
            let n: usize = key.strip_prefix(letter)?.parse().ok()?;
            let canonical = format!("{letter}{n:06}") == key;
            (canonical && n >= 1 && n <= shared.opts.reso_records).then_some((set, n))
        });
    let Some((set, n)) = found else {
        return odata_error(StatusCode::NOT_FOUND, "no such record", escape);
    };
    let mut r = record(set, n, origins, prefix);
    if let Value::Object(map) = &mut r {
        map.insert(
            "@odata.context".into(),
            format!("{}{prefix}/$metadata#{name}/$entity", origins.own).into(),
        );
    }
    json_as(StatusCode::OK, &r, escape, JSON)
}

/// `%XX` decoded (invalid escapes and non-UTF-8 kept as they are, lossily).
fn percent_decode(s: &str) -> String {
    String::from_utf8_lossy(&percent_encoding::percent_decode_str(s).collect::<Vec<u8>>())
        .into_owned()
}

/// `s` escaped for an XML attribute in double quotes.
fn xml_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The EDMX document: `xml:base` and a `Core.Links` link on this origin, the
/// Core vocabulary on another one.
fn metadata(base: &str) -> Response<Body> {
    let base = xml_attr(base);
    let mut types = String::new();
    let fields: [&[&str]; 3] = [
        &[
            "ListingKey",
            "ListingId",
            "StandardStatus",
            "ListPrice",
            "UnparsedAddress",
            "City",
            "PublicRemarks",
            "MediaURL",
            "ModificationTimestamp",
        ],
        &[
            "MemberKey",
            "MemberMlsId",
            "MemberFirstName",
            "MemberLastName",
            "MemberEmail",
            "OfficeKey",
            "MemberPhotoURL",
            "ModificationTimestamp",
        ],
        &[
            "OfficeKey",
            "OfficeName",
            "OfficePhone",
            "OfficeLogoURL",
            "ModificationTimestamp",
        ],
    ];
    for ((name, key, _), fields) in SETS.iter().zip(fields) {
        types.push_str(&format!(
            "      <EntityType Name=\"{name}\">\n        <Key><PropertyRef Name=\"{key}\"/></Key>\n"
        ));
        for field in fields {
            let ty = match *field {
                "ListPrice" => "Edm.Decimal",
                "ModificationTimestamp" => "Edm.DateTimeOffset",
                _ => "Edm.String",
            };
            types.push_str(&format!(
                "        <Property Name=\"{field}\" Type=\"{ty}\"/>\n"
            ));
        }
        types.push_str("      </EntityType>\n");
    }
    let sets: String = SETS
        .iter()
        .map(|(name, _, _)| {
            format!(
                "        <EntitySet Name=\"{name}\" EntityType=\"org.reso.metadata.{name}\"/>\n"
            )
        })
        .collect();
    let doc = format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<edmx:Edmx xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx" Version="4.0" xml:base="{base}/">
  <edmx:Reference Uri="https://oasis-tcs.github.io/odata-vocabularies/vocabularies/Org.OData.Core.V1.xml">
    <edmx:Include Namespace="Org.OData.Core.V1" Alias="Core"/>
  </edmx:Reference>
  <edmx:DataServices>
    <Schema xmlns="http://docs.oasis-open.org/odata/ns/edm" Namespace="org.reso.metadata">
{types}      <EntityContainer Name="RESO">
{sets}        <Annotation Term="Core.Links">
          <Collection>
            <Record>
              <PropertyValue Property="rel" String="describedby"/>
              <PropertyValue Property="href" String="{base}/$metadata"/>
            </Record>
          </Collection>
        </Annotation>
      </EntityContainer>
    </Schema>
  </edmx:DataServices>
</edmx:Edmx>
"#
    );
    let mut resp = Response::new(Body::from(doc));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/xml; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let p = split("/Reso/OData/Property").expect("reso");
        assert_eq!((p.prefix, p.rest), ("/Reso/OData", "Property"));
        let p = split("/Version/3/reso/odata/$metadata").expect("reso");
        assert_eq!((p.prefix, p.rest), ("/Version/3/reso/odata", "$metadata"));
        let p = split("/Reso/OData").expect("reso");
        assert_eq!((p.prefix, p.rest), ("/Reso/OData", ""));
        let p = split("/Reso/OData/").expect("reso");
        assert_eq!((p.prefix, p.rest), ("/Reso/OData", ""));
        assert!(split("/Reso").is_none());
        assert!(split("/ResoOData/x").is_none());
        assert!(split("/OData/Reso").is_none());
        assert!(split("/v1/Reso/x/OData").is_none());
    }

    #[test]
    fn skiptokens_round_trip() {
        for n in [0, 10, 12345] {
            assert_eq!(parse_skiptoken(&skiptoken(n)), Some(n));
        }
        assert_eq!(parse_skiptoken("nope!"), None);
        assert_eq!(parse_skiptoken(""), None);
    }
}
