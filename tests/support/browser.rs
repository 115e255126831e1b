//! A headless Chromium driven over WebDriver, for tests that walk through
//! pages the way a person does (the providers' login and consent pages, the
//! callback page).
//!
//! Each [`Browser`] runs its own chromedriver on an ephemeral loopback port,
//! in its own process group, with a fresh Chromium profile in a temporary
//! directory; dropping it kills that process group (chromedriver and the
//! Chromium it started), so a failing test leaves nothing running. Without
//! Chromium the tests that need it skip, except under CI, where they must run.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::wd::{Capabilities, TimeoutConfiguration};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long chromedriver may take to listen, and an element to appear.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How long a page may take to load, and a script to run.
const PAGE_LOAD_WITHIN: Duration = Duration::from_secs(20);
/// How often [`Browser::click_and_navigate`] looks whether the page changed.
const POLL: Duration = Duration::from_millis(25);
/// Window height for [`Browser::set_width`].
const HEIGHT: u32 = 900;

pub struct Browser {
    pub client: Client,
    driver: Driver,
}

/// The chromedriver process, and the directory holding Chromium's profile and
/// chromedriver's log. Dropping it ends its process group.
struct Driver {
    child: Child,
    dir: tempfile::TempDir,
}

impl Browser {
    /// A fresh headless Chromium, 1280×900. `None` (after saying so) when
    /// Chromium or chromedriver is not installed, unless the `CI` variable is
    /// set: CI must never skip, so there it panics.
    pub async fn start() -> Option<Browser> {
        let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        if !missing.is_empty() {
            let why = format!("{} missing", missing.join(" and "));
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
                panic!(
                    "{why}: CI must run the browser tests; install the Debian packages \
                     chromium and chromium-driver (.ci/run does)"
                );
            }
            println!("SKIPPED {why}: chromium or chromedriver not installed");
            return None;
        }

        let dir = tempfile::tempdir().expect("tempdir for the browser");
        let profile = dir.path().join("profile");
        let log = dir.path().join("chromedriver.log");
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that Drop can end Chromium too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {CHROMEDRIVER}: {e}"));
        // From here on, Drop cleans up whatever goes wrong.
        let mut driver = Driver { child, dir };
        driver.wait_until_listening(port);

