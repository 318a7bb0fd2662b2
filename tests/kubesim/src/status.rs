//! Kubernetes `metav1.Status` bodies: HTTP error responses and the exec/attach
//! status written on channel 3.
//!
//! Contract: HTTP errors are `{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
//! "message":..,"reason":..,"details":{..},"code":N}`; the channel-3 bodies are byte for byte the
//! ones kube-apiserver writes (reference §1.8).

use serde::Serialize;

/// `details` of a Status.
#[derive(Debug, Default, Serialize)]
pub struct Details {
    /// Object name, when the error concerns one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Resource kind (plural), e.g. `pods`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Serialize)]
struct Status<'a> {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: Empty,
    status: &'static str,
    message: &'a str,
    reason: &'a str,
    details: &'a Details,
    code: u16,
}

#[derive(Serialize)]
struct Empty {}

/// An HTTP error described as a Kubernetes Status.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status code (also the Status `code`).
    pub code: u16,
    /// Machine-readable reason, e.g. `NotFound`.
    pub reason: &'static str,
    /// Human-readable message; kubectl prints it.
    pub message: String,
    /// Optional details.
    pub details: Details,
}

impl ApiError {
    /// An error with empty details.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: Details::default(),
        }
    }

    /// 404 for a named object: `pods "x" not found`.
    pub fn not_found(kind: &str, name: &str) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("{kind} \"{name}\" not found"),
            details: Details {
                name: Some(name.to_string()),
                kind: Some(kind.to_string()),
            },
        }
    }

    /// 404 for an unknown path.
    pub fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    /// 400 BadRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 401 Unauthorized (what kube-apiserver answers without valid credentials).
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    /// 403 Forbidden.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    /// 405 MethodNotAllowed.
    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    /// The JSON Status body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&Status {
            kind: "Status",
            api_version: "v1",
            metadata: Empty {},
            status: "Failure",
            message: &self.message,
            reason: self.reason,
            details: &self.details,
            code: self.code,
        })
        .expect("Status serialises")
    }
}

/// Channel-3 body for a command that exited 0: `{"metadata":{},"status":"Success"}`.
pub fn exec_success() -> Vec<u8> {
    br#"{"metadata":{},"status":"Success"}"#.to_vec()
}

/// The Status message for a non-zero exit code.
pub fn exit_message(code: u8) -> String {
    format!("command terminated with non-zero exit code: command terminated with exit code {code}")
}

/// Channel-3 body for a non-zero exit code (kube-apiserver's exact form).
pub fn exec_exit_code(code: u8) -> Vec<u8> {
    format!(
        r#"{{"metadata":{{}},"status":"Failure","message":"{}","reason":"NonZeroExitCode","details":{{"causes":[{{"reason":"ExitCode","message":"{code}"}}]}}}}"#,
        exit_message(code)
    )
    .into_bytes()
}

/// Channel-3 body for exit code `code`: Success for 0, NonZeroExitCode otherwise.
pub fn exec_exit(code: u8) -> Vec<u8> {
    if code == 0 {
        exec_success()
    } else {
        exec_exit_code(code)
    }
}

/// Channel-3 body for a failure that is not an exit code (kubectl prints `error: <message>`).
pub fn exec_internal_error(message: &str) -> Vec<u8> {
    let message = serde_json::to_string(&format!("Internal error occurred: {message}"))
        .expect("string serialises");
    format!(
        r#"{{"metadata":{{}},"status":"Failure","message":{message},"reason":"InternalError","details":{{"causes":[{{"message":{message}}}]}},"code":500}}"#
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_body_is_exact() {
        assert_eq!(
            String::from_utf8(exec_exit(3)).unwrap(),
            r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: command terminated with exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#
        );
        assert_eq!(exec_exit(0), br#"{"metadata":{},"status":"Success"}"#);
        let v: serde_json::Value = serde_json::from_slice(&exec_internal_error("x \"y\"")).unwrap();
        assert_eq!(v["code"], 500);
    }

    #[test]
    fn http_status_shape() {
        let v: serde_json::Value =
            serde_json::from_slice(&ApiError::not_found("pods", "p").to_json()).unwrap();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["code"], 404);
        assert_eq!(v["message"], "pods \"p\" not found");
        assert_eq!(v["details"]["name"], "p");
    }
}
