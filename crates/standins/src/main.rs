//! Runs a Spark, a Zillow and a generic OAuth 2 (acme) stand-in for the demo
//! until Ctrl-C.
//!
//! `credproxy-standins [--spark-port N] [--zillow-port N] [--acme-port N]
//! [--replication-port N] [--spark-lifetime SECS] [--budget N/DUR] [--spark-budget N/DUR]
//! [--zillow-budget N/DUR] [--budget-refusal 429|1550] [--no-retry-after]`
//! prints each stand-in's URLs, client credentials and one freshly issued
//! token pair as `export` lines, then one line per API request (and per
//! request refused by the budget) on stderr.
//! The Spark stand-in also serves its API on a replication host
//! (`SPARK_REPLICATION_BASE`), as `replication.sparkapi.com` does, and
//! accepts one key of Spark's API-key authentication
//! (`SPARK_APIAUTH_KEY`, `SPARK_APIAUTH_SECRET`; see `ApiKey::demo`).
//!
//! A budget (`--budget 1500/5m`, Spark's figure for an IDX key) makes a
//! stand-in refuse API requests beyond N in any window of length DUR, as
//! Spark does (see `credproxy_standins::Budget`).

use std::process::ExitCode;
use std::time::Duration;

use credproxy_standins::{ApiKey, Budget, Kind, Options, Refusal, Standin};

const USAGE: &str = concat!(
    "usage: credproxy-standins [--spark-port N] [--zillow-port N] [--acme-port N] ",
    "[--replication-port N] [--spark-lifetime SECS]\n",
    "       [--budget N/DUR] [--spark-budget N/DUR] [--zillow-budget N/DUR] ",
    "[--budget-refusal 429|1550] [--no-retry-after]\n",
    "  defaults: --spark-port 9001 --zillow-port 9002 --acme-port 9004 --replication-port 9003 ",
    "--spark-lifetime 86400, no budget\n",
    "  (port 0 = ephemeral; lifetime 0 = tokens never expire by time;\n",
    "  --replication-port: Spark's replication host, same API and tokens;\n",
    "  --budget N/DUR: each stand-in refuses API requests beyond N in any window of DUR\n",
    "  (DUR: a whole number with ms, s, m or h, e.g. 1500/5m, Spark's budget for an IDX key),\n",
    "  --spark-budget and --zillow-budget set one stand-in's, overriding --budget;\n",
    "  --budget-refusal: 429 (default) or 1550, Spark's 503 with code 1550 (Zillow, acme: always 429);\n",
    "  --no-retry-after: refuse without a Retry-After header)"
);

/// Flags that take a value.
const FLAGS: [&str; 9] = [
    "--spark-port",
    "--zillow-port",
    "--acme-port",
    "--replication-port",
    "--spark-lifetime",
    "--budget",
    "--spark-budget",
    "--zillow-budget",
    "--budget-refusal",
];

#[derive(Debug, PartialEq)]
struct Args {
    spark_port: u16,
    zillow_port: u16,
    acme_port: u16,
    replication_port: u16,
    spark_lifetime: u64,
    /// The Spark stand-in's budget.
    spark_budget: Option<Budget>,
    /// The Zillow stand-in's budget.
    zillow_budget: Option<Budget>,
    /// The acme stand-in's budget (`--budget`).
    acme_budget: Option<Budget>,
}

