//! Header value templates: `{client_ip}`, `{request_id}`, `{identity.subject}`,
//! `{identity.role}` and literal text. Parsed once at build time.

use http::HeaderValue;

use crate::{Ctx, IpText};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    ClientIp,
    RequestId,
    Subject,
    Role,
}

/// A compiled header value. A value without placeholders is prebuilt once.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
    constant: Option<HeaderValue>,
}

/// The placeholders a template may use, for error messages.
pub const PLACEHOLDERS: &str = "{client_ip}, {request_id}, {identity.subject}, {identity.role}";

impl Template {
    /// Parses `source`; `{{` and `}}` stand for literal braces.
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = source;
        while let Some(i) = rest.find(['{', '}']) {
            text.push_str(&rest[..i]);
            let tail = &rest[i..];
            if tail.starts_with("{{") || tail.starts_with("}}") {
                text.push_str(&tail[..1]);
                rest = &tail[2..];
                continue;
            }
            if tail.starts_with('}') {
                // The value may hold a secret from ${env:}/${file:}: never echo it.
                return Err("unmatched '}' (write '}}' for a literal brace)".to_string());
            }
            let end = tail
                .find('}')
                .ok_or_else(|| "unclosed '{' (write '{{' for a literal brace)".to_string())?;
            let part = match &tail[1..end] {
                "client_ip" => Part::ClientIp,
                "request_id" => Part::RequestId,
                "identity.subject" => Part::Subject,
                "identity.role" => Part::Role,
                other => {
                    return Err(format!(
                        "unknown placeholder {{{other}}}; known: {PLACEHOLDERS}"
                    ))
                }
            };
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(part);
            rest = &tail[end + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        let constant = match parts.as_slice() {
            [] => Some(HeaderValue::from_static("")),
            [Part::Text(t)] => Some(
                HeaderValue::from_str(t)
                    .map_err(|_| "not a valid header value (control character?)".to_string())?,
            ),
            _ => None,
        };
        Ok(Template { parts, constant })
    }

    /// True when the value depends on who the caller is.
    pub fn uses_identity(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Subject | Part::Role))
    }

    /// The value for this request. `None` when it needs an identity the request does not
    /// have, or renders into something that is not a valid header value: a header is then
    /// left out rather than sent empty or malformed.
    pub fn render(&self, ctx: &Ctx) -> Option<HeaderValue> {
        if let Some(v) = &self.constant {
            return Some(v.clone());
        }
        let ip = self
            .parts
            .iter()
            .any(|p| matches!(p, Part::ClientIp))
            .then(|| IpText::new(ctx.client_ip));
        let mut len = 0;
        for part in &self.parts {
            len += piece(part, ctx, ip.as_ref())?.len();
        }
        crate::value::header_value_with(len, |out| {
            for part in &self.parts {
                // Every piece was there when measured above.
                if let Some(text) = piece(part, ctx, ip.as_ref()) {
                    out.extend_from_slice(text.as_bytes());
                }
            }
        })
    }
}

/// What one part of a template says for this request; `None` for an identity the
/// request does not have.
fn piece<'a>(part: &'a Part, ctx: &'a Ctx, ip: Option<&'a IpText>) -> Option<&'a str> {
    Some(match part {
        Part::Text(t) => t,
        Part::ClientIp => ip?.as_str(),
        Part::RequestId => ctx.request_id.as_str(),
        Part::Subject => &ctx.identity.as_ref()?.subject,
        Part::Role => ctx.identity.as_ref()?.role.as_str(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Identity, RequestId, Role};
    use std::sync::Arc;

    fn ctx() -> Ctx {
        Ctx::new(
            "10.1.2.3".parse().unwrap(),
            RequestId::from_random(1),
            false,
        )
    }

    #[test]
    fn renders_placeholders_and_text() {
        let t = Template::parse("ip={client_ip} id={request_id} {{x}}").unwrap();
        let v = t.render(&ctx()).unwrap();
        assert_eq!(v, "ip=10.1.2.3 id=00000000000000000000000000000001 {x}");
    }

    #[test]
    fn identity_placeholders_need_an_identity() {
        let t = Template::parse("{identity.subject}").unwrap();
        assert!(t.uses_identity());
        let mut c = ctx();
        assert!(t.render(&c).is_none());
        c.identity = Some(Identity {
            subject: Arc::from("a@b.c"),
            role: Role::Admin,
            method: "test",
        });
        assert_eq!(t.render(&c).unwrap(), "a@b.c");
        assert_eq!(
            Template::parse("{identity.role}")
                .unwrap()
                .render(&c)
                .unwrap(),
            "admin"
        );
    }

    #[test]
    fn rejects_unknown_and_unbalanced() {
        assert!(Template::parse("{nope}")
            .unwrap_err()
            .contains("unknown placeholder"));
        assert!(Template::parse("{client_ip").is_err());
        assert!(Template::parse("a}b").is_err());
        assert!(Template::parse("bad\nvalue").is_err());
    }

    #[test]
    fn values_that_would_break_headers_are_left_out() {
        let t = Template::parse("{identity.subject}").unwrap();
        let mut c = ctx();
        c.identity = Some(Identity {
            subject: Arc::from("x\r\nInjected: 1"),
            role: Role::User,
            method: "t",
        });
        assert!(t.render(&c).is_none());
    }
}
