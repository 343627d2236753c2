//! Usage accounting: per UTC day, route, subject and API key, how many requests, their
//! responses by status class, the bytes both ways and, on routes that read them, the
//! LLM tokens each response reported.
//!
//! Every gateway counts in memory. Without `redis:` that is the record (kept across
//! reloads, not restarts). With it, the counts also go to Redis once a second, into one
//! hash per day, `gw:usage:<YYYY-MM-DD>`, each field `route␟subject␟key␟measure`
//! incremented by `HINCRBY`, so every replica adds to the same totals; days expire
//! after [`KEEP_DAYS`]. None of this reaches Prometheus: subjects and keys would make
//! its label sets unbounded.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use chrono::NaiveDate;
use gatewarden_plugins::redis_store::{self, RedisHandle};

/// What is counted, in the order of [`Counts`]'s array.
pub const MEASURES: [&str; 10] = [
    "requests",
    "status_2xx",
    "status_3xx",
    "status_4xx",
    "status_5xx",
    "bytes_in",
    "bytes_out",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
];

/// How long a day of shared usage is kept in Redis.
pub const KEEP_DAYS: u64 = 400;
/// Most days one query may span.
pub const MAX_QUERY_DAYS: i64 = 366;
/// Separates the parts of a field name in Redis: a character no route, subject or key
/// id in a config or keys file contains.
const SEP: char = '\u{1f}';

/// Whose usage, where, when.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Row {
    pub day: NaiveDate,
    pub route: Arc<str>,
    /// `-` for requests without an identity.
    pub subject: Arc<str>,
    /// The API key's id, `-` when the caller used no key from a key store.
    pub key: Arc<str>,
}

/// The counts of one row, by [`MEASURES`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts(pub [u64; MEASURES.len()]);

impl Counts {
    fn add(&mut self, other: &Counts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
    }

    /// The counts of one request.
    pub fn of_request(
        status: u16,
        bytes_in: u64,
        bytes_out: u64,
        tokens: Option<gatewarden_plugins::TokenUsage>,
    ) -> Counts {
        let mut c = [0; MEASURES.len()];
        c[0] = 1;
        if let Some(slot) = match status {
            200..=299 => Some(1),
            300..=399 => Some(2),
            400..=499 => Some(3),
            500..=599 => Some(4),
            _ => None,
        } {
            c[slot] = 1;
        }
        c[5] = bytes_in;
        c[6] = bytes_out;
        if let Some(t) = tokens {
            c[7] = t.prompt;
            c[8] = t.completion;
            c[9] = t.total;
        }
        Counts(c)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let m = &self.0;
        serde_json::json!({
            "requests": m[0],
            "responses": { "2xx": m[1], "3xx": m[2], "4xx": m[3], "5xx": m[4] },
            "bytes_in": m[5],
            "bytes_out": m[6],
            "tokens": { "prompt": m[7], "completion": m[8], "total": m[9] },
        })
    }
}

#[derive(Default)]
struct Books {
    /// Everything this process counted (the record without Redis).
    local: HashMap<Row, Counts>,
    /// Counted since the last write to Redis.
    unsent: HashMap<Row, Counts>,
}

static BOOKS: LazyLock<Mutex<Books>> = LazyLock::new(Mutex::default);

fn books() -> std::sync::MutexGuard<'static, Books> {
    BOOKS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts one request; `shared` when its counts are to go to Redis too.
pub fn record(row: Row, counts: Counts, shared: bool) {
    let mut books = books();
    if shared {
        books.unsent.entry(row.clone()).or_default().add(&counts);
    }
    books.local.entry(row).or_default().add(&counts);
}

/// Today, in UTC.
pub fn today() -> NaiveDate {
    chrono::Utc::now().date_naive()
}

fn day_key(day: NaiveDate) -> String {
    format!("gw:usage:{day}")
}

