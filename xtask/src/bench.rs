//! `cargo xtask bench`: keyward side by side with every alternative, in one run, on the same
//! Envoy 1.40 binary, the same proxied route and the same upstream.
//!
//! Method: each Envoy under test runs with `--concurrency 1`, pinned to CPU 0; `wrk`, the
//! upstream (a direct-response Envoy), the ext_authz server and `keyward serve` share CPU 1.
//! After a warm-up, every configuration runs once per round in rotating order; each run
//! measures throughput (closed loop) and then latency at a fixed moderate rate. Envoy's CPU
//! time comes from `/proc/<pid>/stat`. Ratios are computed per round, then the median is taken.

use keyward_core::{keyformat, Digest};
use keyward_testkit::{auth_server, listener_bootstrap, loopback_cluster, poll_until, request, Envoy, EnvoyOptions, Keyward, TempDir};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

type Result<T = ()> = std::result::Result<T, String>;

/// Where BENCHMARKS.md's soak section starts; a bench run rewrites everything above it.
pub const SOAK_MARKER: &str = "<!-- soak: written by `cargo xtask soak`, kept by `cargo xtask bench` -->";

pub struct Options {
    pub quick: bool,
    /// Where the report goes.
    pub out: PathBuf,
}

struct Plan {
    rounds: usize,
    throughput_secs: u32,
    latency_secs: u32,
    /// Keys loaded for configurations 6, 7 and 8.
    sizes: [usize; 3],
    /// Requests per second of the latency runs.
    moderate_rate: u32,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan { rounds: 2, throughput_secs: 1, latency_secs: 1, sizes: [1_000, 5_000, 10_000], moderate_rate: 500 }
        } else {
            Plan { rounds: 7, throughput_secs: 3, latency_secs: 2, sizes: [1_000, 100_000, 1_000_000], moderate_rate: 1_000 }
        }
    }
}

/// Deterministic keyward-format keys (valid checksums), so every run presents the same set.
pub(crate) fn keys(n: usize, salt: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            let seed = Digest::of(format!("bench {salt} {i}").as_bytes());
            let bytes = seed.0.iter().chain(Digest::of(&seed.0).0.iter()).copied().collect::<Vec<u8>>();
            keyformat::generate("kw_live", bytes.into_iter().cycle()).unwrap_or_default()
        })
        .collect()
}

/// A bootstrap with one listener through `filters` (then the router) to the `upstream` cluster.
fn bootstrap(node: &str, filters: Vec<Value>, clusters: Vec<Value>) -> Value {
    let routes = json!([{"name": "bench", "match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]);
    listener_bootstrap(node, routes, filters, clusters)
}

fn wasm(name: &str, file: &Path, config: &Value) -> Value {
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name, "root_id": name,
                "vm_config": {"vm_id": name, "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": file.display().to_string()}}},
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": config.to_string()},
                "failure_policy": "FAIL_RELOAD"
            }
        }
    })
}

fn api_key_auth(keys: &[String]) -> Value {
    let credentials: Vec<Value> = keys.iter().enumerate().map(|(i, k)| json!({"key": k, "client": format!("client-{i}")})).collect();
    json!({
        "name": "envoy.filters.http.api_key_auth",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
            "credentials": credentials,
            "key_sources": [{"header": "x-api-key"}]
        }
    })
}

fn lua(keys: &[String]) -> Value {
    let mut code = String::from("local keys = {\n");
    for k in keys {
        let _ = writeln!(code, "  [\"{k}\"] = true,");
    }
    code.push_str(
        "}\nfunction envoy_on_request(handle)\n  local key = handle:headers():get(\"x-api-key\")\n  if key == nil or not keys[key] then\n    handle:respond({[\":status\"] = \"401\"}, \"invalid key\")\n  end\nend\n",
    );
    json!({
        "name": "envoy.filters.http.lua",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua", "default_source_code": {"inline_string": code}}
    })
}

fn ext_authz() -> Value {
    json!({
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "http_service": {
                "server_uri": {"uri": "http://127.0.0.1", "cluster": "authz", "timeout": "1s"},
                "authorization_request": {"allowed_headers": {"patterns": [{"exact": "x-api-key"}]}}
            },
            "transport_api_version": "V3"
        }
    })
}

