//! `llm_budget`: LLM tokens per caller per minute.
//!
//! ```yaml
//! plugins:
//!   budget:
//!     type: llm_budget
//!     key: identity             # identity (default) | client_ip | header:NAME
//!     tokens_per_minute: 20000
//!     backend: local            # local | redis
//!     on_backend_error: allow   # allow | deny
//! ```
//!
//! Counts `usage.total_tokens` of OpenAI-style responses as they stream: the JSON body of
//! a completion, or the final chunk of a streamed (SSE) one that carries `usage`. The
//! count is known only when the response ends, so it is charged then; a caller whose
//! tokens of the last minute reach the budget gets 429 (with `Retry-After`) until enough
//! of that minute has passed. One large answer may overdraw the budget; the debt is paid
//! off over the following minutes.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gcra::{Gcra, LocalTable, RedisGcra, RedisMode};
use crate::rate_limit::{Backend, OnError};
use crate::redis_store;
use crate::{
    BuildEnv, Ctx, Hooks, Plugin, Reply, RequestFlow, RequestHeader, ResponseParts, Verdict,
};

/// Settings of an `llm_budget` plugin.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmBudgetConfig {
    /// Whose budget: `identity` (default), `client_ip` or `header:NAME`.
    #[serde(default = "default_key")]
    pub key: String,
    /// Tokens per caller per minute. Left out, the plugin only counts the tokens of
    /// each response (for usage accounting) and limits nothing.
    pub tokens_per_minute: Option<u64>,
    /// `local` (default) or `redis`.
    #[serde(default)]
    pub backend: Backend,
    /// While Redis is unreachable: `allow` (default) or `deny` (503).
    #[serde(default)]
    pub on_backend_error: OnError,
}

fn default_key() -> String {
    "identity".into()
}

/// Finds the last `"<key>": N` in a stream (by default `"total_tokens"`), byte by
/// byte, across chunk borders, without buffering anything.
#[derive(Debug, Clone)]
pub struct UsageScanner {
    /// The quoted key looked for.
    pattern: &'static [u8],
    matched: usize,
    /// After the key: 0 looking for ':', 1 reading digits.
    after_key: Option<u8>,
    value: u64,
    /// The last complete value seen.
    pub total: Option<u64>,
}

impl Default for UsageScanner {
    fn default() -> Self {
        UsageScanner::for_key(b"\"total_tokens\"")
    }
}

impl UsageScanner {
    /// A scanner for another quoted key, such as `"prompt_tokens"`.
    pub fn for_key(pattern: &'static [u8]) -> Self {
        UsageScanner {
            pattern,
            matched: 0,
            after_key: None,
            value: 0,
            total: None,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        let pattern = self.pattern;
        for &b in bytes {
            match self.after_key {
                Some(0) => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b':' => {
                        self.after_key = Some(1);
                        self.value = 0;
                        self.matched = usize::MAX; // no digit yet
                    }
                    _ => self.after_key = None,
                },
                Some(_) => {
                    if b.is_ascii_digit() {
                        self.value = self
                            .value
                            .saturating_mul(10)
                            .saturating_add(u64::from(b - b'0'));
                        self.matched = 0;
                    } else if matches!(b, b' ' | b'\t') && self.matched == usize::MAX {
                        // whitespace before the number
                    } else {
                        if self.matched == 0 {
                            self.total = Some(self.value);
                        }
                        self.after_key = None;
                        self.matched = 0;
                    }
                }
                None => {
                    if b == pattern[self.matched] {
                        self.matched += 1;
                        if self.matched == pattern.len() {
                            self.after_key = Some(0);
                            self.matched = 0;
                        }
                    } else {
                        self.matched = usize::from(b == pattern[0]);
                    }
                }
            }
        }
    }

    /// The count, also when the stream ended right after the digits.
    pub fn finish(&mut self) -> Option<u64> {
        if self.after_key == Some(1) && self.matched == 0 {
            self.total = Some(self.value);
            self.after_key = None;
        }
        self.total
    }
}

/// The three counts of an OpenAI-style `usage` object, scanned as the body streams.
#[derive(Debug, Clone)]
pub struct TokenScanner {
    prompt: UsageScanner,
    completion: UsageScanner,
    total: UsageScanner,
}

