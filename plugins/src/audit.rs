//! `audit`: one JSON line per request, for who-did-what questions.
//!
//! ```yaml
//! plugins:
//!   audit:
//!     type: audit
//!     file: /var/log/gatewarden/audit.jsonl
//!     methods: unsafe          # unsafe (all but GET, HEAD, OPTIONS, TRACE) | all
//! ```
//!
//! Each line: `ts`, `request_id`, `client_ip`, `subject`, `auth` (method), `method`,
//! `path` (never the query string), `route`, `status`, `duration_ms`, `upstream` (null
//! when the gateway answered itself).
//! Never credentials, cookies, query strings or bodies; control characters are escaped
//! by the JSON encoder. Lines are written by a background thread (a slow disk never
//! stalls a request; when its queue is full, lines are dropped and counted), and the
//! file is reopened on SIGHUP or SIGUSR1 for log rotation.

use serde::{Deserialize, Serialize};

use crate::line_writer::{LineWriter, Target};
use crate::{Ctx, Hooks, Plugin, RequestHeader};

/// Settings of an `audit` plugin.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The JSON-lines file; created if missing, appended to.
    pub file: String,
    /// `unsafe` (default: every method but GET, HEAD, OPTIONS and TRACE) or `all`.
    #[serde(default = "default_methods")]
    pub methods: String,
    /// Lines queued for the writer before new ones are dropped (default 10000).
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_methods() -> String {
    "unsafe".into()
}

fn default_queue() -> usize {
    10_000
}

/// The runtime form of an `audit` plugin.
pub struct Audit {
    all_methods: bool,
    writer: LineWriter,
}

impl Audit {
    pub fn new(config: AuditConfig) -> Result<Self, String> {
        let all_methods = match config.methods.as_str() {
            "unsafe" => false,
            "all" => true,
            other => {
                return Err(format!(
                    "methods: unknown value {other:?}; use unsafe or all"
                ))
            }
        };
        let writer = LineWriter::new(Target::File(config.file.into()), config.queue)?;
        Ok(Audit {
            all_methods,
            writer,
        })
    }
}

/// Every method but the safe ones, as the `origin` plugin counts them: WebDAV methods,
/// extension methods and odd spellings (`delete`, which Django dispatches to its
/// `delete()` handler) change things too and must not slip past the audit trail.
fn is_unsafe(method: &http::Method) -> bool {
    !matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE
    )
}

/// One record: what the request was, who made it, how it ended. The path has no query.
pub fn record(req: &RequestHeader, ctx: &Ctx, status: u16) -> serde_json::Value {
    serde_json::json!({
        "ts": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "request_id": ctx.request_id.as_str(),
        "client_ip": ctx.client_ip.to_string(),
        "subject": ctx.identity.as_ref().map(|i| &*i.subject),
        "auth": ctx.identity.as_ref().map(|i| i.method),
        "method": req.method.as_str(),
        "path": req.uri.path(),
        "route": ctx.route.as_deref(),
        "status": status,
        "duration_ms": ctx.started.elapsed().as_secs_f64() * 1000.0,
        "upstream": ctx.upstream.as_deref(),
    })
}

impl crate::PluginType for Audit {
    const TYPE: &'static str = "audit";
    type Config = AuditConfig;

    fn build(config: AuditConfig, _env: &crate::BuildEnv) -> Result<Self, String> {
        Audit::new(config)
    }
}

impl Plugin for Audit {
    fn type_name(&self) -> &'static str {
        <Self as crate::PluginType>::TYPE
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            logging: true,
            ..Hooks::default()
        }
    }

    fn start(&self) -> Result<(), String> {
        self.writer.start()
    }

    fn on_logging(&self, req: &RequestHeader, ctx: &Ctx, status: u16) {
        if self.all_methods || is_unsafe(&req.method) {
            self.writer.write(record(req, ctx, status).to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Identity, RequestId, Role};
    use std::sync::Arc;

    #[test]
    fn records_leave_out_queries_and_escape_control_characters() {
        let req = RequestHeader::build("POST", b"/api/chat?token=secret123", None).unwrap();
        let mut ctx = Ctx::new(
            "192.0.2.1".parse().unwrap(),
            RequestId::from_random(9),
            true,
        );
        ctx.identity = Some(Identity {
            subject: Arc::from("eve\n{\"forged\":1}"),
            role: Role::User,
            method: "api_key",
        });
        ctx.route = Some(Arc::from("chat"));
        let line = record(&req, &ctx, 201).to_string();
        assert!(!line.contains("secret123"));
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["path"], "/api/chat");
        assert_eq!(v["subject"], "eve\n{\"forged\":1}");
        assert_eq!(v["auth"], "api_key");
        assert_eq!(v["status"], 201);
        assert_eq!(v["route"], "chat");
    }

    #[test]
    fn every_method_but_the_safe_ones_is_unsafe() {
        for m in [
            "POST",
            "PUT",
            "PATCH",
            "DELETE",
            "delete",
            "PROPPATCH",
            "MKCOL",
            "PURGE",
        ] {
            assert!(
                is_unsafe(&http::Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
        for m in ["GET", "HEAD", "OPTIONS", "TRACE"] {
            assert!(
                !is_unsafe(&http::Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
    }

    #[test]
    fn settings_are_checked() {
        let bad = |yaml: &str| Audit::new(serde_yaml_ng::from_str(yaml).unwrap()).is_err();
        assert!(bad("{ file: /nonexistent/dir/audit.jsonl }"));
        assert!(bad("{ file: /tmp/x.jsonl, methods: some }"));
    }
}
