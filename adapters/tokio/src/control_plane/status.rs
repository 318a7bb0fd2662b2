//! Kubernetes `Status` error responses: what kubectl decodes and shows for a non-2xx answer.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::Body;

/// The `reason` field Kubernetes uses for `code`.
fn reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        413 => "RequestEntityTooLarge",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ if code >= 500 => "InternalError",
        _ => "Unknown",
    }
}

/// The JSON of a `metav1.Status` failure with `code` and `message`.
#[must_use]
pub fn status_json(code: u16, message: &str) -> String {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason(code),
        "code": code,
    })
    .to_string()
}

/// A complete response with a `Status` body (`application/json`). An out-of-range `code` becomes
/// 502.
#[must_use]
pub fn status_response(code: u16, message: &str) -> Response<Body> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = Response::new(full(status_json(status.as_u16(), message)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A complete plain-text response.
#[must_use]
pub(crate) fn text_response(status: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A fixed body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_a_kubernetes_status() {
        let v: serde_json::Value = serde_json::from_str(&status_json(502, "no agent")).unwrap();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["code"], 502);
        assert_eq!(v["reason"], "InternalError");
        assert_eq!(v["message"], "no agent");
        assert_eq!(status_response(401, "x").status(), StatusCode::UNAUTHORIZED);
    }
}
