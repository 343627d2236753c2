//! The OTLP/HTTP binary body: an `ExportTraceServiceRequest` in protobuf, written by
//! hand for the handful of messages and fields the gateway sends.
//!
//! Field numbers are those of opentelemetry-proto's
//! `collector/trace/v1/trace_service.proto`, `trace/v1/trace.proto`,
//! `resource/v1/resource.proto` and `common/v1/common.proto`. A message nested in
//! another is length-delimited; lengths are known only once the nested message is
//! written, so each is written into a scratch buffer first (spans are small).

use super::span::{SpanRecord, Value};

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// `ExportTraceServiceRequest.resource_spans`.
const REQUEST_RESOURCE_SPANS: u32 = 1;
/// `ResourceSpans.resource`, `.scope_spans`.
const RESOURCE_SPANS_RESOURCE: u32 = 1;
const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
/// `Resource.attributes`.
const RESOURCE_ATTRIBUTES: u32 = 1;
/// `ScopeSpans.scope`, `.spans`.
const SCOPE_SPANS_SCOPE: u32 = 1;
const SCOPE_SPANS_SPANS: u32 = 2;
/// `InstrumentationScope.name`, `.version`.
const SCOPE_NAME: u32 = 1;
const SCOPE_VERSION: u32 = 2;
/// `Span` fields.
const SPAN_TRACE_ID: u32 = 1;
const SPAN_SPAN_ID: u32 = 2;
const SPAN_TRACE_STATE: u32 = 3;
const SPAN_PARENT_SPAN_ID: u32 = 4;
const SPAN_NAME: u32 = 5;
const SPAN_KIND: u32 = 6;
const SPAN_START: u32 = 7;
const SPAN_END: u32 = 8;
const SPAN_ATTRIBUTES: u32 = 9;
const SPAN_STATUS: u32 = 15;
const SPAN_FLAGS: u32 = 16;
/// `Span.SpanKind.SPAN_KIND_SERVER`.
const KIND_SERVER: u64 = 2;
/// `Status.message`, `.code`; `Status.StatusCode.STATUS_CODE_ERROR`.
const STATUS_MESSAGE: u32 = 2;
const STATUS_CODE: u32 = 3;
const STATUS_ERROR: u64 = 2;
/// `KeyValue.key`, `.value`.
const KEY_VALUE_KEY: u32 = 1;
const KEY_VALUE_VALUE: u32 = 2;
/// `AnyValue.string_value`, `.int_value`.
const ANY_STRING: u32 = 1;
const ANY_INT: u32 = 3;
/// `SpanFlags`: whether the parent is remote is known, and it is.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field) << 3 | u64::from(wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    tag(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, VARINT);
    varint(out, v);
}

fn fixed64_field(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

fn fixed32_field(out: &mut Vec<u8>, field: u32, v: u32) {
    tag(out, field, FIXED32);
    out.extend_from_slice(&v.to_le_bytes());
}

/// Writes a nested message: `write` fills `scratch`, which then goes out with its length.
fn message_field(
    out: &mut Vec<u8>,
    field: u32,
    scratch: &mut Vec<u8>,
    write: impl FnOnce(&mut Vec<u8>),
) {
    let mut inner = std::mem::take(scratch);
    inner.clear();
    write(&mut inner);
    bytes_field(out, field, &inner);
    *scratch = inner;
}

fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    let mut any = Vec::with_capacity(16);
    match value {
        Value::Str(s) => bytes_field(&mut any, ANY_STRING, s.as_bytes()),
        Value::Int(i) => varint_field(&mut any, ANY_INT, *i as u64),
    }
    let mut kv = Vec::with_capacity(key.len() + any.len() + 4);
    bytes_field(&mut kv, KEY_VALUE_KEY, key.as_bytes());
    bytes_field(&mut kv, KEY_VALUE_VALUE, &any);
    bytes_field(out, field, &kv);
}