impl Default for TokenScanner {
    fn default() -> Self {
        TokenScanner {
            prompt: UsageScanner::for_key(b"\"prompt_tokens\""),
            completion: UsageScanner::for_key(b"\"completion_tokens\""),
            total: UsageScanner::default(),
        }
    }
}

impl TokenScanner {
    pub fn feed(&mut self, bytes: &[u8]) {
        self.prompt.feed(bytes);
        self.completion.feed(bytes);
        self.total.feed(bytes);
    }

    /// What the response reported, once it is over; `None` when it reported nothing.
    pub fn finish(&mut self) -> Option<crate::TokenUsage> {
        let total = self.total.finish();
        let prompt = self.prompt.finish();
        let completion = self.completion.finish();
        if total.is_none() && prompt.is_none() && completion.is_none() {
            return None;
        }
        let (prompt, completion) = (prompt.unwrap_or(0), completion.unwrap_or(0));
        Some(crate::TokenUsage {
            prompt,
            completion,
            total: total.unwrap_or(prompt.saturating_add(completion)),
        })
    }
}

/// Per-request state of an `llm_budget` plugin.
#[derive(Debug, Default)]
struct BudgetState {
    key: u64,
    redis_key: Option<String>,
    pub scanner: Option<TokenScanner>,
}

/// The runtime form of an `llm_budget` plugin.
pub struct LlmBudget {
    key: crate::rate_limit::KeySource,
    /// `None`: count only.
    gcra: Option<Gcra>,
    local: LocalTable,
    redis: Option<RedisGcra>,
    on_error: OnError,
}

impl LlmBudget {
    pub fn new(config: LlmBudgetConfig, env: &BuildEnv) -> Result<Self, String> {
        if config.tokens_per_minute == Some(0) {
            return Err("tokens_per_minute must be at least 1".into());
        }
        let key = crate::rate_limit::KeySource::parse(&config.key)?;
        let redis = match config.backend {
            Backend::Local => None,
            Backend::Redis => Some(RedisGcra::new(env, "llm")?),
        };
        Ok(LlmBudget {
            key,
            gcra: config
                .tokens_per_minute
                .map(|n| Gcra::new(n, Duration::from_secs(60), n)),
            local: LocalTable::default(),
            redis,
            on_error: config.on_backend_error,
        })
    }

    fn refuse(&self, retry_after: Duration) -> Reply {
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        Reply::error(429, "token budget exhausted")
            .with_header(http::header::RETRY_AFTER, &secs.to_string())
    }
}

impl crate::PluginType for LlmBudget {
    const TYPE: &'static str = "llm_budget";
    type Config = LlmBudgetConfig;

    fn build(config: LlmBudgetConfig, env: &crate::BuildEnv) -> Result<Self, String> {
        LlmBudget::new(config, env)
    }
}