/// The upstream every configuration proxies to: an Envoy answering 200 itself, on CPU 1.
fn upstream() -> Result<Envoy> {
    let routes = json!([{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]);
    let config = listener_bootstrap("upstream", routes, vec![], vec![]);
    start(config, 1, "1")
}

fn start(config: Value, concurrency: u32, cpus: &str) -> Result<Envoy> {
    let mut opts = EnvoyOptions::new(json!({}), 0);
    opts.bootstrap = Some(config);
    opts.concurrency = concurrency;
    opts.pin_cpus = Some(cpus.to_string());
    opts.extra_args = vec!["--component-log-level".into(), "wasm:info".into()];
    Envoy::try_start(&opts).map_err(|f| format!("Envoy did not start ({:?}):\n{}", f.status, f.log))
}

/// One configuration under test.
struct Subject {
    name: String,
    envoy: Envoy,
    /// The keys wrk presents (a sample of the loaded set for the largest).
    keys_file: PathBuf,
    start_secs: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rps: f64,
    cpu_us: f64,
    p50_us: f64,
    p99_us: f64,
}

fn wrk_scripts(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let common = r#"
local keys = {}
for line in io.lines(os.getenv("KW_KEYS")) do keys[#keys + 1] = line end
local i = math.random(#keys)
request = function()
  i = i % #keys + 1
  return wrk.format("GET", "/bench", {["x-api-key"] = keys[i]})
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("KWJSON {\"requests\":%d,\"duration_us\":%d,\"errors\":%d,\"non2xx\":%d,\"p50\":%d,\"p99\":%d}\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"#;
    let throughput = dir.join("throughput.lua");
    let paced = dir.join("paced.lua");
    std::fs::write(&throughput, common).map_err(|e| e.to_string())?;
    let pacing = "\nlocal pace = tonumber(os.getenv(\"KW_DELAY_MS\"))\ndelay = function() return pace end\n";
    std::fs::write(&paced, format!("{common}{pacing}")).map_err(|e| e.to_string())?;
    Ok((throughput, paced))
}

fn wrk(script: &Path, keys: &Path, port: u16, connections: u32, secs: u32, delay_ms: Option<u32>) -> Result<Value> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1", "wrk", "-t1", &format!("-c{connections}"), &format!("-d{secs}s"), "-s"])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/bench"))
        .env("KW_KEYS", keys);
    if let Some(d) = delay_ms {
        cmd.env("KW_DELAY_MS", d.to_string());
    }
    let out = cmd.output().map_err(|e| format!("cannot run wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("KWJSON ")).ok_or_else(|| format!("wrk said: {text}{}", String::from_utf8_lossy(&out.stderr)))?;
    serde_json::from_str(line).map_err(|e| e.to_string())
}

fn measure(s: &Subject, plan: &Plan, scripts: &(PathBuf, PathBuf)) -> Result<Sample> {
    let cpu0 = s.envoy.cpu_seconds();
    let t = wrk(&scripts.0, &s.keys_file, s.envoy.port, 16, plan.throughput_secs, None)?;
    let cpu1 = s.envoy.cpu_seconds();
    let requests = t["requests"].as_f64().unwrap_or(0.0);
    let non2xx = t["non2xx"].as_u64().unwrap_or(0) + t["errors"].as_u64().unwrap_or(0);
    if requests == 0.0 || non2xx > 0 {
        return Err(format!("{}: {non2xx} failed requests of {requests}: {t}", s.name));
    }
    let rps = requests / (t["duration_us"].as_f64().unwrap_or(1.0) / 1e6);
    let connections = 8;
    let delay_ms = connections * 1000 / plan.moderate_rate;
    let l = wrk(&scripts.1, &s.keys_file, s.envoy.port, connections, plan.latency_secs, Some(delay_ms))?;
    Ok(Sample { rps, cpu_us: (cpu1 - cpu0) * 1e6 / requests, p50_us: l["p50"].as_f64().unwrap_or(0.0), p99_us: l["p99"].as_f64().unwrap_or(0.0) })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn write_keys(dir: &Path, name: &str, keys: &[String], max: usize) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.keys"));
    let step = keys.len().div_ceil(max).max(1);
    let body: String = keys.iter().step_by(step).map(|k| format!("{k}\n")).collect();
    std::fs::write(&path, body).map_err(|e| e.to_string())?;
    Ok(path)
}

/// A `keyward serve` with `keys` imported for one agent (`rate` adds a per-key limit), and the
/// ids of the imported keys in the same order.
pub(crate) fn control_plane(keys: &[String], rate: Option<&str>) -> Result<(Keyward, Vec<String>)> {
    let keyward = Keyward::start();
    keyward.cli(&["agent", "create", "bench", "--scopes", "read:all"]);
    let mut ids = Vec::new();
    if !keys.is_empty() {
        let mut args = vec!["key", "import", "--agent", "bench", "--batch", "--json"];
        if let Some(r) = rate {
            args.extend(["--rate", r]);
        }
        let lines: String = keys.iter().map(|k| format!("{k}\n")).collect();
        let out: Value = serde_json::from_str(&keyward.cli_stdin(&args, &lines)).map_err(|e| e.to_string())?;
        ids = out["ids"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()).unwrap_or_default();
    }
    Ok((keyward, ids))
}

pub fn run(opts: &Options) -> Result {
    let plan = Plan::new(opts.quick);
    let dir = TempDir::new("bench").map_err(|e| e.to_string())?;
    let scripts = wrk_scripts(dir.path())?;
    let t_total = Instant::now();
    eprintln!("bench: generating keys");
    let small = keys(plan.sizes[0], "a");
    let mid = keys(plan.sizes[1], "b");
    let large = keys(plan.sizes[2], "c");
    let up = upstream()?;
    let up_port = up.port;
    let authz = auth_server(small.iter().cloned().collect()).map_err(|e| e.to_string())?;

    let mut subjects: Vec<Subject> = Vec::new();
    let small_file = write_keys(dir.path(), "small", &small, 100_000)?;
    let plain = |name: &str, filters: Vec<Value>, extra: Vec<Value>| -> Result<Subject> {
        let mut clusters = vec![loopback_cluster("upstream", up_port)];
        clusters.extend(extra);
        let started = Instant::now();
        let envoy = start(bootstrap(name, filters, clusters), 1, "0")?;
        Ok(Subject { name: name.to_string(), envoy, keys_file: small_file.clone(), start_secs: started.elapsed().as_secs_f64() })
    };
    eprintln!("bench: starting the five reference configurations");
    subjects.push(plain("1 no auth filter", vec![], vec![])?);
    let noop = keyward_testkit::workspace_root().join("target/wasm32-wasip1/release/noop.wasm");
    subjects.push(plain("2 no-op wasm (floor)", vec![wasm("noop", &noop, &json!({}))], vec![])?);
    subjects.push(plain("3 api_key_auth", vec![api_key_auth(&small)], vec![])?);
    subjects.push(plain("4 Lua lookup", vec![lua(&small)], vec![])?);
    subjects.push(plain("5 ext_authz (HTTP)", vec![ext_authz()], vec![loopback_cluster("authz", authz.port())])?);

    let mut serves = Vec::new();
    let mut apply_ms = Vec::new();
    for (i, (set, scoped)) in [(&small, false), (&mid, false), (&large, true)].into_iter().enumerate() {
        let n = set.len();
        eprintln!("bench: loading {n} keys into keyward serve");
        let t = Instant::now();
        let (serve, ids) = control_plane(set, scoped.then_some("1000000/s"))?;
        let import_s = t.elapsed().as_secs_f64();
        let label = if scoped { format!("{} keyward, {n} keys, scopes + rate limit", 6 + i) } else { format!("{} keyward, {n} keys", 6 + i) };
        let node = format!("bench-{n}");
        // Fix the upstream port in the bootstrap after the fact.
        let (envoy, ready) = {
            let mut config = json!({"control_plane": {"cluster": "keyward", "feed_wait_secs": 15}});
            if scoped {
                config["rules"] = json!([{"methods": ["GET"], "scopes": ["read:all"]}]);
                config["rate_limit_burst"] = json!("limit");
            }
            let boot = bootstrap(&node, vec![wasm("keyward", &keyward_testkit::wasm_path(), &config)], vec![loopback_cluster("upstream", up_port), loopback_cluster("keyward", serve.port)]);
            let started = Instant::now();
            let envoy = start(boot, 1, "0")?;
            let ready = started.elapsed().as_secs_f64();
            poll_until(Duration::from_secs(900), "the snapshot to be applied", || {
                let status = serve.api_get("/v1/status");
                let e = status["envoys"].as_array()?.iter().find(|e| e["id"] == node.as_str())?.clone();
                (e["applied_version"] == status["snapshot_version"]).then_some(())
            });
            (envoy, ready)
        };
        let log = envoy.log();
        let applied = log.lines().find_map(|l| l.split("full snapshot version ").nth(1)?.split(" applied in ").nth(1)?.split(' ').next()?.parse::<f64>().ok()).unwrap_or(f64::NAN);
        apply_ms.push((n + 1, applied, import_s));
        let keys_file = write_keys(dir.path(), &format!("set{i}"), set, 100_000)?;
        subjects.push(Subject { name: label, envoy, keys_file, start_secs: ready });
        serves.push((serve, ids, set.clone()));
    }

    eprintln!("bench: warm-up");
    for s in &subjects {
        wrk(&scripts.0, &s.keys_file, s.envoy.port, 16, 1, None)?;
    }
    let n = subjects.len();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); n];
    for round in 0..plan.rounds {
        eprintln!("bench: round {} of {}", round + 1, plan.rounds);
        for k in 0..n {
            let i = (round + k) % n;
            samples[i].push(measure(&subjects[i], &plan, &scripts)?);
        }
    }

    eprintln!("bench: scale measurements");
    let scale = scale(&small, &mid, &large, up_port)?;
    let propagation = propagation(&serves, &subjects[5..])?;
    let instructions = if plan.rounds >= 7 {
        let rated = keys(1_000, "r");
        let (serve_rated, _) = control_plane(&rated, Some("1000000/s"))?;
        let sets = [(&serves[0].0, &small), (&serves[1].0, &mid)];
        instructions_table(up_port, &noop, sets, (&serve_rated, &rated))?
    } else {
        Vec::new()
    };
    drop(up);
    drop(authz);

    let mut report = report(&plan, &subjects, &samples, &apply_ms, &scale, &propagation, t_total.elapsed());
    report.push_str(&rate_error_section());
    report.push_str(&instruction_report(&instructions));
    print!("{report}");
    // The soak's section (`cargo xtask soak`, pasted below the marker) outlives a new bench run.
    let kept = std::fs::read_to_string(&opts.out)
        .ok()
        .and_then(|old| old.find(SOAK_MARKER).map(|at| old[at..].to_string()))
        .unwrap_or_default();
    let report = if kept.is_empty() { report } else { format!("{}\n{kept}", report.trim_end()) };
    std::fs::write(&opts.out, &report).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    eprintln!("bench: wrote {} in {:.0} s", opts.out.display(), t_total.elapsed().as_secs_f64());
    Ok(())
}

/// The callgrind table's configurations: no filter, the no-op floor, and keyward fed 1,000 and
/// 100,000 keys by `sets` (each a serve and the keys it holds; the first five may be revoked),
/// and 1,000 keys with a per-key limit never reached (`rated`: the rate-limit path, admitted).
fn instructions_table(up_port: u16, noop: &Path, sets: [(&Keyward, &Vec<String>); 2], rated: (&Keyward, &Vec<String>)) -> Result<Vec<(String, f64)>> {
    eprintln!("bench: instructions per request (callgrind)");
    let feed = |serve: &Keyward| {
        let config = json!({"control_plane": {"cluster": "keyward", "feed_wait_secs": 15}});
        bootstrap("bench-cg", vec![wasm("keyward", &keyward_testkit::wasm_path(), &config)], vec![loopback_cluster("upstream", up_port), loopback_cluster("keyward", serve.port)])
    };
    let small = sets[0].1;
    let mut configs = vec![
        ("1 no auth filter".to_string(), bootstrap("cg", vec![], vec![loopback_cluster("upstream", up_port)]), small[5..].to_vec()),
        ("2 no-op wasm (floor)".to_string(), bootstrap("cg", vec![wasm("noop", noop, &json!({}))], vec![loopback_cluster("upstream", up_port)]), small[5..].to_vec()),
    ];
    for (i, (serve, set)) in sets.into_iter().enumerate() {
        // The propagation measurement revoked the first five keys of each set.
        configs.push((format!("{} keyward, {} keys", 6 + i, set.len()), feed(serve), set[5..].to_vec()));
    }
    configs.push((format!("9 keyward, {} keys, rate-limited", rated.1.len()), feed(rated.0), rated.1[5..].to_vec()));
    instruction_counts(configs)
}

/// `cargo xtask bench --instructions`: only the callgrind table, written over that section of
/// `out` (the rest of the file is kept).
pub fn run_instructions(out: &Path) -> Result {
    let up = upstream()?;
    let small = keys(1_000, "a");
    let mid = keys(100_000, "b");
    let (serve_small, _) = control_plane(&small, None)?;
    let (serve_mid, _) = control_plane(&mid, None)?;
    let rated = keys(1_000, "r");
    let (serve_rated, _) = control_plane(&rated, Some("1000000/s"))?;
    let noop = keyward_testkit::workspace_root().join("target/wasm32-wasip1/release/noop.wasm");
    let counts = instructions_table(up.port, &noop, [(&serve_small, &small), (&serve_mid, &mid)], (&serve_rated, &rated))?;
    let section = instruction_report(&counts);
    print!("{section}");
    let old = std::fs::read_to_string(out).unwrap_or_default();
    let start = old.find(INSTRUCTIONS_HEADING).map(|i| old[..i].trim_end().len()).unwrap_or(old.find(SOAK_MARKER).unwrap_or(old.len()));
    let end = old.find(SOAK_MARKER).unwrap_or(old.len()).max(start);
    let new = format!("{}\n\n{}\n\n{}", old[..start].trim_end(), section.trim(), &old[end..]);
    std::fs::write(out, new.trim_start()).map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!("bench: wrote the instructions section of {}", out.display());
    Ok(())
}

const INSTRUCTIONS_HEADING: &str = "## Instructions per request (callgrind)";
const RATE_HEADING: &str = "## Rate-limit accuracy";

/// `cargo xtask bench --rate-error`: only the rate-limit accuracy table (a pure simulation of
/// the core's limiter, a few seconds), written over that section of `out`.
// Until main.rs dispatches `--rate-error` here, only the ignored test below calls it.
pub fn run_rate_error(out: &Path) -> Result {
    let section = rate_error_section();
    print!("{section}");
    let old = std::fs::read_to_string(out).unwrap_or_default();
    let new = match old.find(RATE_HEADING) {
        Some(start) => {
            let end = old[start + RATE_HEADING.len()..].find("\n## ").map_or(old.len(), |i| start + RATE_HEADING.len() + i);
            let end = old[start..end].find(SOAK_MARKER).map_or(end, |i| start + i);
            format!("{}\n\n{}\n\n{}", old[..start].trim_end(), section.trim(), old[end..].trim_start())
        }
        None => {
            let at = old.find(INSTRUCTIONS_HEADING).or_else(|| old.find(SOAK_MARKER)).unwrap_or(old.len());
            format!("{}\n\n{}\n\n{}", old[..at].trim_end(), section.trim(), &old[at..])
        }
    };
    std::fs::write(out, new.trim_start()).map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!("bench: wrote the rate-limit accuracy section of {}", out.display());
    Ok(())
}

/// One simulated arrival pattern: arrival times (µs) over `windows` periods of a limit of `n`.
struct Pattern {
    name: &'static str,
    arrivals: fn(n: u64, period: u64, windows: u64, rng: &mut Rng) -> Vec<u64>,
}

/// xorshift64*: deterministic, so the table is the same on every run.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn paced(n: u64, period: u64, windows: u64, factor: f64) -> Vec<u64> {
    let gap = period as f64 / (n as f64 * factor);
    (0..).map(|i| (i as f64 * gap) as u64).take_while(|&t| t < windows * period).collect()
}