fn span(out: &mut Vec<u8>, s: &SpanRecord) {
    bytes_field(out, SPAN_TRACE_ID, &s.trace_id);
    bytes_field(out, SPAN_SPAN_ID, &s.span_id);
    if let Some(state) = &s.trace_state {
        bytes_field(out, SPAN_TRACE_STATE, state.as_bytes());
    }
    if let Some(parent) = &s.parent_span_id {
        bytes_field(out, SPAN_PARENT_SPAN_ID, parent);
    }
    bytes_field(out, SPAN_NAME, s.name.as_bytes());
    varint_field(out, SPAN_KIND, KIND_SERVER);
    fixed64_field(out, SPAN_START, s.start_unix_nano);
    fixed64_field(out, SPAN_END, s.end_unix_nano);
    for (key, value) in &s.attributes {
        key_value(out, SPAN_ATTRIBUTES, key, value);
    }
    if s.error {
        let mut status = Vec::with_capacity(8);
        bytes_field(&mut status, STATUS_MESSAGE, s.status_message().as_bytes());
        varint_field(&mut status, STATUS_CODE, STATUS_ERROR);
        bytes_field(out, SPAN_STATUS, &status);
    }
    let remote = if s.parent_span_id.is_some() {
        FLAG_HAS_IS_REMOTE | FLAG_IS_REMOTE
    } else {
        FLAG_HAS_IS_REMOTE
    };
    fixed32_field(out, SPAN_FLAGS, u32::from(s.flags) | remote);
}

/// What every batch says about where its spans come from.
pub struct Resource {
    pub service_name: String,
    pub service_version: &'static str,
}

/// The request body for one batch of spans.
pub fn export_request(resource: &Resource, spans: &[SpanRecord]) -> Vec<u8> {
    let mut scratch = Vec::with_capacity(512);
    let mut scope_spans = Vec::with_capacity(256 * spans.len() + 64);
    message_field(&mut scope_spans, SCOPE_SPANS_SCOPE, &mut scratch, |scope| {
        bytes_field(scope, SCOPE_NAME, b"gatewarden");
        bytes_field(scope, SCOPE_VERSION, resource.service_version.as_bytes());
    });
    for s in spans {
        message_field(&mut scope_spans, SCOPE_SPANS_SPANS, &mut scratch, |out| {
            span(out, s)
        });
    }
    let mut resource_spans = Vec::with_capacity(scope_spans.len() + 128);
    message_field(
        &mut resource_spans,
        RESOURCE_SPANS_RESOURCE,
        &mut scratch,
        |res| {
            let name = Value::Str(resource.service_name.clone());
            key_value(res, RESOURCE_ATTRIBUTES, "service.name", &name);
            let version = Value::Str(resource.service_version.to_string());
            key_value(res, RESOURCE_ATTRIBUTES, "service.version", &version);
        },
    );
    bytes_field(
        &mut resource_spans,
        RESOURCE_SPANS_SCOPE_SPANS,
        &scope_spans,
    );
    let mut request = Vec::with_capacity(resource_spans.len() + 8);
    bytes_field(&mut request, REQUEST_RESOURCE_SPANS, &resource_spans);
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_base_128() {
        let enc = |v| {
            let mut out = Vec::new();
            varint(&mut out, v);
            out
        };
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(1), [1]);
        assert_eq!(enc(127), [127]);
        assert_eq!(enc(300), [0xac, 0x02]);
        assert_eq!(enc(u64::MAX).len(), 10);
    }

    #[test]
    fn fields_carry_their_number_and_wire_type() {
        let mut out = Vec::new();
        bytes_field(&mut out, SPAN_NAME, b"GET r");
        assert_eq!(out, [5 << 3 | 2, 5, b'G', b'E', b'T', b' ', b'r']);
        out.clear();
        fixed32_field(&mut out, SPAN_FLAGS, 0x301);
        // Field 16 needs a two-byte tag.
        assert_eq!(out, [0x85, 0x01, 0x01, 0x03, 0, 0]);
        out.clear();
        fixed64_field(&mut out, SPAN_START, 1);
        assert_eq!(out, [7 << 3 | 1, 1, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_key_value_nests_an_any_value() {
        let mut out = Vec::new();
        key_value(&mut out, 9, "k", &Value::Int(200));
        // KeyValue{ key: "k", value: AnyValue{ int_value: 200 } }
        assert_eq!(
            out,
            [9 << 3 | 2, 8, 0x0a, 1, b'k', 0x12, 3, 0x18, 0xc8, 0x01]
        );
    }
}
