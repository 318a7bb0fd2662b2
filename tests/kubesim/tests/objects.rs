//! kubesim's object API in-process (no kubectl): create, conflicts, replace preconditions, patch
//! types, delete, watches (events after a resourceVersion, 410 for a too old one), and pods
//! created through the API running their command.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const TOKEN: &str = "objects-token";
const CMS: &str = "/api/v1/namespaces/default/configmaps";

async fn start() -> kubesim::Handle {
    let config = kubesim::Config::new("127.0.0.1:0".parse().unwrap())
        .pod("default/demo")
        .unwrap()
        .token(TOKEN);
    kubesim::Server::start(config).await.unwrap()
}

fn request(method: &str, path: &str, content_type: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: kubesim\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// One request with a JSON body; returns (status, body as JSON).
async fn call(
    h: &kubesim::Handle,
    method: &str,
    path: &str,
    content_type: &str,
    body: &Value,
) -> (u16, Value) {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
    tcp.write_all(request(method, path, content_type, &body).as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

fn rv(v: &Value) -> String {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn create_conflict_replace_patch_delete() {
    let h = start().await;
    let json = "application/json";
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "1"}});
    let (code, created) = call(&h, "POST", CMS, json, &cm).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(call(&h, "POST", CMS, json, &cm).await.0, 409);
    let wrong_ns = json!({"metadata": {"name": "b", "namespace": "other"}});
    assert_eq!(call(&h, "POST", CMS, json, &wrong_ns).await.0, 400);

    // PUT: a stale resourceVersion is a conflict; the current one replaces.
    let mut stale = created.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    stale["data"]["k"] = json!("2");
    let (code, body) = call(&h, "PUT", &format!("{CMS}/a"), json, &stale).await;
    assert_eq!((code, body["reason"].as_str()), (409, Some("Conflict")));
    let mut fresh = created.clone();
    fresh["data"]["k"] = json!("2");
    let (code, replaced) = call(&h, "PUT", &format!("{CMS}/a"), json, &fresh).await;
    assert_eq!(code, 200);
    assert_eq!(replaced["data"]["k"], "2");
    assert!(rv(&replaced).parse::<u64>().unwrap() > rv(&created).parse::<u64>().unwrap());
    assert_eq!(replaced["metadata"]["uid"], created["metadata"]["uid"]);

    // PATCH: merge and strategic merge; JSON patch is refused with 415.
    let (code, merged) = call(
        &h,
        "PATCH",
        &format!("{CMS}/a"),
        "application/merge-patch+json",
        &json!({"data": {"k": null, "m": "3"}}),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(merged["data"], json!({"m": "3"}));
    let (code, _) = call(
        &h,
        "PATCH",
        &format!("{CMS}/a"),
        "application/strategic-merge-patch+json",
        &json!({"metadata": {"labels": {"x": "y"}}}),
    )
    .await;
    assert_eq!(code, 200);
    let (code, _) = call(
        &h,
        "PATCH",
        &format!("{CMS}/a"),
        "application/json-patch+json",
        &json!([]),
    )
    .await;
    assert_eq!(code, 415);

    // DELETE returns the object; then it is gone.
    let (code, gone) = call(&h, "DELETE", &format!("{CMS}/a"), json, &Value::Null).await;
    assert_eq!((code, gone["metadata"]["name"].as_str()), (200, Some("a")));
    assert_eq!(
        call(&h, "GET", &format!("{CMS}/a"), json, &Value::Null)
            .await
            .0,
        404
    );
    assert_eq!(
        call(
            &h,
            "POST",
            CMS,
            json,
            &json!({"metadata": {"name": "Bad_Name"}})
        )
        .await
        .0,
        422
    );
}

/// Reads a watch's raw response until it contains every one of `needles`.
async fn watch_until(tcp: &mut TcpStream, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&raw).into_owned();
        if needles.iter().all(|n| text.contains(n)) {
            return text;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "watch never showed {needles:?}:\n{text}");
        if let Ok(Ok(n)) = tokio::time::timeout(left, tcp.read(&mut buf)).await {
            assert!(n > 0, "watch ended early:\n{text}");
            raw.extend_from_slice(&buf[..n]);
        }
    }
}