fn poisson(n: u64, period: u64, windows: u64, factor: f64, rng: &mut Rng) -> Vec<u64> {
    let mean = period as f64 / (n as f64 * factor);
    let mut t = 0.0;
    let mut out = Vec::new();
    loop {
        t += -mean * (1.0 - rng.unit()).ln();
        if t >= (windows * period) as f64 {
            return out;
        }
        out.push(t as u64);
    }
}

const PATTERNS: [Pattern; 6] = [
    Pattern { name: "paced at the limit", arrivals: |n, p, w, _| paced(n, p, w, 1.0) },
    Pattern { name: "paced at 2× the limit", arrivals: |n, p, w, _| paced(n, p, w, 2.0) },
    Pattern {
        name: "N just before and N just after each window edge",
        arrivals: |n, p, w, _| (1..w).flat_map(|k| (0..n).map(move |_| k * p - 1_000).chain((0..n).map(move |_| k * p + 1_000))).collect(),
    },
    Pattern {
        name: "bursts of N/4 at random times, 1× on average",
        arrivals: |n, p, w, rng| {
            let mut out: Vec<u64> = poisson(4, p, w, 1.0, rng).into_iter().flat_map(|t| std::iter::repeat_n(t, (n / 4).max(1) as usize)).collect();
            out.sort_unstable();
            out
        },
    },
    Pattern { name: "Poisson at the limit", arrivals: |n, p, w, rng| poisson(n, p, w, 1.0, rng) },
    Pattern { name: "Poisson at 2× the limit", arrivals: |n, p, w, rng| poisson(n, p, w, 2.0, rng) },
];

