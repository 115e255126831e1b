//! The cost of moving links behind the proxy, per MiB of JSON: a body
//! without links (what most answers are: the price every JSON response
//! pays), one dense with links (OData pages), the JSON-escaped form, and a
//! gzip body decoded, rewritten and re-encoded as it streams.
//!
//! ```text
//! cargo bench --bench links -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use credproxy::proxy::links::{rewrite_whole, Bases, Coding, LinkMap, Origin, Rewriter};

const MIB: usize = 1024 * 1024;

fn map() -> Arc<LinkMap> {
    let origin = |host: &str, target| Origin {
        scheme: "https".into(),
        host: host.into(),
        port: None,
        base_path: String::new(),
        target,
    };
    Arc::new(
        LinkMap::new(
            &[
                origin("sparkapi.com", 0),
                origin("replication.sparkapi.com", 1),
            ],
            vec![None, None],
        )
        .expect("map"),
    )
}

/// A rewriter for one response; the map is built once, at start-up.
fn rewriter(map: &Arc<LinkMap>) -> Rewriter {
    Rewriter::new(
        Arc::clone(map),
        Bases::new(vec![
            "http://127.0.0.1:8080/spark".into(),
            "http://127.0.0.1:8080/spark-replication".into(),
        ]),
    )
}

/// About 1 MiB of RESO-like JSON; `link` is each record's own URL.
fn body(link: impl Fn(usize) -> String) -> Bytes {
    let mut out = String::from("{\"value\":[");
    let mut i = 0;
    while out.len() < MIB {
        out.push_str(&format!(
            "{{\"ListingKey\":\"P{i:06}\",\"@odata.id\":\"{}\",\"City\":\"Fargo\",\"ListPrice\":{},\"MediaURL\":\"https://cdn.example.com/photos/{i}.jpg\",\"PublicRemarks\":\"Three bedrooms, two baths, a garden and a garage.\"}},",
            link(i),
            100_000 + i
        ));
        i += 1;
    }
    out.push_str("{}]}");
    Bytes::from(out)
}

/// Feeds `input` in 16 KiB frames, as an upstream connection delivers it.
fn stream(map: &Arc<LinkMap>, input: &Bytes) -> usize {
    let mut r = rewriter(map);
    let mut out = Vec::new();
    let mut n = 0;
    for at in (0..input.len()).step_by(16 * 1024) {
        r.feed(input.slice(at..(at + 16 * 1024).min(input.len())), &mut out);
        n += out.drain(..).map(|b| b.len()).sum::<usize>();
    }
    r.finish(&mut out);
    n + out.iter().map(Bytes::len).sum::<usize>()
}

fn bench(c: &mut Criterion) {
    let map = map();
    let plain = body(|i| format!("urn:listing:{i}"));
    let linked = body(|i| format!("https://sparkapi.com/Reso/OData/Property('P{i:06}')"));
    let escaped =
        body(|i| format!("https:\\/\\/sparkapi.com\\/Reso\\/OData\\/Property('P{i:06}')"));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&linked).expect("gzip");
    let gzipped = Bytes::from(gz.finish().expect("gzip"));

    let mut g = c.benchmark_group("links_per_mib");
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function("json_without_links", |b| {
        b.iter(|| stream(&map, black_box(&plain)))
    });
    g.bench_function("json_dense_links", |b| {
        b.iter(|| stream(&map, black_box(&linked)))
    });
    g.bench_function("json_escaped_links", |b| {
        b.iter(|| stream(&map, black_box(&escaped)))
    });
    g.bench_function("gzip_decode_rewrite_encode", |b| {
        b.iter(|| {
            let mut r = rewriter(&map);
            rewrite_whole(&mut r, Coding::Gzip, black_box(gzipped.clone())).expect("rewrite")
        })
    });
    g.finish();

    // The price a small JSON answer without links pays on the hot path:
    // one look for "://" before it passes as it came.
    let small = Bytes::from_static(
        br#"{"D":{"Success":true,"Results":[{"Id":"20060412165917817933000000"}]}}"#,
    );
    c.bench_function("links_small_json_check", |b| {
        b.iter(|| map.may_contain_links(black_box(&small)))
    });
    // A small answer with one link, rewritten whole (bases made per response).
    let small_link = Bytes::from_static(br#"{"value":[],"@odata.nextLink":"https://sparkapi.com/Reso/OData/Property?$skiptoken=P10"}"#);
    c.bench_function("links_small_json_one_link", |b| {
        b.iter(|| {
            let mut r = rewriter(&map);
            rewrite_whole(&mut r, Coding::Identity, black_box(small_link.clone())).expect("rewrite")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
