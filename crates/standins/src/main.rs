//! Runs a Spark and a Zillow stand-in for the demo until Ctrl-C.
//!
//! `credproxy-standins [--spark-port N] [--zillow-port N] [--replication-port N] [--spark-lifetime SECS]`
//! prints each stand-in's URLs, client credentials and one freshly issued
//! token pair as `export` lines, then one line per API request on stderr.
//! The Spark stand-in also serves its API on a replication host
//! (`SPARK_REPLICATION_BASE`), as `replication.sparkapi.com` does.

use std::process::ExitCode;
use std::time::Duration;

use credproxy_standins::{Options, Standin};

const USAGE: &str = concat!(
    "usage: credproxy-standins [--spark-port N] [--zillow-port N] [--replication-port N] ",
    "[--spark-lifetime SECS]\n",
    "  defaults: --spark-port 9001 --zillow-port 9002 --replication-port 9003 ",
    "--spark-lifetime 86400\n",
    "  (port 0 = ephemeral; lifetime 0 = tokens never expire by time;\n",
    "  --replication-port: Spark's replication host, same API and tokens)"
);

const FLAGS: [&str; 4] = [
    "--spark-port",
    "--zillow-port",
    "--replication-port",
    "--spark-lifetime",
];

struct Args {
    spark_port: u16,
    zillow_port: u16,
    replication_port: u16,
    spark_lifetime: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        spark_port: 9001,
        zillow_port: 9002,
        replication_port: 9003,
        spark_lifetime: 86400,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        if !FLAGS.contains(&flag.as_str()) {
            return Err(format!("unknown argument: {flag}"));
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |_| format!("{flag}: not a valid number: {value}");
        match flag.as_str() {
            "--spark-port" => args.spark_port = value.parse().map_err(bad)?,
            "--zillow-port" => args.zillow_port = value.parse().map_err(bad)?,
            "--replication-port" => args.replication_port = value.parse().map_err(bad)?,
            "--spark-lifetime" => args.spark_lifetime = value.parse().map_err(bad)?,
            _ => return Err(format!("unknown argument: {flag}")),
        }
    }
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
    let args = match parse_args() {
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
    spark_opts.access_lifetime =
        (args.spark_lifetime > 0).then(|| Duration::from_secs(args.spark_lifetime));
    let mut zillow_opts = Options::zillow();
    zillow_opts.port = args.zillow_port;

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

    print_exports("SPARK", &spark);
    print_exports("ZILLOW", &zillow);
    println!("# running until Ctrl-C");

    tokio::select! {
        _ = log_requests(&spark) => {}
        _ = log_requests(&zillow) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    spark.shutdown();
    zillow.shutdown();
    ExitCode::SUCCESS
}
