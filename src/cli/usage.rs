//! `usage`: usage per subject, from Redis or from a gateway's admin API.

use std::process::ExitCode;

use super::UsageSource;

pub(super) fn usage(
    source: UsageSource,
    from: Option<String>,
    to: Option<String>,
    subject: Option<String>,
) -> ExitCode {
    use crate::usage::{self, Query};
    let result = (|| -> Result<serde_json::Value, String> {
        let query = Query::parse(from.as_deref(), to.as_deref(), subject.as_deref())?;
        match (source.redis, source.admin) {
            (Some(url), _) => Ok(usage::to_json(
                &query,
                &usage::shared_blocking(&url, &query)?,
            )),
            (None, Some(admin)) => {
                let key = std::env::var("GATEWARDEN_ADMIN_KEY")
                    .map_err(|_| "set GATEWARDEN_ADMIN_KEY to the admin key".to_string())?;
                let mut path = format!("/admin/usage?from={}&to={}", query.from, query.to);
                if let Some(s) = &query.subject {
                    path.push_str("&subject=");
                    path.push_str(&gatewarden_plugins::forms::encode_query(s));
                }
                admin_get(&admin, &path, &key)
            }
            (None, None) => Err("give --redis or --admin".into()),
        }
    })();
    match result {
        Ok(answer) => {
            print_usage(&answer);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `GET path` on a gateway's plain-HTTP admin listener, with the admin key.
fn admin_get(base: &str, path: &str, key: &str) -> Result<serde_json::Value, String> {
    use std::io::{Read, Write};
    let authority = base
        .strip_prefix("http://")
        .ok_or("--admin takes an http:// URL of the admin listener")?
        .trim_end_matches('/');
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))?;
    let timeout = std::time::Duration::from_secs(10);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("{authority}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{authority}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("{authority}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the admin listener sent no complete answer")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    let body: serde_json::Value =
        serde_json::from_str(body).map_err(|_| format!("the admin listener answered {status}"))?;
    if status != "200" {
        let reason = body["error"].as_str().unwrap_or("no reason given");
        return Err(format!("the admin listener answered {status}: {reason}"));
    }
    Ok(body)
}

/// The usage as a table, one row per day, route, subject and key, then the totals.
fn print_usage(answer: &serde_json::Value) {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    println!(
        "{:<10} {:<14} {:<20} {:<11} {:>8} {:>6} {:>6} {:>6} {:>6} {:>10} {:>11} {:>9} {:>10} {:>9}",
        "DAY", "ROUTE", "SUBJECT", "KEY", "REQUESTS", "2XX", "3XX", "4XX", "5XX", "BYTES IN",
        "BYTES OUT", "PROMPT", "COMPLETION", "TOKENS"
    );
    let rows = answer["rows"].as_array().cloned().unwrap_or_default();
    let totals = {
        let mut t = answer["totals"].clone();
        t["day"] = "total".into();
        t
    };
    for row in rows.iter().chain(std::iter::once(&totals)) {
        let text = |k: &str| row[k].as_str().unwrap_or("").to_string();
        println!(
            "{:<10} {:<14} {:<20} {:<11} {:>8} {:>6} {:>6} {:>6} {:>6} {:>10} {:>11} {:>9} {:>10} {:>9}",
            text("day"),
            text("route"),
            text("subject"),
            text("key_id"),
            n(&row["requests"]),
            n(&row["responses"]["2xx"]),
            n(&row["responses"]["3xx"]),
            n(&row["responses"]["4xx"]),
            n(&row["responses"]["5xx"]),
            n(&row["bytes_in"]),
            n(&row["bytes_out"]),
            n(&row["tokens"]["prompt"]),
            n(&row["tokens"]["completion"]),
            n(&row["tokens"]["total"]),
        );
    }
}