/// The exact sliding-window answer: admit iff fewer than `n` admissions in `(t - period, t]`.
fn exact_admissions(arrivals: &[u64], n: u64, period: u64) -> Vec<u64> {
    let mut admitted: Vec<u64> = Vec::new();
    let mut oldest = 0;
    for &t in arrivals {
        while oldest < admitted.len() && admitted[oldest] + period <= t {
            oldest += 1;
        }
        if ((admitted.len() - oldest) as u64) < n {
            admitted.push(t);
        }
    }
    admitted
}

fn keyward_admissions(arrivals: &[u64], limit: keyward_core::RateLimit) -> Vec<u64> {
    use keyward_core::ratelimit::{admit, Burst, Verdict, Window};
    let mut w = Window::default();
    arrivals.iter().copied().filter(|&t| matches!(admit(t, &mut w, limit, Burst::Limit), Verdict::Allow { .. })).collect()
}

/// The most admissions in any window `(t - period, t]`.
fn most_in_a_window(admitted: &[u64], period: u64) -> usize {
    let mut most = 0;
    let mut start = 0;
    for (end, &t) in admitted.iter().enumerate() {
        while admitted[start] + period <= t {
            start += 1;
        }
        most = most.max(end + 1 - start);
    }
    most
}

/// Rows of the table: (pattern, N, exact, keyward, most in a window).
fn rate_error_rows() -> Vec<(&'static str, u64, usize, usize, usize)> {
    const WINDOWS: u64 = 200;
    let mut rows = Vec::new();
    for pattern in &PATTERNS {
        for (n, period_secs) in [(10u32, 1u32), (60, 60), (1000, 3600)] {
            let limit = keyward_core::RateLimit { count: n, period_secs };
            let period = u64::from(period_secs) * 1_000_000;
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(n));
            let arrivals = (pattern.arrivals)(u64::from(n), period, WINDOWS, &mut rng);
            let exact = exact_admissions(&arrivals, u64::from(n), period);
            let ours = keyward_admissions(&arrivals, limit);
            rows.push((pattern.name, u64::from(n), exact.len(), ours.len(), most_in_a_window(&ours, period)));
        }
    }
    rows
}