#[tokio::test]
async fn watches_deliver_events_after_a_resource_version_and_expire_old_ones() {
    let h = start().await;
    let json = "application/json";
    let (_, first) = call(
        &h,
        "POST",
        CMS,
        json,
        &json!({"metadata": {"name": "first"}}),
    )
    .await;
    let from = rv(&first);
    let mut watch = TcpStream::connect(h.addr()).await.unwrap();
    let path = format!("{CMS}?watch=true&resourceVersion={from}");
    watch
        .write_all(request("GET", &path, json, "").as_bytes())
        .await
        .unwrap();
    call(
        &h,
        "POST",
        CMS,
        json,
        &json!({"metadata": {"name": "second", "labels": {"a": "b"}}}),
    )
    .await;
    call(&h, "DELETE", &format!("{CMS}/second"), json, &Value::Null).await;
    let text = watch_until(
        &mut watch,
        &[
            r#""type":"ADDED""#,
            r#""name":"second""#,
            r#""type":"DELETED""#,
        ],
    )
    .await;
    assert!(
        !text.contains(r#""name":"first""#),
        "an event at or before {from} was replayed:\n{text}"
    );

    // A selector watch without a resourceVersion starts with the matching objects.
    let mut selected = TcpStream::connect(h.addr()).await.unwrap();
    let path = format!("{CMS}?watch=1&fieldSelector=metadata.name%3Dfirst");
    selected
        .write_all(request("GET", &path, json, "").as_bytes())
        .await
        .unwrap();
    watch_until(&mut selected, &[r#""type":"ADDED""#, r#""name":"first""#]).await;

    // Past the kept history: 410 Expired.
    for i in 0..kubesim::store::HISTORY {
        let (code, _) = call(
            &h,
            "POST",
            CMS,
            json,
            &json!({"metadata": {"name": format!("n{i}")}}),
        )
        .await;
        assert_eq!(code, 201);
    }
    let (code, body) = call(
        &h,
        "GET",
        &format!("{CMS}?watch=true&resourceVersion={from}"),
        json,
        &Value::Null,
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (410, Some("Expired")));
    // A chunked list walks them all.
    let mut names = 0;
    let mut next = String::new();
    loop {
        let path = format!("{CMS}?limit=300&continue={next}");
        let (code, page) = call(&h, "GET", &path, json, &Value::Null).await;
        assert_eq!(code, 200, "{page}");
        names += page["items"].as_array().unwrap().len();
        match page["metadata"]["continue"].as_str() {
            Some(c) => next = c.to_string(),
            None => break,
        }
    }
    assert_eq!(names, kubesim::store::HISTORY + 1);
}

#[tokio::test]
async fn a_created_pod_runs_its_command_and_is_killed_on_delete() {
    let h = start().await;
    let json = "application/json";
    let pods = "/api/v1/namespaces/default/pods";
    let pod = json!({"metadata": {"generateName": "job-"}, "spec": {"containers": [
        {"name": "main", "image": "busybox", "command": ["sh", "-c"], "args": ["echo hello-from-pod; sleep 30"]}
    ]}});
    let (code, created) = call(&h, "POST", pods, json, &pod).await;
    assert_eq!(code, 201, "{created}");
    let name = created["metadata"]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("job-"), "{name}");
    assert_eq!(created["status"]["phase"], "Running");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
        tcp.write_all(request("GET", &format!("{pods}/{name}/log"), json, "").as_bytes())
            .await
            .unwrap();
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.unwrap();
        if String::from_utf8_lossy(&raw).contains("hello-from-pod") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pod's command never wrote its line"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _) = call(&h, "DELETE", &format!("{pods}/{name}"), json, &Value::Null).await;
    assert_eq!(code, 200);
    assert_eq!(
        call(&h, "GET", &format!("{pods}/{name}"), json, &Value::Null)
            .await
            .0,
        404
    );
    let missing = json!({"metadata": {"name": "x"}, "spec": {"containers": []}});
    assert_eq!(call(&h, "POST", pods, json, &missing).await.0, 422);
}