        let mut caps = Capabilities::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    "--disable-quic",
                    "--disable-extensions",
                    format!("--user-data-dir={}", profile.display()),
                    "--window-size=1280,900",
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await;
        match client {
            Ok(client) => {
                // Bounds every command that chromedriver holds back behind a
                // navigation (its default is 300 s).
                let timeouts = TimeoutConfiguration::new(
                    Some(PAGE_LOAD_WITHIN),
                    Some(PAGE_LOAD_WITHIN),
                    Some(Duration::ZERO),
                );
                if let Err(e) = client.update_timeouts(timeouts).await {
                    panic!("setting chromedriver's timeouts: {e}\n{}", driver.log());
                }
                Some(Browser { client, driver })
            }
            Err(e) => panic!(
                "chromedriver could not start Chromium: {e}\n{}",
                driver.log()
            ),
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// Makes the viewport `width` CSS pixels wide (the window 900 high).
    pub async fn set_width(&self, width: u32) {
        self.client
            .set_window_size(width, HEIGHT)
            .await
            .unwrap_or_else(|e| panic!("set_window_size({width}, {HEIGHT}): {e}"));
        // A window may be wider than its viewport (a scrollbar, a frame):
        // widen it by the difference so that pages see `width` exactly.
        let inner = self.inner_width().await;
        if inner > 0 && inner != u64::from(width) {
            let frame = i64::from(width) - i64::try_from(inner).expect("a width");
            let outer = u32::try_from((i64::from(width) + frame).max(1)).expect("a width");
            self.client
                .set_window_size(outer, HEIGHT)
                .await
                .unwrap_or_else(|e| panic!("set_window_size({outer}, {HEIGHT}): {e}"));
        }
    }

    /// `window.innerWidth` of the current page.
    pub async fn inner_width(&self) -> u64 {
        let value = self
            .client
            .execute("return window.innerWidth;", vec![])
            .await
            .unwrap_or_else(|e| panic!("reading window.innerWidth: {e}"));
        value.as_u64().unwrap_or(0)
    }

    /// Saves a PNG of the viewport as `target/screenshots/{name}.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }

    /// Clicks `css` (a link or a submit button), waits until the browser has
    /// left the page it was on, then returns the element `then` of the page it
    /// went to (at most 10 s for each).
    ///
    /// Waiting for `then` alone is not enough: the click returns before the
    /// navigation commits, and an element that the old page also has (a table,
    /// a flash message, an `h1`) would be found on the old page, which then
    /// goes stale in the test's hands or shows the old URL. So this first holds
    /// on to the old page's root element and waits until it goes stale, which
    /// happens when, and only when, another document replaces it (a redirect,
    /// the same form again after a POST, another site's page). A same-page
    /// click, which never navigates, would time out here: such clicks use the
    /// element itself (`wait_for(css).await.click()`).
    pub async fn click_and_navigate(&self, css: &str, then: &str) -> Element {
        let target = self.wait_for(css).await;
        let old_root = self
            .client
            .find(Locator::Css(":root"))
            .await
            .unwrap_or_else(|e| panic!("the root element before clicking {css}: {e}"));
        let old_url = self.current_url().await;
        target
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
        let deadline = Instant::now() + READY_WITHIN;
        let mut last = String::from("still the old page");
        loop {
            match old_root.tag_name().await {
                // Still the old document: the navigation has not committed.
                Ok(_) => {}
                Err(e) if e.is_stale_element_reference() || e.is_no_such_element() => break,
                // Chromedriver can fail a command while a document is being
                // replaced ("execution context was destroyed"): look again.
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                let source = self.client.source().await.unwrap_or_default();
                panic!(
                    "clicking {css} on {old_url} did not leave the page within \
                     {READY_WITHIN:?} ({last})\n{source}"
                );
            }
            tokio::time::sleep(POLL).await;
        }
        self.wait_for(then).await
    }

    /// Replaces the content of the input `css` with `text`.
    pub async fn fill(&self, css: &str, text: &str) {
        let input = self.wait_for(css).await;
        input
            .clear()
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        input
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// The rendered text of the element `css`.
    pub async fn text(&self, css: &str) -> String {
        self.wait_for(css)
            .await
            .text()
            .await
            .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    /// The element `css`, once it exists (at most 10 s).
    pub async fn wait_for(&self, css: &str) -> Element {
        match self
            .client
            .wait()
            .at_most(READY_WITHIN)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(element) => element,
            Err(e) => {
                let url = self.client.current_url().await.map(|u| u.to_string());
                let source = self.client.source().await.unwrap_or_default();
                panic!("no element {css} within {READY_WITHIN:?} on {url:?}: {e}\n{source}")
            }
        }
    }

    pub async fn current_url(&self) -> String {
        self.client
            .current_url()
            .await
            .unwrap_or_else(|e| panic!("current_url: {e}"))
            .to_string()
    }

    /// Ends the WebDriver session (Chromium quits), then chromedriver.
    pub async fn close(self) {
        let Browser { client, driver } = self;
        let _ = client.close().await;
        // Ends chromedriver and anything left of its process group.
        drop(driver);
    }
}

impl Driver {
    /// Polls until chromedriver accepts connections on `port`.
    fn wait_until_listening(&mut self, port: u16) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(250)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("chromedriver exited ({status}):\n{}", self.log());
            }
            if Instant::now() >= deadline {
                panic!(
                    "chromedriver did not listen on {addr} within {READY_WITHIN:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of chromedriver's log, for failure messages.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("chromedriver.log"))
            .unwrap_or_else(|e| format!("(no chromedriver log: {e})"));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole process group: chromedriver and the Chromium it started.
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}