fn rate_error_section() -> String {
    let mut r = format!(
        "\n{RATE_HEADING}\n\nThe core's limiter (`keyward_core::ratelimit::admit`, {} slots: {} sub-windows per period, \
         burst = N) against the exact sliding-window answer (admit a request iff fewer than N were admitted in the \
         window of the limit's length that ends with it), over 200 windows of simulated arrivals per row \
         (deterministic; `cargo xtask bench --rate-error`). \"most in a window\" is the largest number admitted \
         in any window of the limit's length, over every window: never above N. The difference is under-admission: \
         a request counts until the last one of its sub-window is a period old.\n\n\
         | arrivals | limit | admitted, exact | admitted, keyward | difference | most in a window |\n|---|---|---:|---:|---:|---:|\n",
        keyward_core::ratelimit::SLOTS,
        keyward_core::ratelimit::SLOTS - 1
    );
    for (name, n, exact, ours, most) in rate_error_rows() {
        let unit = match n {
            10 => "10/s",
            60 => "60/min",
            _ => "1000/h",
        };
        let diff = (ours as f64 - exact as f64) / exact.max(1) as f64 * 100.0;
        let _ = writeln!(r, "| {name} | {unit} | {exact} | {ours} | {diff:+.1}% | {most} (N = {n}) |");
    }
    r
}