/// `N/DUR`: N requests (at least 1) per DUR (a whole number followed by `ms`,
/// `s`, `m` or `h`; not zero).
fn parse_rate(value: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("not a budget (N/DUR, e.g. 1500/5m): {value}");
    let (n, per) = value.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    let per = per.trim();
    let split = per.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (amount, unit) = per.split_at(split);
    let amount: u64 = amount.parse().map_err(|_| bad())?;
    let per = match unit {
        "ms" => Duration::from_millis(amount),
        "s" => Duration::from_secs(amount),
        "m" => Duration::from_secs(amount.checked_mul(60).ok_or_else(bad)?),
        "h" => Duration::from_secs(amount.checked_mul(3600).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    if n == 0 || per.is_zero() {
        return Err(format!(
            "a budget needs at least 1 request and a window longer than 0: {value}"
        ));
    }
    Ok((n, per))
}

fn parse_args(argv: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        spark_port: 9001,
        zillow_port: 9002,
        acme_port: 9004,
        replication_port: 9003,
        spark_lifetime: 86400,
        spark_budget: None,
        zillow_budget: None,
        acme_budget: None,
    };
    let mut both = None;
    let mut spark = None;
    let mut zillow = None;
    let mut refusal = Refusal::TooManyRequests;
    let mut retry_after = true;
    let mut it = argv.into_iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        if flag == "--no-retry-after" {
            retry_after = false;
            continue;
        }
        if !FLAGS.contains(&flag.as_str()) {
            return Err(format!("unknown argument: {flag}"));
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |_| format!("{flag}: not a valid number: {value}");
        let rate = |value: &str| parse_rate(value).map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--spark-port" => args.spark_port = value.parse().map_err(bad)?,
            "--zillow-port" => args.zillow_port = value.parse().map_err(bad)?,
            "--acme-port" => args.acme_port = value.parse().map_err(bad)?,
            "--replication-port" => args.replication_port = value.parse().map_err(bad)?,
            "--spark-lifetime" => args.spark_lifetime = value.parse().map_err(bad)?,
            "--budget" => both = Some(rate(&value)?),
            "--spark-budget" => spark = Some(rate(&value)?),
            "--zillow-budget" => zillow = Some(rate(&value)?),
            "--budget-refusal" => {
                refusal = match value.as_str() {
                    "429" => Refusal::TooManyRequests,
                    "1550" | "503" => Refusal::Spark1550,
                    _ => return Err(format!("{flag}: 429 or 1550, not {value}")),
                }
            }
            _ => return Err(format!("unknown argument: {flag}")),
        }
    }
    let budget = |rate: Option<(u32, Duration)>| {
        rate.map(|(requests, per)| Budget {
            requests,
            per,
            refusal,
            retry_after,
        })
    };
    args.spark_budget = budget(spark.or(both));
    args.zillow_budget = budget(zillow.or(both));
    args.acme_budget = budget(both);
    Ok(args)
}

fn print_exports(prefix: &str, standin: &Standin) {
    let opts = standin.options();
    let tokens = standin.issue_tokens();
    println!(
        "# {} stand-in on {}",
        standin.kind().name(),
        standin.base_url()
    );
    println!("export {prefix}_API_BASE={}", standin.base_url());
    if let Some(replication) = standin.replication_url() {
        println!("export {prefix}_REPLICATION_BASE={replication}");
    }
    println!("export {prefix}_TOKEN_URL={}", standin.token_url());
    println!("export {prefix}_AUTHORIZE_URL={}", standin.authorize_url());
    println!("export {prefix}_CLIENT_ID={}", opts.client_id);
    println!("export {prefix}_CLIENT_SECRET={}", opts.client_secret);
    if !opts.api_key.is_empty() {
        println!("export {prefix}_API_KEY={}", opts.api_key);
    }
    println!("export {prefix}_ACCESS_TOKEN={}", tokens.access_token);
    println!("export {prefix}_REFRESH_TOKEN={}", tokens.refresh_token);
    if let Some(expires_in) = tokens.expires_in {
        println!("export {prefix}_EXPIRES_IN={expires_in}");
    }
    for key in &opts.api_keys {
        println!("export {prefix}_APIAUTH_KEY={}", key.key);
        println!("export {prefix}_APIAUTH_SECRET={}", key.secret);
    }
    if let Some(b) = standin.budget() {
        let refused = match (standin.kind(), b.refusal) {
            (Kind::Spark, Refusal::Spark1550) => "503 code 1550",
            (Kind::Spark, Refusal::TooManyRequests) => "429 code 1550",
            (Kind::Zillow | Kind::OAuth2, _) => "429 rate_limited",
        };
        println!(
            "# {} budget: {} requests in any {:?}, beyond it {refused}, {}",
            standin.kind().name(),
            b.requests,
            b.per,
            if b.retry_after {
                "with Retry-After"
            } else {
                "without Retry-After"
            }
        );
    }
}

/// One stderr line per request the budget refuses.
async fn log_refusals(standin: &Standin) {
    let mut seen = 0;
    loop {
        if standin
            .wait_for_refusals(seen + 1, Duration::from_secs(3600))
            .await
        {
            seen = standin.budget_refusals();
            eprintln!(
                "{}: over budget, refused ({seen} so far)",
                standin.kind().name()
            );
        }
    }
}