impl Plugin for LlmBudget {
    fn type_name(&self) -> &'static str {
        <Self as crate::PluginType>::TYPE
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            request: true,
            response: true,
            response_body: true,
            logging: true,
            ..Hooks::default()
        }
    }

    fn on_request<'a>(&'a self, req: &'a mut RequestHeader, ctx: &'a mut Ctx) -> RequestFlow<'a> {
        let mut buf = [0u8; 17];
        let bytes = self.key.bytes(req, ctx, &mut buf);
        let key = self.local.hash(bytes);
        let redis_key = self.redis.as_ref().map(|r| r.key(bytes));
        ctx.ext.insert(BudgetState {
            key,
            redis_key: redis_key.clone(),
            scanner: None,
        });
        let Some(gcra) = self.gcra else {
            return RequestFlow::CONTINUE;
        };
        let Some(redis) = &self.redis else {
            let d = self.local.peek(&gcra, key);
            return if d.allowed {
                RequestFlow::CONTINUE
            } else {
                ctx.rate_limited = true;
                RequestFlow::reply(self.refuse(d.retry_after))
            };
        };
        let redis_key = redis_key.unwrap_or_default();
        RequestFlow::Wait(Box::pin(async move {
            match redis.call(&redis_key, &gcra, 0, RedisMode::Peek).await {
                Ok(d) if d.allowed => Verdict::Continue,
                Ok(d) => {
                    ctx.rate_limited = true;
                    Verdict::Reply(self.refuse(d.retry_after))
                }
                Err(e) => crate::rate_limit::backend_failed(self.on_error, &e),
            }
        }))
    }

    fn on_response(&self, resp: &mut ResponseParts, ctx: &mut Ctx) {
        let countable = resp.status == 200
            && resp
                .headers
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|ct| {
                    let ct = ct.as_bytes();
                    ct.starts_with(b"application/json") || ct.starts_with(b"text/event-stream")
                });
        if let (true, Some(state)) = (countable, ctx.ext.get_mut::<BudgetState>()) {
            state.scanner = Some(TokenScanner::default());
        }
    }

    fn on_response_body(
        &self,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) {
        let Some(scanner) = ctx
            .ext
            .get_mut::<BudgetState>()
            .and_then(|s| s.scanner.as_mut())
        else {
            return;
        };
        if let Some(chunk) = body.as_ref() {
            scanner.feed(chunk);
        }
        if end_of_stream {
            // What the response reported, for the usage accounting.
            ctx.llm_tokens = scanner.finish();
        }
    }

    fn on_logging(&self, _req: &RequestHeader, ctx: &Ctx, _status: u16) {
        let (Some(gcra), Some(state)) = (self.gcra, ctx.ext.get::<BudgetState>()) else {
            return;
        };
        // A stream cut short still charges what it reported so far.
        let Some(tokens) = ctx
            .llm_tokens
            .or_else(|| state.scanner.clone().and_then(|mut s| s.finish()))
            .map(|usage| usage.total)
            .filter(|t| *t > 0)
        else {
            return;
        };
        match (&self.redis, &state.redis_key) {
            (Some(redis), Some(key)) => {
                let (redis, key) = (redis.detached(), key.clone());
                tokio::spawn(async move {
                    if let Err(e) = redis.call(&key, &gcra, tokens, RedisMode::Charge).await {
                        redis_store::report_error("llm budget charge", &e);
                    }
                });
            }
            _ => self.local.charge(&gcra, state.key, tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Identity, RequestId, Role};
    use std::sync::Arc;

    fn scan(chunks: &[&str]) -> Option<u64> {
        let mut s = UsageScanner::default();
        for c in chunks {
            s.feed(c.as_bytes());
        }
        s.finish()
    }

    #[test]
    fn finds_total_tokens_across_chunk_borders() {
        let body =
            r#"{"id":"x","usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        assert_eq!(scan(&[body]), Some(12));
        for split in 1..body.len() {
            assert_eq!(
                scan(&[&body[..split], &body[split..]]),
                Some(12),
                "split at {split}"
            );
        }
        assert_eq!(scan(&["\"total_tokens\" :  345"]), Some(345));
        assert_eq!(scan(&["{\"total_tokens\": \"x\"}"]), None);
        assert_eq!(scan(&["no usage here"]), None);
    }

    #[test]
    fn the_last_sse_usage_wins() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"usage\":{\"total_tokens\":40}}\n\ndata: [DONE]\n\n";
        assert_eq!(scan(&[stream]), Some(40));
    }

    #[test]
    fn a_spent_budget_is_refused_until_the_window_frees_it() {
        let p = LlmBudget::new(
            serde_yaml_ng::from_str("{ tokens_per_minute: 100 }").unwrap(),
            &BuildEnv::default(),
        )
        .unwrap();
        let mut ctx = Ctx::new(
            "192.0.2.1".parse().unwrap(),
            RequestId::from_random(0),
            false,
        );
        ctx.identity = Some(Identity {
            subject: Arc::from("alice"),
            role: Role::User,
            method: "t",
        });
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        assert!(matches!(
            p.on_request(&mut req, &mut ctx),
            RequestFlow::Done(Verdict::Continue)
        ));
        let mut resp = crate::ResponseHeader::build(200, None).unwrap();
        resp.insert_header("content-type", "application/json")
            .unwrap();
        let mut resp = ResponseParts::from(resp);
        p.on_response(&mut resp, &mut ctx);
        let mut body = Some(bytes::Bytes::from_static(
            b"{\"usage\":{\"total_tokens\":150}}",
        ));
        p.on_response_body(&mut body, true, &mut ctx);
        p.on_logging(&req, &ctx, 200);
        let status = match p.on_request(&mut req, &mut ctx) {
            RequestFlow::Done(Verdict::Reply(r)) => r.status,
            _ => 200,
        };
        assert_eq!(status, 429);
    }
}
