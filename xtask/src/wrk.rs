//! The one wrk driver of `cargo xtask bench` and `cargo xtask soak`: a Lua script that presents
//! a different valid key on every request and ends with a JSON summary, and the code that runs
//! wrk with it and reads that summary.

use crate::Result;
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Each request is a GET of the URL's path carrying the next key of the file `$KW_KEYS` (one a
/// line; each thread starts at a random one) in `x-api-key`. With `$KW_DELAY_MS`, each
/// connection waits that long before each request (a paced, open-loop rate). At the end, one
/// line: `KWJSON {…}`, the counts and the latency percentiles in µs.
const SCRIPT: &str = r#"
local keys = {}
for line in io.lines(os.getenv("KW_KEYS")) do keys[#keys + 1] = line end
local i = math.random(#keys)
request = function()
  i = i % #keys + 1
  return wrk.format("GET", wrk.path, {["x-api-key"] = keys[i]})
end
local pace = tonumber(os.getenv("KW_DELAY_MS"))
if pace then
  delay = function() return pace end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("KWJSON {\"requests\":%d,\"duration_us\":%d,\"errors\":%d,\"non2xx\":%d,\"p50\":%d,\"p99\":%d}\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"#;

/// One wrk run against Envoy on loopback.
pub struct Load<'a> {
    pub port: u16,
    pub path: &'a str,
    /// The keys to present, one a line.
    pub keys: &'a Path,
    pub threads: u32,
    pub connections: u32,
    pub secs: u64,
    /// Milliseconds each connection waits before each request; `None` for a closed loop.
    pub delay_ms: Option<u32>,
    /// Run wrk under `taskset -c <cpus>`.
    pub cpus: Option<&'a str>,
}

/// What wrk's `done` reported.
#[derive(Debug, Clone)]
pub struct Summary {
    pub requests: u64,
    pub duration_us: u64,
    /// Connect, read, write and timeout errors.
    pub errors: u64,
    /// Answers with a status other than 2xx or 3xx.
    pub non2xx: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// The JSON as wrk printed it, for messages.
    json: String,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.json)
    }
}

/// wrk with the script written once into a directory.
pub struct Wrk {
    script: PathBuf,
}

/// A wrk started in the background; [`Running::finish`] waits for its summary.
pub struct Running {
    child: Child,
}

impl Wrk {
    /// Writes the script into `dir`.
    pub fn new(dir: &Path) -> Result<Wrk> {
        let script = dir.join("keyward-wrk.lua");
        std::fs::write(&script, SCRIPT).map_err(|e| format!("{}: {e}", script.display()))?;
        Ok(Wrk { script })
    }

    /// Runs `load` to its end and returns wrk's summary.
    pub fn run(&self, load: &Load) -> Result<Summary> {
        self.start(load)?.finish()
    }

    /// Starts `load` and returns at once.
    pub fn start(&self, load: &Load) -> Result<Running> {
        let mut cmd = match load.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus, "wrk"]);
                c
            }
            None => Command::new("wrk"),
        };
        cmd.args([format!("-t{}", load.threads), format!("-c{}", load.connections), format!("-d{}s", load.secs)])
            .arg("-s")
            .arg(&self.script)
            .arg(format!("http://127.0.0.1:{}{}", load.port, load.path))
            .env("KW_KEYS", load.keys)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(d) = load.delay_ms {
            cmd.env("KW_DELAY_MS", d.to_string());
        }
        let child = cmd.spawn().map_err(|e| format!("cannot run wrk: {e}"))?;
        Ok(Running { child })
    }
}

impl Running {
    /// Waits for wrk to end and reads its summary.
    pub fn finish(self) -> Result<Summary> {
        let out = self.child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find_map(|l| l.strip_prefix("KWJSON ")).ok_or_else(|| format!("wrk said: {text}{}", String::from_utf8_lossy(&out.stderr)))?;
        parse_summary(line)
    }
}

fn parse_summary(line: &str) -> Result<Summary> {
    let v: Value = serde_json::from_str(line)?;
    let field = |k: &str| v[k].as_u64().ok_or_else(|| format!("wrk's summary has no {k}: {line}"));
    Ok(Summary {
        requests: field("requests")?,
        duration_us: field("duration_us")?,
        errors: field("errors")?,
        non2xx: field("non2xx")?,
        p50_us: field("p50")?,
        p99_us: field("p99")?,
        json: line.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_is_read_field_by_field() {
        let line = r#"{"requests":1200,"duration_us":1000500,"errors":1,"non2xx":2,"p50":310,"p99":980}"#;
        let s = parse_summary(line).unwrap();
        assert_eq!((s.requests, s.duration_us, s.errors, s.non2xx, s.p50_us, s.p99_us), (1200, 1_000_500, 1, 2, 310, 980));
        assert_eq!(s.to_string(), line);
        assert!(parse_summary(r#"{"requests":1}"#).unwrap_err().to_string().contains("no duration_us"));
    }
}