/// One stderr line per API request (method and path; the query may hold tokens).
async fn log_requests(standin: &Standin) {
    let mut seen = 0;
    loop {
        standin.wait_for_requests(seen + 1).await;
        let requests = standin.requests();
        for r in requests.iter().skip(seen) {
            eprintln!(
                "{} ({}): {} {}",
                standin.kind().name(),
                r.host,
                r.method,
                r.path
            );
        }
        seen = requests.len();
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("{message}");
            }
            eprintln!("{USAGE}");
            return if message.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };

    let mut spark_opts = Options::spark();
    spark_opts.port = args.spark_port;
    spark_opts.replication = true;
    spark_opts.replication_port = args.replication_port;
    spark_opts.api_keys = vec![ApiKey::demo()];
    spark_opts.access_lifetime =
        (args.spark_lifetime > 0).then(|| Duration::from_secs(args.spark_lifetime));
    let mut zillow_opts = Options::zillow();
    zillow_opts.port = args.zillow_port;
    let mut acme_opts = Options::oauth2();
    acme_opts.port = args.acme_port;

    let spark = match Standin::start(spark_opts).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "cannot listen on 127.0.0.1:{} and 127.0.0.1:{}: {e}",
                args.spark_port, args.replication_port
            );
            return ExitCode::FAILURE;
        }
    };
    let zillow = match Standin::start(zillow_opts).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot listen on 127.0.0.1:{}: {e}", args.zillow_port);
            return ExitCode::FAILURE;
        }
    };

    let acme = match Standin::start(acme_opts).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot listen on 127.0.0.1:{}: {e}", args.acme_port);
            return ExitCode::FAILURE;
        }
    };

    spark.set_budget(args.spark_budget);
    zillow.set_budget(args.zillow_budget);
    acme.set_budget(args.acme_budget);
    print_exports("SPARK", &spark);
    print_exports("ZILLOW", &zillow);
    print_exports("ACME", &acme);
    println!("# running until Ctrl-C");

    tokio::select! {
        _ = log_requests(&spark) => {}
        _ = log_requests(&zillow) => {}
        _ = log_requests(&acme) => {}
        _ = log_refusals(&spark) => {}
        _ = log_refusals(&zillow) => {}
        _ = log_refusals(&acme) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    spark.shutdown();
    zillow.shutdown();
    acme.shutdown();
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Args, String> {
        parse_args(argv.iter().map(|s| s.to_string()))
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1500/5m"), Ok((1500, Duration::from_secs(300))));
        assert_eq!(parse_rate("4/3s"), Ok((4, Duration::from_secs(3))));
        assert_eq!(parse_rate("10/250ms"), Ok((10, Duration::from_millis(250))));
        assert_eq!(parse_rate("4000/1h"), Ok((4000, Duration::from_secs(3600))));
        for bad in [
            "",
            "1500",
            "1500/",
            "1500/5",
            "/5m",
            "x/5m",
            "1500/5d",
            "1500/m",
            "0/5m",
            "5/0s",
            "-1/5m",
            "1500/99999999999999999999h",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn budget_flags() {
        let args = parse(&[]).expect("defaults");
        assert_eq!((args.spark_budget, args.zillow_budget), (None, None));

        let args = parse(&["--budget", "1500/5m"]).expect("budget");
        let spark_idx = Some(Budget::spark_idx());
        assert_eq!(
            (args.spark_budget, args.zillow_budget),
            (spark_idx, spark_idx)
        );
        assert_eq!(args.acme_budget, spark_idx, "--budget is every stand-in's");
        let args = parse(&["--acme-port", "0"]).expect("acme port");
        assert_eq!((args.acme_port, args.acme_budget), (0, None));

        let args = parse(&[
            "--no-retry-after",
            "--budget",
            "4/3s",
            "--zillow-budget",
            "2/1s",
            "--budget-refusal",
            "1550",
        ])
        .expect("budgets");
        let b = |requests, secs| Budget {
            requests,
            per: Duration::from_secs(secs),
            refusal: Refusal::Spark1550,
            retry_after: false,
        };
        assert_eq!(args.spark_budget, Some(b(4, 3)));
        assert_eq!(args.zillow_budget, Some(b(2, 1)));

        let args = parse(&["--spark-budget", "1/1m"]).expect("spark only");
        assert_eq!(args.zillow_budget, None);
        assert!(args.spark_budget.is_some());

        assert!(parse(&["--budget-refusal", "500"]).is_err());
        assert!(parse(&["--budget"]).is_err());
        assert!(parse(&["--no-retry-after", "x"]).is_err());
    }
}