/// Sends what was counted since the last call to Redis. On failure the counts are kept
/// for the next call: none is lost, none is sent twice.
pub async fn flush(redis: &RedisHandle) {
    let unsent = std::mem::take(&mut books().unsent);
    if unsent.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    let mut days = std::collections::BTreeSet::new();
    for (row, counts) in &unsent {
        days.insert(row.day);
        for (measure, n) in MEASURES.iter().zip(counts.0) {
            if n > 0 {
                let field = format!(
                    "{}{SEP}{}{SEP}{}{SEP}{measure}",
                    row.route, row.subject, row.key
                );
                pipe.hincr(day_key(row.day), field, n).ignore();
            }
        }
    }
    for day in days {
        pipe.expire(day_key(day), (KEEP_DAYS * 86_400) as i64)
            .ignore();
    }
    if let Err(e) = redis.pipeline::<()>(&pipe).await {
        redis_store::report_error("usage accounting", &e);
        let mut books = books();
        for (row, counts) in unsent {
            books.unsent.entry(row).or_default().add(&counts);
        }
    }
}

/// Which usage to show.
#[derive(Debug, Clone)]
pub struct Query {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub subject: Option<String>,
}

impl Query {
    /// Reads `from`, `to` (`YYYY-MM-DD`, default today) and `subject`.
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        subject: Option<&str>,
    ) -> Result<Query, String> {
        let day = |name: &str, text: Option<&str>| match text {
            None => Ok(today()),
            Some(t) => NaiveDate::parse_from_str(t, "%Y-%m-%d")
                .map_err(|_| format!("{name} must be a day as YYYY-MM-DD, not {t:?}")),
        };
        let (from, to) = (day("from", from)?, day("to", to)?);
        if to < from {
            return Err("`to` is before `from`".into());
        }
        if (to - from).num_days() >= MAX_QUERY_DAYS {
            return Err(format!("ask for at most {MAX_QUERY_DAYS} days at once"));
        }
        Ok(Query {
            from,
            to,
            subject: subject.filter(|s| !s.is_empty()).map(str::to_string),
        })
    }

    fn days(&self) -> impl Iterator<Item = NaiveDate> + '_ {
        self.from.iter_days().take_while(|d| *d <= self.to)
    }

    fn wants(&self, row: &Row) -> bool {
        row.day >= self.from
            && row.day <= self.to
            && self.subject.as_deref().is_none_or(|s| *row.subject == *s)
    }
}

/// The usage this process counted.
pub fn local(query: &Query) -> BTreeMap<Row, Counts> {
    books()
        .local
        .iter()
        .filter(|(row, _)| query.wants(row))
        .map(|(row, counts)| (row.clone(), *counts))
        .collect()
}

/// The shared usage in Redis, after sending this process's own.
pub async fn shared(redis: &RedisHandle, query: &Query) -> Result<BTreeMap<Row, Counts>, String> {
    flush(redis).await;
    let mut rows = BTreeMap::new();
    for day in query.days() {
        let fields: HashMap<String, u64> =
            redis.query(redis::cmd("HGETALL").arg(day_key(day))).await?;
        add_day(&mut rows, day, fields, query);
    }
    Ok(rows)
}

/// The shared usage read with a connection of its own (the command line).
pub fn shared_blocking(url: &str, query: &Query) -> Result<BTreeMap<Row, Counts>, String> {
    let client =
        redis::Client::open(url).map_err(|e| format!("invalid redis url ({:?})", e.kind()))?;
    let mut con = redis_store::blocking_connection(&client, Duration::from_secs(2))
        .map_err(|e| format!("redis: {e}"))?;
    let mut rows = BTreeMap::new();
    for day in query.days() {
        let fields: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(day_key(day))
            .query(&mut con)
            .map_err(|e| format!("redis: {e}"))?;
        add_day(&mut rows, day, fields, query);
    }
    Ok(rows)
}