/// Requests measured per configuration under callgrind.
const CG_REQUESTS: usize = 2_000;

/// Sends `n` keep-alive GETs, each with the next key, and checks each answer is 200.
fn keepalive_requests(port: u16, keys: &[String], n: usize) -> Result {
    use std::io::{BufRead, BufReader, Read, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    for i in 0..n {
        let key = &keys[i % keys.len()];
        write!(writer, "GET /bench HTTP/1.1\r\nhost: bench\r\nx-api-key: {key}\r\n\r\n").map_err(|e| e.to_string())?;
        let mut status = String::new();
        reader.read_line(&mut status).map_err(|e| e.to_string())?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).map_err(|e| e.to_string())?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).map_err(|e| e.to_string())?;
        if !status.contains(" 200 ") {
            return Err(format!("request {i}: {}", status.trim()));
        }
    }
    Ok(())
}

/// Instructions Envoy executes per request (all threads, user space), counted by callgrind over
/// `CG_REQUESTS` keep-alive requests after a warm-up: deterministic to well under 1% on a noisy
/// machine, where CPU time swings tenfold. It leaves out the kernel (sockets), which CPU time
/// includes, so its ratios are larger than CPU-time ratios.
fn instruction_counts(configs: Vec<(String, Value, Vec<String>)>) -> Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for (name, boot, keys) in configs {
        let dir = TempDir::new("callgrind").map_err(|e| e.to_string())?;
        let file = dir.path().join("cg.out");
        let mut opts = EnvoyOptions::new(json!({}), 0);
        opts.bootstrap = Some(boot);
        opts.concurrency = 1;
        opts.pin_cpus = Some("0".into());
        opts.wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--smc-check=all-non-file"].map(String::from).to_vec();
        opts.wrapper.push(format!("--callgrind-out-file={}", file.display()));
        let envoy = Envoy::try_start(&opts).map_err(|f| format!("{name} under valgrind did not start: {}", f.log))?;
        poll_until(Duration::from_secs(900), "the keys under callgrind", || {
            (request(envoy.port, "GET", "/bench", &[("x-api-key", keys[0].as_bytes())]).ok()?.status == 200).then_some(())
        });
        keepalive_requests(envoy.port, &keys, 300)?;
        let pid = envoy.pid().to_string();
        let control = |args: &[&str]| -> Result {
            let out = Command::new("callgrind_control").args(args).arg(&pid).output().map_err(|e| format!("callgrind_control: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("callgrind_control {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
            }
        };
        let dumped = |n: u32| -> u64 {
            let text = std::fs::read_to_string(format!("{}.{n}", file.display())).unwrap_or_default();
            text.lines().filter_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:"))).filter_map(|v| v.trim().parse().ok()).max().unwrap_or(0)
        };
        // Phase 1: the requests. Phase 2: as long again with no requests, to subtract what the
        // timers cost meanwhile (under valgrind a request takes ~50× longer, so a filter's
        // periodic work would otherwise be charged to its requests ~50× over).
        control(&["-i", "on"])?;
        let t = Instant::now();
        keepalive_requests(envoy.port, &keys, CG_REQUESTS)?;
        let busy_secs = t.elapsed().as_secs_f64();
        control(&["-i", "off"])?;
        control(&["-d"])?;
        control(&["-i", "on"])?;
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(busy_secs.max(2.0)));
        let idle_secs = t.elapsed().as_secs_f64();
        control(&["-i", "off"])?;
        control(&["-d"])?;
        std::thread::sleep(Duration::from_secs(1));
        let (busy, idle) = (dumped(1), dumped(2));
        if busy == 0 {
            return Err(format!("{name}: callgrind counted nothing"));
        }
        let total = (busy as f64 - idle as f64 / idle_secs * busy_secs).max(0.0);
        eprintln!("bench: {name}: {busy} instructions in {busy_secs:.1} s of requests, {idle} in {idle_secs:.1} s idle");
        let per = total / CG_REQUESTS as f64;
        eprintln!("bench: {name}: {per:.0} instructions per request");
        out.push((name, per));
        drop(envoy);
    }
    Ok(out)
}

fn instruction_report(counts: &[(String, f64)]) -> String {
    if counts.is_empty() {
        return String::new();
    }
    let floor = counts.iter().find(|(n, _)| n.starts_with("2 ")).map_or(f64::NAN, |(_, v)| *v);
    let mut r = String::from(
        "\n## Instructions per request (callgrind)\n\nEnvoy `--concurrency 1` under `valgrind --tool=callgrind`, \
         instructions in user space over 2,000 keep-alive requests after a warm-up, less what the \
         same Envoy executes idle for as long (timers: keyward's 25 ms tick) (repeatable to 0.3% \
         here, whatever the machine's load; the kernel's share of a request, which CPU time includes, \
         is not counted, so these ratios are larger than the CPU-time ones). Keyward runs in feed \
         mode; with 1,000 keys every key is in each VM's record cache, with 100,000 keys cycled \
         in order none is.\n\n| configuration | instructions per request | vs no-op wasm |\n|---|---:|---:|\n",
    );
    for (name, v) in counts {
        let _ = writeln!(r, "| {name} | {v:.0} | {:.2}× |", v / floor);
    }
    r
}

