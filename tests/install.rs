//! Installing the way operators do, for real and without Docker or a registry: the image built
//! from the Dockerfile's runtime stage with buildah on a Debian base made by mmdebstrap, run
//! from its OCI archive and imported the way `kind load image-archive` does; and the Debian
//! package installed, reinstalled, upgraded and purged in a chroot of the same base.

mod common;

use common::*;
use pleiades::config::{Config, Sources};
use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs `command`, returning its output; panics with the output when it fails.
fn run(command: &mut Command) -> String {
    let (code, output) = run_status(command);
    assert_eq!(code, 0, "{command:?} failed:\n{output}");
    output
}

/// Runs `command` (with no input unless it names one): its exit code and its output (stdout,
/// then stderr).
fn run_status(command: &mut Command) -> (i32, String) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?} runs (scripts/test installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The Debian release of this machine. The test binary links its C library, so the base the
/// image and the package are tried on must be the same release.
fn host_suite() -> String {
    let release = std::fs::read_to_string("/etc/os-release").expect("/etc/os-release");
    release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .expect("a Debian release name in /etc/os-release")
}

/// Serialises the making of the base between the tests of this file.
static BASE: Mutex<()> = Mutex::new(());

/// A minimal Debian root file system (mmdebstrap's minbase, without manuals and documentation,
/// as Debian's slim images are) as a tarball. It is kept under target/ for the next run and
/// made again when missing or older than a week; nothing depends on it being there.
fn debian_base() -> PathBuf {
    let _made_once = BASE.lock().unwrap_or_else(|e| e.into_inner());
    let suite = host_suite();
    let dir = Path::new(ROOT).join("target/install-tests");
    let tarball = dir.join(format!("debian-{suite}-minbase.tar"));
    let week = Duration::from_secs(7 * 86_400);
    let fresh = std::fs::metadata(&tarball)
        .and_then(|m| m.modified())
        .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() < week);
    if fresh {
        return tarball;
    }
    std::fs::create_dir_all(&dir).expect("target/install-tests");
    let partial = dir.join(format!("debian-{suite}-minbase.tar.partial"));
    let started = Instant::now();
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap.args(["--variant=minbase", "--format=tar"]);
    // On bookworm, merged /usr comes from symbolic links made by this hook rather than from
    // the usrmerge package (which would pull in perl).
    let merged_usr = Path::new("/usr/share/mmdebstrap/hooks/merged-usr");
    if merged_usr.exists() {
        mmdebstrap.arg(format!("--hook-dir={}", merged_usr.display()));
    }
    for path in [
        "path-exclude=/usr/share/man/*",
        "path-exclude=/usr/share/doc/*",
        "path-include=/usr/share/doc/*/copyright",
        "path-exclude=/usr/share/locale/*",
        "path-exclude=/usr/share/info/*",
    ] {
        mmdebstrap.arg(format!("--dpkgopt={path}"));
    }
    run(mmdebstrap.arg(&suite).arg(&partial));
    std::fs::rename(&partial, &tarball).expect("the base in place");
    println!(
        "mmdebstrap: Debian {suite} minbase ({:.1} MiB) in {:.1} s",
        mib(std::fs::metadata(&tarball).map_or(0, |m| m.len())),
        started.elapsed().as_secs_f64()
    );
    tarball
}

