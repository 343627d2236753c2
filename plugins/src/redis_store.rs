//! The shared Redis (or Valkey) connection handed to plugins that keep state across
//! replicas. A few multiplexed connections, each reconnecting by itself, opened on
//! first use; every command has a short timeout so a slow Redis cannot stall requests.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

/// Connections kept open; each one multiplexes many requests.
const POOL_SIZE: usize = 4;

static ERRORS: AtomicU64 = AtomicU64::new(0);
static ERROR_LOG: LogLimit = LogLimit::every(10);

/// Lets a warning through at most once per period, however many threads report.
pub(crate) struct LogLimit {
    last: AtomicU64,
    period_secs: u64,
}

impl LogLimit {
    pub(crate) const fn every(period_secs: u64) -> Self {
        LogLimit {
            last: AtomicU64::new(0),
            period_secs,
        }
    }

    /// True for the first caller of each period.
    pub(crate) fn allow(&self) -> bool {
        let now = crate::session::now_secs();
        let last = self.last.load(Ordering::Relaxed);
        now >= last + self.period_secs
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Redis errors since start, for `gatewarden_redis_errors_total`.
pub fn error_count() -> u64 {
    ERRORS.load(Ordering::Relaxed)
}

/// Counts an error and logs it, at most once every 10 seconds.
pub fn report_error(what: &str, error: &dyn std::fmt::Display) {
    ERRORS.fetch_add(1, Ordering::Relaxed);
    if ERROR_LOG.allow() {
        log::warn!(
            "redis: {what}: {error} (further errors counted in gatewarden_redis_errors_total)"
        );
    }
}

/// A handle on the configured Redis.
pub struct RedisHandle {
    client: redis::Client,
    pool: Vec<OnceCell<ConnectionManager>>,
    next: AtomicUsize,
    timeout: Duration,
}

impl std::fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("RedisHandle").finish_non_exhaustive()
    }
}

impl RedisHandle {
    /// Parses the URL; nothing connects until the first command.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        let client =
            redis::Client::open(url).map_err(|e| format!("invalid redis url ({:?})", e.kind()))?;
        Ok(RedisHandle {
            client,
            pool: (0..POOL_SIZE).map(|_| OnceCell::new()).collect(),
            next: AtomicUsize::new(0),
            timeout,
        })
    }

    /// The client, for plugins that need connections of their own (a subscription).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// A connection from the pool, opened on first use.
    pub async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let slot = &self.pool[self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len()];
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let manager = slot
            .get_or_try_init(|| async {
                ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await?;
        Ok(manager.clone())
    }

    /// Runs `work` on a pooled connection with a deadline; any failure is an error the
    /// caller decides on.
    async fn with_deadline<T, F>(
        &self,
        work: impl FnOnce(ConnectionManager) -> F,
    ) -> Result<T, String>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async { work(self.connection().await?).await };
        match tokio::time::timeout(self.timeout * 2, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Runs one command with a deadline.
    pub async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, String> {
        self.with_deadline(|mut conn| async move { command.query_async::<T>(&mut conn).await })
            .await
    }

    /// Runs a pipeline with a deadline.
    pub async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, String> {
        self.with_deadline(|mut conn| async move { pipe.query_async::<T>(&mut conn).await })
            .await
    }

    /// Runs `script` with a deadline.
    pub async fn run<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[i64],
    ) -> Result<T, String> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(*k);
        }
        for a in args {
            invocation.arg(*a);
        }
        self.with_deadline(|mut conn| async move { invocation.invoke_async::<T>(&mut conn).await })
            .await
    }
}

/// A connection of its own (for a subscription, a transaction, or the command line),
/// whose connect, reads and writes each give up after `timeout`.
pub fn blocking_connection(
    client: &redis::Client,
    timeout: Duration,
) -> redis::RedisResult<redis::Connection> {
    let con = client.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    Ok(con)
}