struct Scale {
    /// (keys, RSS MiB at concurrency 1, RSS MiB at concurrency 2)
    memory: Vec<(usize, f64, f64)>,
}

fn rss_mib(e: &Envoy) -> f64 {
    std::thread::sleep(Duration::from_millis(300));
    e.rss_bytes() as f64 / 1_048_576.0
}

fn scale(small: &[String], mid: &[String], large: &[String], up_port: u16) -> Result<Scale> {
    let mut memory = Vec::new();
    let sets: [&[String]; 4] = [&[], small, mid, large];
    for set in sets {
        let (serve, _) = control_plane(set, None)?;
        let mut rss = [0.0; 2];
        for (slot, concurrency) in [1u32, 2].into_iter().enumerate() {
            let node = format!("scale-{}-{concurrency}", set.len());
            let config = json!({"control_plane": {"cluster": "keyward", "feed_wait_secs": 15}});
            let boot = bootstrap(&node, vec![wasm("keyward", &keyward_testkit::wasm_path(), &config)], vec![loopback_cluster("upstream", up_port), loopback_cluster("keyward", serve.port)]);
            let envoy = start(boot, concurrency, if concurrency == 1 { "0" } else { "0,1" })?;
            poll_until(Duration::from_secs(900), "the snapshot to be applied", || {
                let status = serve.api_get("/v1/status");
                let e = status["envoys"].as_array()?.iter().find(|e| e["id"] == node.as_str())?.clone();
                (e["applied_version"] == status["snapshot_version"]).then_some(())
            });
            rss[slot] = rss_mib(&envoy);
        }
        memory.push((set.len(), rss[0], rss[1]));
    }
    Ok(Scale { memory })
}

/// Revokes keys of the running control planes and times the refusal at the Envoy under test.
fn propagation(serves: &[(Keyward, Vec<String>, Vec<String>)], subjects: &[Subject]) -> Result<Vec<(usize, f64)>> {
    let mut out = Vec::new();
    for ((serve, ids, keys), subject) in serves.iter().zip(subjects) {
        let mut times = Vec::new();
        for (id, key) in ids.iter().zip(keys).take(5) {
            let t0 = Instant::now();
            serve.api_post(&format!("/v1/keys/{id}/revoke"), &json!({}));
            poll_until(Duration::from_secs(10), "the revocation", || {
                let r = request(subject.envoy.port, "GET", "/bench", &[("x-api-key", key.as_bytes())]).ok()?;
                (r.status == 401).then_some(())
            });
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        out.push((keys.len(), median(times)));
    }
    Ok(out)
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()).unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = mem.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok()).unwrap_or(0.0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} × {model}, {:.0} GiB", total / 1_048_576.0)
}

pub(crate) fn git_commit() -> String {
    let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(keyward_testkit::workspace_root()).output();
    let dirty = Command::new("git").args(["status", "--porcelain", "--untracked-files=no"]).current_dir(keyward_testkit::workspace_root()).output();
    let rev = out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let dirty = dirty.map(|o| !o.stdout.is_empty()).unwrap_or(false);
    if dirty {
        format!("{rev} (with uncommitted changes)")
    } else {
        rev
    }
}