/// This machine's architecture as Debian and OCI name it (amd64, arm64, …).
fn debian_arch() -> String {
    run(Command::new("dpkg").arg("--print-architecture"))
        .trim()
        .to_owned()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// The test binary stripped as a release binary is, under `dir/name`.
fn stripped_binary(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("a directory for the binary");
    let out = dir.join(name);
    if out.exists() {
        return out;
    }
    run(Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(env!("CARGO_BIN_EXE_pleiades")));
    out
}

/// buildah with storage of its own in the scratch directory.
struct Buildah {
    root: PathBuf,
    runroot: PathBuf,
}

impl Buildah {
    fn new(scope: &TestScope) -> Buildah {
        Buildah {
            root: scope.path("buildah/storage"),
            runroot: scope.path("buildah/run"),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("buildah");
        c.arg("--root").arg(&self.root);
        c.arg("--runroot").arg(&self.runroot);
        c
    }

    /// Makes an image of `tarball` (a root file system) named `name`, with the environment a
    /// Debian image has.
    fn import(&self, tarball: &Path, name: &str) {
        let container = run(self.cmd().args(["from", "scratch"]));
        let container = container.trim();
        run(self.cmd().args(["add", container]).arg(tarball).arg("/"));
        run(self.cmd().args([
            "config",
            "--env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--cmd",
            "bash",
            container,
        ]));
        run(self.cmd().args(["commit", "--rm", container, name]));
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        // Working containers keep their file systems mounted; leave none behind.
        let _ = self.cmd().args(["rm", "--all"]).output();
    }
}

/// A process that is killed when the test ends, however it ends.
struct Running {
    child: Child,
}

impl Running {
    /// SIGTERM, then the exit code within `limit` (None if it is still running).
    async fn terminate(&mut self, limit: Duration) -> Option<i32> {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.exit_within(limit).await
    }

    /// The exit code once it exits within `limit` (None if it is still running).
    async fn exit_within(&mut self, limit: Duration) -> Option<i32> {
        let child = &mut self.child;
        let status = try_wait_until(limit, async || child.try_wait().ok().flatten()).await?;
        status.code()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What an OCI image says about how to run it.
struct ImageConfig {
    config: serde_json::Value,
}

impl ImageConfig {
    fn strings(&self, key: &str) -> Vec<String> {
        self.config["config"][key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn keys(&self, key: &str) -> BTreeSet<String> {
        self.config["config"][key]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn text(&self, key: &str) -> String {
        self.config["config"][key]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn label(&self, name: &str) -> String {
        self.config["config"]["Labels"][name]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// `User` as numbers: Kubernetes' runAsNonRoot can check only a numeric user.
    fn user(&self) -> (u32, u32) {
        let user = self.text("User");
        let (uid, gid) = user.split_once(':').unwrap_or((&user, &user));
        let number = |s: &str| -> u32 {
            s.parse()
                .unwrap_or_else(|_| panic!("the image's user {user:?} is not numeric"))
        };
        (number(uid), number(gid))
    }

    fn env(&self) -> Vec<(String, String)> {
        self.strings("Env")
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

/// Unpacks an OCI archive as a container runtime does: the layers in order into `rootfs`
/// (whiteouts delete what lower layers left), and the image configuration.
fn unpack_oci_archive(archive: &Path, layout: &Path, rootfs: &Path) -> ImageConfig {
    std::fs::create_dir_all(layout).expect("layout dir");
    std::fs::create_dir_all(rootfs).expect("rootfs dir");
    run(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(layout));
    let blob = |digest: &str| -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        layout.join("blobs/sha256").join(hex)
    };
    let json = |path: PathBuf| -> serde_json::Value {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let index = json(layout.join("index.json"));
    let manifests = index["manifests"].as_array().expect("index.json manifests");
    assert_eq!(manifests.len(), 1, "one image in the archive: {index}");
    let manifest = json(blob(manifests[0]["digest"].as_str().expect("digest")));
    let config = json(blob(manifest["config"]["digest"].as_str().expect("config")));
    assert_eq!(config["architecture"], debian_arch());
    assert_eq!(config["os"], "linux");
    for layer in manifest["layers"].as_array().expect("layers") {
        let file = blob(layer["digest"].as_str().expect("layer digest"));
        let listing = run(Command::new("tar").arg("-tf").arg(&file));
        for entry in listing.lines() {
            let path = Path::new(entry.trim_start_matches("./"));
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let parent = rootfs.join(path.parent().unwrap_or(Path::new("")));
            if name == ".wh..wh..opq" {
                for below in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                    let _ = std::fs::remove_dir_all(below.path())
                        .or_else(|_| std::fs::remove_file(below.path()));
                }
            } else if let Some(hidden) = name.strip_prefix(".wh.") {
                let target = parent.join(hidden);
                let _ = std::fs::remove_dir_all(&target).or_else(|_| std::fs::remove_file(&target));
            }
        }
        run(Command::new("tar")
            .args(["--numeric-owner", "--same-permissions", "--exclude=.wh.*"])
            .arg("-xf")
            .arg(&file)
            .arg("-C")
            .arg(rootfs));
    }
    ImageConfig { config }
}

/// Starts the image's entry point in `rootfs` as a runtime would: chrooted, in its working
/// directory, as its user, with its environment and `env` on top (the host's network, as
/// `--network host`), with `args` in place of the image's command when there are any (as
/// `docker run IMAGE ARGS…`).
fn run_image(
    rootfs: &Path,
    image: &ImageConfig,
    args: &[&str],
    env: &[(&str, String)],
    log: &Path,
) -> Running {
    let entrypoint = image.strings("Entrypoint");
    let mut vars = image.env();
    vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let path = vars
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    // The entry point resolves on the image's PATH, inside the image.
    let program = path
        .split(':')
        .map(|dir| format!("{dir}/{}", entrypoint[0]))
        .find(|p| rootfs.join(p.trim_start_matches('/')).is_file())
        .unwrap_or_else(|| panic!("{} is not on the image's PATH {path:?}", entrypoint[0]));
    let (uid, gid) = image.user();
    let root = CString::new(rootfs.as_os_str().as_bytes()).expect("a path");
    let workdir = CString::new(image.text("WorkingDir")).expect("a path");
    let log = std::fs::File::create(log).expect("log file");
    let mut command = Command::new(program);
    command.args(&entrypoint[1..]);
    if args.is_empty() {
        command.args(image.strings("Cmd"));
    } else {
        command.args(args);
    }
    command
        .env_clear()
        .envs(vars)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    // SAFETY: only async-signal-safe system calls between fork and exec, on values made before.
    unsafe {
        command.pre_exec(move || {
            if libc::chroot(root.as_ptr()) != 0
                || libc::chdir(workdir.as_ptr()) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Running {
        child: command.spawn().expect("the image's entry point starts"),
    }
}

async fn get(url: &str) -> Option<(u16, String)> {
    let response = reqwest::get(url).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

async fn get_json(url: &str) -> serde_json::Value {
    let (status, body) = get(url).await.unwrap_or_else(|| panic!("{url} answers"));
    assert_eq!(status, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"))
}

/// The counters of every day and all-time, as the image's API serves them.
async fn served_counters(web: u16) -> Expected {
    let base = format!("http://127.0.0.1:{web}");
    let mut found = Expected::default();
    let days = get_json(&format!("{base}/api/days")).await;
    for day in days.as_array().expect("a list of days") {
        let day: i64 = day.as_str().and_then(|d| d.parse().ok()).expect("a day");
        let body = get_json(&format!("{base}/api/stats/{day}")).await;
        found.days.insert(day, counters_of(&body));
    }
    found.all_time = counters_of(&get_json(&format!("{base}/api/totals")).await);
    found.events = found.all_time.get("pleiades_total").copied().unwrap_or(0) as u64;
    found
}

/// A private containerd, for importing the archive the way kind's nodes do.
struct Containerd {
    socket: PathBuf,
    _daemon: Running,
}

impl Containerd {
    async fn start(scope: &TestScope) -> Containerd {
        let dir = scope.path("containerd");
        std::fs::create_dir_all(&dir).expect("containerd dir");
        let socket = dir.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\naddress = \"{socket}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
        );
        let config_path = scope.write_file("containerd/config.toml", &config);
        let log = std::fs::File::create(dir.join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("containerd starts (scripts/test installs it)");
        let daemon = Running { child };
        let containerd = Containerd {
            socket,
            _daemon: daemon,
        };
        wait_until(
            Duration::from_secs(30),
            "containerd to answer",
            async || {
                let (code, _) = run_status(containerd.ctr().args(["version"]));
                (code == 0).then_some(())
            },
        )
        .await;
        containerd
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .arg("--namespace=k8s.io");
        c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs mmdebstrap, buildah and containerd as root (scripts/test)"
)]
async fn the_image_counts_a_recorded_stream_as_a_non_root_user() {
    let started = Instant::now();
    let scope = TestScope::new();
    let suite = host_suite();
    let base = debian_base();
    let buildah = Buildah::new(&scope);
    let base_image = format!("localhost/pleiades-test-base:{suite}");
    buildah.import(&base, &base_image);

    // The Dockerfile's runtime stage on that base, with the binary of this test run in place of
    // the builder stage's (a release build inside the image would be a second full compile).
    let binary = stripped_binary(&scope.path("binary"), "pleiades");
    let tag = format!("pleiades:{VERSION}");
    run(buildah
        .cmd()
        .args(["build", "--isolation", "chroot", "--pull-never"])
        .arg("--build-arg")
        .arg(format!("RUNTIME_IMAGE={base_image}"))
        .arg("--build-context")
        .arg(format!("builder={}", binary.parent().unwrap().display()))
        .args(["-f", "Dockerfile", "-t", tag.as_str(), "."])
        .current_dir(ROOT));
    let size = run(buildah
        .cmd()
        .args(["images", "--format", "{{.Size}}", &tag]));
    let archive = scope.path(&format!("pleiades-{VERSION}.oci.tar"));
    run(buildah.cmd().arg("push").arg(&tag).arg(format!(
        "oci-archive:{}:docker.io/library/{tag}",
        archive.display()
    )));
    let archive_bytes = std::fs::metadata(&archive).expect("the archive").len();
    println!(
        "image {tag}: {} ({:.1} MiB as an OCI archive; the binary of this test run, a debug build, stripped, is {:.1} MiB), built in {:.1} s",
        size.trim(),
        mib(archive_bytes),
        mib(std::fs::metadata(&binary).expect("binary").len()),
        started.elapsed().as_secs_f64()
    );

    // What the image declares: SPEC §11.
    let rootfs = scope.path("rootfs");
    let image = unpack_oci_archive(&archive, &scope.path("layout"), &rootfs);
    assert_eq!(image.strings("Entrypoint"), ["pleiades"]);
    assert_eq!(
        image.keys("ExposedPorts"),
        BTreeSet::from(["8080/tcp", "9000/tcp"].map(String::from))
    );
    assert_eq!(
        image.keys("Volumes"),
        BTreeSet::from(["/var/lib/pleiades".to_owned()])
    );
    assert_eq!(image.text("WorkingDir"), "/var/lib/pleiades");
    let (uid, gid) = image.user();
    assert!(uid != 0 && gid != 0, "the image runs as root");
    assert_eq!(image.label("org.opencontainers.image.version"), VERSION);
    assert_eq!(
        image.label("org.opencontainers.image.source"),
        pleiades::config::PROJECT_URL
    );
    assert_eq!(
        image.label("org.opencontainers.image.licenses"),
        env!("CARGO_PKG_LICENSE")
    );
    assert!(image.env().contains(&(
        "PLEIADES_CONFIG".into(),
        "/etc/pleiades/pleiades.toml".into()
    )));
    let state = std::fs::metadata(rootfs.join("var/lib/pleiades")).expect("the state dir");
    assert_eq!(
        (state.uid(), state.gid()),
        (uid, gid),
        "the state dir's owner"
    );
    // The shipped configuration, listening on the container's interfaces at the exposed ports.
    let shipped = pleiades::config::load(&Sources {
        file: Some(&rootfs.join("etc/pleiades/pleiades.toml")),
        ..Sources::default()
    })
    .expect("the image's configuration loads");
    let mut expected_config = Config::default();
    expected_config.web.listen = "0.0.0.0:8080".parse().unwrap();
    expected_config.metrics.listen = "0.0.0.0:9000".parse().unwrap();
    assert_eq!(shipped, expected_config);
    // TLS to Kafka finds the CA bundle where OpenSSL looks for it.
    let bundle = std::fs::read_link(rootfs.join("usr/lib/ssl/cert.pem")).expect("cert.pem");
    let bundle = rootfs.join(bundle.strip_prefix("/").expect("an absolute link"));
    assert!(std::fs::metadata(&bundle).is_ok_and(|m| m.len() > 100_000));

    // Run it against a recorded stream on loopback, its listeners moved to free loopback ports
    // as `docker run -e` would.
    let lines = recorded_lines();
    let expected = oracle(&lines);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let upstream = scope.replay(replay_options(vec![events])).await.addr;
    let (web, metrics) = (TestScope::free_port(), TestScope::free_port());
    let log = scope.path("image.log");
    // Every form of the command line reads the image's configuration.
    let check_log = scope.path("check-config.log");
    let mut check = run_image(&rootfs, &image, &["check-config"], &[], &check_log);
    assert_eq!(check.exit_within(Duration::from_secs(20)).await, Some(0));
    let checked = std::fs::read_to_string(&check_log).unwrap_or_default();
    assert!(
        checked.contains("configuration OK (/etc/pleiades/pleiades.toml)"),
        "{checked}"
    );
    let mut daemon = run_image(
        &rootfs,
        &image,
        &[],
        &[
            (
                "PLEIADES_INGEST__URL",
                format!("http://{upstream}/v2/stream/recentchange"),
            ),
            (
                "PLEIADES_INGEST__USER_AGENT",
                "pleiades-tests/1.0 (test suite)".into(),
            ),
            ("PLEIADES_WEB__LISTEN", format!("127.0.0.1:{web}")),
            ("PLEIADES_METRICS__LISTEN", format!("127.0.0.1:{metrics}")),
        ],
        &log,
    );
    let pid = daemon.child.id();
    // Each answer is cached for up to web.cache_ttl, so a snapshot taken while the last batch
    // lands can mix older and newer answers: wait for one that is whole.
    let counted = try_wait_until(Duration::from_secs(120), async || {
        let found = served_counters_if_up(web).await?;
        (found == expected).then_some(())
    })
    .await;
    if counted.is_none() {
        eprintln!(
            "the image did not count the stream; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert_counters_equal(&served_counters(web).await, &expected);
    }
    println!(
        "the image counted {} events of {} recorded lines exactly over {} days; RSS {:.1} MiB",
        expected.events,
        lines.len(),
        expected.days.len(),
        mib(rss_bytes(pid).unwrap_or(0))
    );
    for (port, path) in [
        (web, "/healthz"),
        (web, "/readyz"),
        (metrics, "/healthz"),
        (metrics, "/readyz"),
    ] {
        let answer = get(&format!("http://127.0.0.1:{port}{path}")).await;
        assert_eq!(answer.map(|a| a.0), Some(200), ":{port}{path}");
    }
    let (status, scrape) = get(&format!("http://127.0.0.1:{metrics}/metrics"))
        .await
        .expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(
        scrape.contains(&format!("version=\"{VERSION}\""))
            && scrape.contains("pleiades_build_info"),
        "{scrape}"
    );
    // A non-root user, and the state it wrote is its own.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let ids = |key: &str| -> Vec<u32> {
        let line = status.lines().find(|l| l.starts_with(key)).expect(key);
        line.split_whitespace()
            .skip(1)
            .map(|n| n.parse().expect("an id"))
            .collect()
    };
    assert_eq!(ids("Uid:"), [uid; 4]);
    assert_eq!(ids("Gid:"), [gid; 4]);
    for written in ["var/lib/pleiades/events", "var/lib/pleiades/pleiades.db"] {
        let meta = std::fs::metadata(rootfs.join(written)).expect(written);
        assert_eq!(meta.uid(), uid, "{written}");
    }
    assert_eq!(daemon.terminate(Duration::from_secs(15)).await, Some(0));

    // `kind load image-archive` runs this on every node.
    let containerd = Containerd::start(&scope).await;
    let archive_file = std::fs::File::open(&archive).expect("the archive");
    let (code, output) = run_status(
        containerd
            .ctr()
            .args(["images", "import", "--all-platforms", "--digests"])
            .arg("--snapshotter=overlayfs")
            .arg("-")
            .stdin(archive_file),
    );
    assert_eq!(code, 0, "ctr import:\n{output}");
    let images = run(containerd.ctr().args(["images", "ls", "-q"]));
    assert!(
        images
            .lines()
            .any(|l| l == format!("docker.io/library/{tag}")),
        "kind's containerd knows the image as {tag}:\n{images}"
    );
    println!(
        "image test: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}

/// Like [`served_counters`], but None while the API is not up or not complete.
async fn served_counters_if_up(web: u16) -> Option<Expected> {
    let (status, _) = get(&format!("http://127.0.0.1:{web}/api/totals")).await?;
    if status != 200 {
        return None;
    }
    Some(served_counters(web).await)
}

/// A Debian root file system in the scratch directory, to run commands in with chroot.
struct Chroot {
    root: PathBuf,
}

impl Chroot {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.arg("300").arg("chroot").arg(&self.root).args(args);
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    fn run(&self, args: &[&str]) -> String {
        run(&mut self.cmd(args))
    }

    /// Every path in it, but the ones that change whatever is installed (kernel file systems,
    /// caches, logs, apt's lists; dpkg's own files are checked through dpkg).
    fn paths(&self) -> BTreeSet<String> {
        let skipped = [
            "proc",
            "sys",
            "dev",
            "tmp",
            "run",
            "var/cache",
            "var/log",
            "var/lib/apt",
        ];
        let mut paths = BTreeSet::new();
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).expect("a directory").flatten() {
                let path = entry.path();
                let relative = path
                    .strip_prefix(&self.root)
                    .expect("under the root")
                    .to_string_lossy()
                    .into_owned();
                if skipped.contains(&relative.as_str()) {
                    continue;
                }
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(path);
                }
                paths.insert(relative);
            }
        }
        paths
    }

    /// `pleiades check-config` of the installed configuration passes.
    fn check_config(&self) {
        let checked = self.run(&[
            "pleiades",
            "check-config",
            "--config",
            "/etc/pleiades/pleiades.toml",
        ]);
        assert!(checked.contains("configuration OK"), "{checked}");
    }

    fn file(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }
}

/// Builds the package from the test binary with `cargo deb --no-build`, as revision `revision`.
fn build_deb(scope: &TestScope, revision: u32) -> PathBuf {
    // cargo deb takes the binary from <target dir>/release; give it one with this run's binary,
    // stripped already (so no symbols to package apart).
    let target = scope.path("deb-target");
    stripped_binary(&target.join("release"), "pleiades");
    let out = scope.path("deb");
    let output = run(Command::new("cargo")
        .args(["deb", "--no-build", "--strip", "--no-dbgsym", "--fast"])
        .arg("--deb-revision")
        .arg(revision.to_string())
        .arg("--output")
        .arg(&out)
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(ROOT));
    let deb = out.join(format!(
        "pleiades_{VERSION}-{revision}_{}.deb",
        debian_arch()
    ));
    assert!(deb.exists(), "{}: {output}", deb.display());
    deb
}

#[test]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs mmdebstrap, cargo-deb and lintian as root (scripts/test)"
)]
fn the_debian_package_installs_keeps_local_edits_and_purges_cleanly() {
    let started = Instant::now();
    let scope = TestScope::new();
    let deb = build_deb(&scope, 1);
    let upgrade = build_deb(&scope, 2);

    // lintian: no errors.
    let (code, lintian) = run_status(
        Command::new("lintian")
            .args(["--fail-on", "error", "--tag-display-limit", "0"])
            .arg(&deb),
    );
    println!("lintian {}:\n{lintian}", deb.display());
    assert_eq!(code, 0, "lintian fails the package:\n{lintian}");
    assert!(!lintian.lines().any(|l| l.starts_with("E:")), "{lintian}");
    let changelog = std::fs::read_to_string(Path::new(ROOT).join("debian/changelog")).unwrap();
    assert!(
        changelog.starts_with(&format!("pleiades ({VERSION}-1) ")),
        "debian/changelog names another version"
    );
    let field = |name: &str| {
        run(Command::new("dpkg-deb")
            .args(["--field"])
            .arg(&deb)
            .arg(name))
    };
    assert_eq!(field("Package").trim(), "pleiades");
    let conffiles = run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/pleiades/pleiades.toml");

    // A fresh Debian with systemd, as a host is: the same base, the package's dependencies.
    let root = scope.path("root");
    std::fs::create_dir_all(&root).expect("root dir");
    run(Command::new("tar")
        .arg("-xf")
        .arg(debian_base())
        .arg("-C")
        .arg(&root));
    let host = Chroot { root };
    host.run(&["apt-get", "update", "-qq"]);
    let depends = field("Depends");
    host.run(&[
        "apt-get",
        "satisfy",
        "-y",
        "-qq",
        "--no-install-recommends",
        &format!("{}, systemd", depends.trim()),
    ]);
    let before = host.paths();
    for package in [&deb, &upgrade] {
        std::fs::copy(
            package,
            host.file(&format!(
                "/tmp/{}",
                package.file_name().unwrap().to_string_lossy()
            )),
        )
        .expect("the package in the chroot");
    }
    let in_chroot = |p: &Path| format!("/tmp/{}", p.file_name().unwrap().to_string_lossy());

    host.run(&["apt-get", "install", "-y", "-qq", &in_chroot(&deb)]);
    let version = host.run(&["pleiades", "--version"]);
    assert!(
        version.starts_with(&format!("pleiades {VERSION} ")),
        "{version}"
    );
    host.check_config();
    // Installed, not enabled, and accepted by systemd.
    let (_, enabled) = run_status(&mut host.cmd(&["systemctl", "is-enabled", "pleiades.service"]));
    assert_eq!(enabled.trim(), "disabled");
    let unit = "/usr/lib/systemd/system/pleiades.service";
    let verify = host.run(&["systemd-analyze", "verify", unit]);
    assert!(
        !verify.contains("pleiades.service"),
        "systemd-analyze:\n{verify}"
    );
    assert!(std::fs::read_to_string(host.file(unit))
        .expect("the unit")
        .contains("ExecStart=/usr/bin/pleiades "));

    // An operator's edit of the configuration.
    let config_path = host.file("/etc/pleiades/pleiades.toml");
    let mut edited = pleiades::config::load(&Sources {
        file: Some(&config_path),
        ..Sources::default()
    })
    .expect("the installed configuration loads");
    edited.ingest.user_agent = "pleiades/0.1.0 (https://example.org; ops@example.org)".into();
    let edited_text = toml::to_string(&edited).expect("a configuration serialises");
    std::fs::write(&config_path, &edited_text).expect("the edit");
    // The state the unit's StateDirectory= gets under DynamicUser=, with something in it.
    std::fs::create_dir_all(host.file("/var/lib/private/pleiades/events")).expect("state");
    std::fs::write(
        host.file("/var/lib/private/pleiades/pleiades.db"),
        "counters",
    )
    .expect("state");
    std::os::unix::fs::symlink("private/pleiades", host.file("/var/lib/pleiades")).expect("link");

    // The edit survives a reinstall and an upgrade.
    host.run(&[
        "apt-get",
        "install",
        "--reinstall",
        "-y",
        "-qq",
        &in_chroot(&deb),
    ]);
    assert_eq!(std::fs::read_to_string(&config_path).unwrap(), edited_text);
    host.run(&["apt-get", "install", "-y", "-qq", &in_chroot(&upgrade)]);
    let installed = host.run(&[
        "dpkg-query",
        "--show",
        "--showformat=${Version}",
        "pleiades",
    ]);
    assert_eq!(installed.trim(), format!("{VERSION}-2"));
    assert_eq!(std::fs::read_to_string(&config_path).unwrap(), edited_text);
    host.check_config();

    // Removal keeps the configuration and the state; purge takes everything.
    host.run(&["apt-get", "remove", "-y", "-qq", "pleiades"]);
    assert!(!host.file("/usr/bin/pleiades").exists());
    assert!(config_path.exists() && host.file("/var/lib/pleiades/pleiades.db").exists());
    // An operator's secrets beside the configuration (the unit's credential file).
    let secrets = host.file("/etc/pleiades/secrets.toml");
    std::fs::write(
        &secrets,
        "[redis]\nurl = \"redis://:secret@127.0.0.1:6379\"\n",
    )
    .unwrap();
    host.run(&["apt-get", "purge", "-y", "-qq", "pleiades"]);
    assert!(!secrets.exists(), "purge left the secrets behind");
    let (code, _) = run_status(&mut host.cmd(&["dpkg-query", "--show", "pleiades"]));
    assert_ne!(code, 0, "dpkg still knows the package after purge");
    let mut after = host.paths();
    // systemd's own parent of every dynamic user's state, not the package's.
    after.remove("var/lib/private");
    let left: Vec<_> = after.difference(&before).collect();
    let lost: Vec<_> = before.difference(&after).collect();
    assert!(left.is_empty(), "purge left behind: {left:?}");
    assert!(lost.is_empty(), "install and purge removed: {lost:?}");
    println!(
        "package test: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}
