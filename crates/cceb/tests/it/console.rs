//! `/console`: the browser console's files, served from the binary without
//! authentication, and the token minting that exists under `serve --dev` only.
//! (The console itself is tested in a browser: `clients/console`, run by
//! `scripts/test`.)

use crate::support::*;
use serde_json::{json, Value};

async fn get(http: &reqwest::Client, url: &str) -> (u16, String, String) {
    let r = http.get(url).send().await.expect("answers");
    let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    (r.status().as_u16(), ct, r.text().await.expect("body"))
}

#[tokio::test]
async fn the_console_is_served_without_a_token_with_the_content_type_of_each_file() {
    let b = TestBridge::start().await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let r = http.get(b.url("/console")).send().await.expect("answers");
    assert_eq!(r.status().as_u16(), 308);
    // Relative: it works behind a proxy that adds a path prefix.
    assert_eq!(r.headers()["location"], "console/");
    let (status, ct, page) = get(&http, &b.url("/console/")).await;
    assert_eq!((status, ct.as_str()), (200, "text/html; charset=utf-8"));
    assert!(page.contains("src=\"app.js\"") && page.contains("href=\"style.css\""), "{page}");
    let (status, ct, _) = get(&http, &b.url("/console/app.js")).await;
    assert_eq!((status, ct.as_str()), (200, "text/javascript; charset=utf-8"));
    let (status, ct, _) = get(&http, &b.url("/console/style.css")).await;
    assert_eq!((status, ct.as_str()), (200, "text/css; charset=utf-8"));
    for missing in ["/console/nothing.js", "/console/dev/token"] {
        assert_eq!(get(&http, &b.url(missing)).await.0, 404, "{missing}");
    }
}

#[tokio::test]
async fn without_dev_there_is_no_token_minting_not_even_when_the_environment_asks_for_it() {
    let b = TestBridge::start().await;
    let mint = |url: String| async move {
        let http = reqwest::Client::new();
        let get = http.get(&url).send().await.expect("answers").status().as_u16();
        let post = http.post(&url).json(&json!({})).send().await.expect("answers").status().as_u16();
        (get, post)
    };
    assert_eq!(mint(b.url("/console/dev/token")).await, (404, 404));
    // `dev` is no setting: neither the environment nor a file turns it on.
    let data = tempfile::tempdir().expect("tempdir");
    let child =
        Server::spawn(cceb(data.path()).args(["serve"]).env("CCEB_JWT_HS256_SECRET", SECRET).env("CCEB_DEV", "true"));
    assert_eq!(mint(format!("http://{}/console/dev/token", child.addr)).await, (404, 404));
    assert!(!child.lines.concat().contains("console"), "{:?}", child.lines);
}

#[tokio::test]
async fn serve_dev_mints_console_tokens_the_bridge_accepts_and_prints_the_console_url() {
    let data = tempfile::tempdir().expect("tempdir");
    let child = Server::spawn(cceb(data.path()).args(["serve", "--dev"]));
    let http = reqwest::Client::new();
    let url = format!("http://{}/console/dev/token", child.addr);
    // GET: the defaults of the form (the page shows it only when this answers).
    let defaults: Value = http.get(&url).send().await.expect("answers").json().await.expect("json");
    assert_eq!(defaults["tenant_guid"], "tenant-1");
    let r = http.post(&url).json(&json!({"tenant_guid": "t-2", "agent_guid": "a-2"})).send().await.expect("answers");
    assert_eq!(r.status().as_u16(), 200);
    let minted: Value = r.json().await.expect("json");
    let token = minted["token"].as_str().expect("a token");
    let reply = Client::connect(&child.ws_url()).await.hello(token).await;
    assert_eq!((reply.agent.tenant_guid.as_str(), reply.agent.agent_guid.as_str()), ("t-2", "a-2"));
    for bad in [json!({"agent_guid": " "}), json!({"ttl_seconds": 0}), json!({"ttl_seconds": 86_401})] {
        let r = http.post(&url).json(&bad).send().await.expect("answers");
        assert_eq!(r.status().as_u16(), 400, "{bad}");
    }
    // The console URL carries the printed token in its fragment (never sent to the server).
    let console = child.lines.iter().find_map(|l| l.split_whitespace().find(|w| w.contains("/console/#token=ey")));
    assert!(console.is_some_and(|u| u.starts_with(&format!("http://{}/console/", child.addr))), "{:?}", child.lines);
}

#[tokio::test]
async fn serve_dev_with_a_configured_secret_neither_mints_nor_prints_it() {
    let data = tempfile::tempdir().expect("tempdir");
    let secret = "a-configured-secret-that-is-long-enough-for-hs256";
    let child = Server::spawn(cceb(data.path()).args(["serve", "--dev"]).env("CCEB_JWT_HS256_SECRET", secret));
    let r = reqwest::Client::new()
        .post(format!("http://{}/console/dev/token", child.addr))
        .json(&json!({"tenant_guid": "victim", "agent_guid": "supervisor"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(r.status().as_u16(), 404, "no minting with a secret the run did not make");
    assert!(child.lines.iter().all(|l| !l.contains(secret)), "{:?}", child.lines);
    assert!(
        child.lines.iter().any(|l| l.contains("CCEB_JWT_HS256_SECRET=(configured, not shown)")),
        "{:?}",
        child.lines
    );
}
