#![allow(dead_code)]
//! The example backends (`examples/backends/`), started as processes for a test, with the
//! webhooks they log collected.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::support::listening;

/// The secret the tests' backends and nodes share.
pub const SECRET: &str = "a backend secret of at least 32 bytes";

/// The example backends: the program and its script.
pub const BACKENDS: [(&str, &str); 2] = [
    ("node", "examples/backends/node/backend.js"),
    ("python3", "examples/backends/python/backend.py"),
];

/// An example backend on a port; every webhook it logs goes to `webhooks`.
pub struct Backend {
    child: Child,
    pub port: u16,
}

/// The webhooks backends logged, in the order they logged them (shared by the backends
/// started on one log, e.g. one that was stopped and its replacement).
pub type Webhooks = Arc<Mutex<Vec<serde_json::Value>>>;

impl Backend {
    pub async fn start(example: (&str, &str), port: u16) -> Backend {
        Self::logging(example, port, Webhooks::default()).await
    }

    /// Starts `example` on `port`, adding the webhooks it logs to `webhooks`.
    pub async fn logging(
        (program, script): (&str, &str),
        port: u16,
        webhooks: Webhooks,
    ) -> Backend {
        let mut child = Command::new(program)
            .arg(script)
            .env("PORT", port.to_string())
            .env("THINWS_SECRET", SECRET)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} is needed for {script}: {e}"));
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(logged) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let Some(webhook) = logged.get("webhook") {
                    webhooks.lock().unwrap().push(webhook.clone());
                }
            }
        });
        listening(port).await;
        Backend { child, port }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/thinws/{path}", self.port)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