fn report(plan: &Plan, subjects: &[Subject], samples: &[Vec<Sample>], apply: &[(usize, f64, f64)], scale: &Scale, propagation: &[(usize, f64)], took: Duration) -> String {
    let mut r = String::new();
    let date = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let _ = writeln!(r, "# keyward benchmarks\n");
    let _ = writeln!(
        r,
        "Written by `cargo xtask bench{}` on {date}, commit {}, machine: {}. Envoy {} (`--concurrency 1`, pinned to CPU 0); wrk, the upstream (a direct-response Envoy), the ext_authz server and `keyward serve` on CPU 1. {} interleaved rounds after a warm-up; throughput: wrk, 1 thread, 16 connections, {} s; latency: 8 connections paced to {} requests/s for {} s. Every request presents a different valid key drawn from the loaded set. Took {:.0} s.\n",
        if plan.rounds < 7 { " --quick" } else { "" },
        git_commit(),
        machine(),
        keyward_testkit::ENVOY_VERSION,
        plan.rounds,
        plan.throughput_secs,
        plan.moderate_rate,
        plan.latency_secs,
        took.as_secs_f64()
    );
    let _ = writeln!(r, "## Per request\n");
    let _ = writeln!(r, "Medians over rounds. Ratios are computed per round, then the median is taken: `/1` against no filter, `/2` against the no-op wasm floor. CPU is Envoy's only (the ext_authz server's own CPU is not counted).\n");
    let _ = writeln!(r, "| configuration | req/s | /1 | /2 | Envoy CPU µs/req | /1 | /2 | p50 µs | /1 | /2 | p99 µs | /1 | /2 |");
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let ratio = |i: usize, base: usize, f: fn(&Sample) -> f64| median(samples[i].iter().zip(&samples[base]).map(|(a, b)| f(a) / f(b)).collect());
    for (i, s) in subjects.iter().enumerate() {
        let m = |f: fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
        let rps: fn(&Sample) -> f64 = |x| x.rps;
        let cpu: fn(&Sample) -> f64 = |x| x.cpu_us;
        let p50: fn(&Sample) -> f64 = |x| x.p50_us;
        let p99: fn(&Sample) -> f64 = |x| x.p99_us;
        let _ = writeln!(
            r,
            "| {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |",
            s.name,
            m(rps),
            ratio(i, 0, rps),
            ratio(i, 1, rps),
            m(cpu),
            ratio(i, 0, cpu),
            ratio(i, 1, cpu),
            m(p50),
            ratio(i, 0, p50),
            ratio(i, 1, p50),
            m(p99),
            ratio(i, 0, p99),
            ratio(i, 1, p99),
        );
    }
    let _ = writeln!(r, "\n## Scale\n");
    let _ = writeln!(r, "| keys in the snapshot | Envoy RSS, 1 worker (MiB) | Envoy RSS, 2 workers (MiB) | per extra worker (MiB) |");
    let _ = writeln!(r, "|---|---|---|---|");
    for (n, c1, c2) in &scale.memory {
        let _ = writeln!(r, "| {n} | {c1:.1} | {c2:.1} | {:.1} |", c2 - c1);
    }
    let _ = writeln!(r, "\n| keys (incl. the agent's first key) | full snapshot applied in (ms, filter log) | `key import --batch` (s) |");
    let _ = writeln!(r, "|---|---|---|");
    for (n, ms, import) in apply {
        let _ = writeln!(r, "| {n} | {ms:.0} | {import:.1} |");
    }
    let _ = writeln!(r, "\n| keys | one revocation to refusal at Envoy, median of 5 (ms) |");
    let _ = writeln!(r, "|---|---|");
    for (n, ms) in propagation {
        let _ = writeln!(r, "| {n} | {ms:.1} |");
    }
    let size = |f: &str| std::fs::metadata(keyward_testkit::workspace_root().join(f)).map(|m| m.len()).unwrap_or(0);
    let _ = writeln!(
        r,
        "\n`keyward.wasm`: {} bytes; `noop.wasm`: {} bytes. Envoy start to ready (one start each): no filter {:.2} s, no-op wasm {:.2} s, keyward (1,000 keys, before the snapshot) {:.2} s: the VM start (V8 compile and instantiate, per worker plus the main thread) is about the difference.",
        size("target/wasm32-wasip1/release/keyward.wasm"),
        size("target/wasm32-wasip1/release/noop.wasm"),
        subjects[0].start_secs,
        subjects[1].start_secs,
        subjects[5].start_secs
    );
    r
}

/// The reference configurations, for `envoy --mode validate` in the tests.
#[cfg(test)]
pub fn reference_bootstraps(keys: &[String], noop: &Path) -> Vec<(&'static str, Value)> {
    vec![
        ("no filter", bootstrap("v", vec![], vec![loopback_cluster("upstream", 1)])),
        ("noop", bootstrap("v", vec![wasm("noop", noop, &json!({}))], vec![loopback_cluster("upstream", 1)])),
        ("api_key_auth", bootstrap("v", vec![api_key_auth(keys)], vec![loopback_cluster("upstream", 1)])),
        ("lua", bootstrap("v", vec![lua(keys)], vec![loopback_cluster("upstream", 1)])),
        ("ext_authz", bootstrap("v", vec![ext_authz()], vec![loopback_cluster("upstream", 1), loopback_cluster("authz", 2)])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_never_admits_more_than_n_in_a_window_and_stays_near_the_exact_answer() {
        for (name, n, exact, ours, most) in rate_error_rows() {
            assert!(most as u64 <= n, "{name}, N = {n}: {most} in one window");
            assert!(ours <= exact && ours as f64 >= exact as f64 * 0.9, "{name}, N = {n}: {ours} against {exact}");
        }
    }

    #[test]
    fn reference_configurations_pass_envoy_validate() {
        let dir = TempDir::new("bench-validate").unwrap();
        let noop = keyward_testkit::workspace_root().join("target/wasm32-wasip1/release/noop.wasm");
        for (name, config) in reference_bootstraps(&keys(3, "v"), &noop) {
            if name == "noop" && !noop.is_file() {
                continue; // Built by `cargo xtask bench`; the other four need nothing.
            }
            let file = dir.path().join(format!("{name}.json"));
            std::fs::write(&file, config.to_string()).unwrap();
            let out = Command::new(keyward_testkit::envoy_bin()).args(["--mode", "validate", "-c"]).arg(&file).output().unwrap();
            assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    #[test]
    fn bench_keys_are_valid_keyward_keys_and_stable() {
        let a = keys(3, "x");
        assert_eq!(a, keys(3, "x"));
        for k in &a {
            assert_eq!(keyformat::check(&["kw".into()], k), keyformat::FormatCheck::Valid, "{k}");
        }
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