/// Adds a day's hash (`route␟subject␟key␟measure` → n) to `rows`.
fn add_day(
    rows: &mut BTreeMap<Row, Counts>,
    day: NaiveDate,
    fields: HashMap<String, u64>,
    query: &Query,
) {
    for (field, n) in fields {
        let mut parts = field.split(SEP);
        let (Some(route), Some(subject), Some(key), Some(measure), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            continue;
        };
        let Some(slot) = MEASURES.iter().position(|m| *m == measure) else {
            continue;
        };
        let row = Row {
            day,
            route: Arc::from(route),
            subject: Arc::from(subject),
            key: Arc::from(key),
        };
        if query.wants(&row) {
            let counts = rows.entry(row).or_default();
            counts.0[slot] = counts.0[slot].saturating_add(n);
        }
    }
}

/// The answer of `GET /admin/usage`.
pub fn to_json(query: &Query, rows: &BTreeMap<Row, Counts>) -> serde_json::Value {
    let mut totals = Counts::default();
    let list: Vec<serde_json::Value> = rows
        .iter()
        .map(|(row, counts)| {
            totals.add(counts);
            let mut v = counts.to_json();
            v["day"] = row.day.to_string().into();
            v["route"] = (*row.route).into();
            v["subject"] = (*row.subject).into();
            v["key_id"] = (*row.key).into();
            v
        })
        .collect();
    serde_json::json!({
        "from": query.from.to_string(),
        "to": query.to.to_string(),
        "subject": query.subject,
        "rows": list,
        "totals": totals.to_json(),
    })
}

/// Forgets what this process counted before [`KEEP_DAYS`] ago.
fn forget_old_days() {
    let oldest = today() - chrono::Days::new(KEEP_DAYS);
    books().local.retain(|row, _| row.day >= oldest);
}

/// Keeps sending the counts to Redis, once a second, while the server runs, and
/// forgets old days once an hour.
pub struct UsageFlusher {
    pub state: Arc<crate::reload::State>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for UsageFlusher {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut last_cleanup = std::time::Instant::now();
        loop {
            if last_cleanup.elapsed() >= Duration::from_secs(3600) {
                last_cleanup = std::time::Instant::now();
                forget_old_days();
            }
            let stopping = tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                _ = shutdown.changed() => true,
            };
            if let Some(redis) = self.state.current().redis.clone() {
                flush(&redis).await;
            }
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_counts_once_by_its_status_class_and_tokens() {
        let tokens = gatewarden_plugins::TokenUsage {
            prompt: 5,
            completion: 7,
            total: 12,
        };
        let c = Counts::of_request(201, 10, 20, Some(tokens));
        assert_eq!(c.0, [1, 1, 0, 0, 0, 10, 20, 5, 7, 12]);
        assert_eq!(Counts::of_request(502, 0, 0, None).0[4], 1);
        assert_eq!(Counts::of_request(0, 0, 0, None).0[1..5], [0, 0, 0, 0]);
    }

    #[test]
    fn queries_read_days_and_refuse_backwards_or_huge_ranges() {
        let q = Query::parse(Some("2026-01-30"), Some("2026-02-02"), Some("alice")).unwrap();
        assert_eq!(q.days().count(), 4);
        assert!(Query::parse(Some("2026-02-02"), Some("2026-01-30"), None).is_err());
        assert!(Query::parse(Some("2020-01-01"), Some("2026-01-01"), None).is_err());
        assert!(Query::parse(Some("yesterday"), None, None).is_err());
    }

    #[test]
    fn a_days_hash_reads_back_into_rows() {
        let day = NaiveDate::from_ymd_opt(2026, 12, 5).unwrap();
        let q = Query::parse(Some("2026-12-05"), Some("2026-12-05"), Some("alice")).unwrap();
        let mut fields = HashMap::new();
        fields.insert(format!("llm{SEP}alice{SEP}k_1{SEP}requests"), 3);
        fields.insert(format!("llm{SEP}alice{SEP}k_1{SEP}total_tokens"), 40);
        fields.insert(format!("llm{SEP}bob{SEP}-{SEP}requests"), 9);
        fields.insert("garbage".to_string(), 1);
        let mut rows = BTreeMap::new();
        add_day(&mut rows, day, fields, &q);
        assert_eq!(rows.len(), 1);
        let counts = rows.values().next().unwrap();
        assert_eq!((counts.0[0], counts.0[9]), (3, 40));
    }
}
