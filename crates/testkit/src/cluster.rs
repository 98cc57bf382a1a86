//! The cluster tier's harness: images pushed to a [`Registry`](crate::plugin::Registry) over its HTTP API, the
//! registry's access log read back, and containerd's Pull-with-unpack driven through containerd's own Go client
//! (`tests/cluster/pull`, built in GOPATH mode from Debian's Go sources like `tests/conformance`).

use std::collections::BTreeSet;

use super::containerd::{busybox_layer, Containerd, ImageArchive, OciImage};
use super::*;

/// Fills `path` with `len` bytes of a deterministic pseudo-random stream seeded by `seed`.
pub fn write_noise(path: &Path, len: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.extend_from_slice(&x.to_le_bytes());
    }
    buf.truncate(len);
    fs::write(path, buf).unwrap();
}

/// The cluster tests' image: busybox, then five data layers of `total_mb` MB in all under `/data/l<i>/`; layer 3 deletes
/// `/data/l2/gone` with a whiteout. Gives the layout, the archive and the files a container must see under
/// `/data` (`path size`, sorted).
pub fn layered_image(
    work: &Path,
    name: &str,
    total_mb: usize,
    seed: u64,
) -> (OciImage, ImageArchive, Vec<String>) {
    let mut img = OciImage::new(&work.join("layout"), name);
    img.add_layer_tar(&busybox_layer(work));
    let per_layer = total_mb * 1024 * 1024 / 5;
    let files_per_layer = 8;
    let mut expect = BTreeSet::new();
    for l in 1..=5 {
        let tree = work.join(format!("tree{l}"));
        let dir = tree.join(format!("data/l{l}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..files_per_layer {
            let len = per_layer / files_per_layer;
            write_noise(
                &dir.join(format!("f{f}")),
                len,
                seed * 10_000 + (l * 100 + f) as u64,
            );
            expect.insert(format!("/data/l{l}/f{f} {len}"));
        }
        if l == 2 {
            fs::write(dir.join("gone"), b"deleted by layer 3\n").unwrap();
        }
        if l == 3 {
            let l2 = tree.join("data/l2");
            fs::create_dir_all(&l2).unwrap();
            fs::write(l2.join(".wh.gone"), b"").unwrap();
        }
        img.add_layer_dir(&tree);
        fs::remove_dir_all(&tree).unwrap();
    }
    let archive = img.write_archive(&work.join("image.tar"));
    let _ = fs::remove_file(work.join("image.tar"));
    (img, archive, expect.into_iter().collect())
}

/// Whether the Go toolchain and containerd's Go sources (Debian's `golang-go` and
/// `golang-github-containerd-containerd-dev`) are there.
pub fn require_go_containerd(test: &str) -> bool {
    require_bin(test, "go")
        && (Path::new(GO_CONTAINERD).exists()
            || skip(
                test,
                "containerd's Go sources (golang-github-containerd-containerd-dev)",
            ))
}

/// Whether the Go toolchain, containerd's Go sources and the source of `tests/cluster/pull` (this workspace's:
/// absent where only the binaries are installed) are there, without a message.
pub fn have_go_containerd() -> bool {
    find_bin("go").is_some()
        && Path::new(GO_CONTAINERD).exists()
        && Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/cluster/pull/main.go")
            .exists()
}

const GO_CONTAINERD: &str = "/usr/share/gocode/src/github.com/containerd/containerd/client.go";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The target directory of the running binaries (`target/`).
fn target_dir() -> PathBuf {
    let bin = lamina_bin();
    bin.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds `tests/cluster/pull` (once per process; Go caches the rest) and returns the binary.
pub fn pull_tool() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = built.as_ref() {
        return p.clone();
    }
    let out_dir = target_dir().join("cluster");
    let gopath = target_dir().join("conformance/gopath");
    let gocache = target_dir().join("conformance/gocache");
    for d in [&out_dir, &gopath, &gocache] {
        fs::create_dir_all(d).unwrap();
    }
    let bin = out_dir.join("pull");
    // Built under a name of this process, then renamed into place: another test binary (the bench's cluster
    // tier) may be building or running the same tool at the same time.
    let own = out_dir.join(format!("pull.{}", std::process::id()));
    let t0 = Instant::now();
    run_ok(
        Command::new(find_bin("go").expect("go"))
            .args(["build", "-o"])
            .arg(&own)
            .arg("./tests/cluster/pull")
            .current_dir(workspace_root())
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("CGO_ENABLED", "0")
            .env("GOPATH", format!("{}:/usr/share/gocode", gopath.display()))
            .env("GOCACHE", &gocache),
    );
    fs::rename(&own, &bin).unwrap_or_else(|e| panic!("rename {} to {}: {e}", own.display(), bin.display()));
    eprintln!("go build tests/cluster/pull: {:.1} s", t0.elapsed().as_secs_f64());
    *built = Some(bin.clone());
    bin
}

/// containerd's Pull with unpack into `snapshotter` (the unpacker asks the snapshotter before it fetches each
/// layer). Gives the pull's wall time as the client measured it, or the error output.
pub fn pull_with_unpack(c: &Containerd, snapshotter: &str, reference: &str) -> Result<Duration, String> {
    let out = Command::new(pull_tool())
        .arg("-address")
        .arg(&c.address)
        .args([
            "-namespace",
            &c.namespace,
            "-snapshotter",
            snapshotter,
            "-ref",
            reference,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run pull: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pull {reference} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("pull output {:?}: {e}", String::from_utf8_lossy(&out.stdout)))?;
    if v["unpacked"] != serde_json::Value::Bool(true) {
        return Err(format!("{reference} not unpacked after the pull: {v}"));
    }
    Ok(Duration::from_secs_f64(v["seconds"].as_f64().unwrap_or(0.0)))
}

/// One HTTP/1.1 request to `addr` on a fresh connection; `body` is streamed from a file when given. Gives
/// the status and headers (lower-case names).
fn http(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: Option<&Path>,
) -> (u16, Vec<(String, String)>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let len = body.map(|p| fs::metadata(p).unwrap().len()).unwrap_or(0);
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {len}\r\n"
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(p) = body {
        io::copy(&mut fs::File::open(p).unwrap(), &mut s).unwrap();
    }
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers)
}

/// Pushes the image of `layout` (written by [`OciImage::write_archive`], described by `archive`) to the registry
/// at `addr` as `repo:tag`, through the registry API (monolithic blob uploads, then the manifest).
pub fn push_image(addr: &str, layout: &OciImage, archive: &ImageArchive, repo: &str, tag: &str) {
    let blob = |digest: &str| {
        layout
            .dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(&archive.manifest.digest)).unwrap()).unwrap();
    let mut digests = vec![archive.config.digest.clone()];
    digests.extend(
        manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string()),
    );
    for d in &digests {
        let (st, h) = http(addr, "POST", &format!("/v2/{repo}/blobs/uploads/"), &[], None);
        assert_eq!(st, 202, "start upload of {d}");
        let loc = h
            .iter()
            .find(|(k, _)| k == "location")
            .map(|(_, v)| v.clone())
            .expect("upload location");
        let path = match loc.find("/v2/") {
            Some(i) => loc[i..].to_string(),
            None => loc,
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let (st, _) = http(
            addr,
            "PUT",
            &format!("{path}{sep}digest={d}"),
            &[("Content-Type", "application/octet-stream".into())],
            Some(&blob(d)),
        );
        assert_eq!(st, 201, "upload of {d}");
    }
    let (st, _) = http(
        addr,
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[(
            "Content-Type",
            "application/vnd.oci.image.manifest.v1+json".into(),
        )],
        Some(&blob(&archive.manifest.digest)),
    );
    assert_eq!(st, 201, "put manifest {repo}:{tag}");
}

/// The requests the registry logged from byte `from` of its log on: `(method, path)` of each, from its
/// "response completed" lines (`http.request.method=GET ... http.request.uri="/v2/..."`).
pub fn registry_requests(log: &Path, from: u64) -> Vec<(String, String)> {
    let bytes = fs::read(log).unwrap_or_default();
    let text =
        String::from_utf8_lossy(&bytes[usize::try_from(from).unwrap_or(0).min(bytes.len())..]).into_owned();
    let field = |l: &str, key: &str| -> Option<String> {
        let rest = &l[l.find(key)? + key.len()..];
        let v = match rest.strip_prefix('"') {
            Some(q) => &q[..q.find('"')?],
            None => rest.split_whitespace().next()?,
        };
        Some(v.to_string())
    };
    text.lines()
        .filter(|l| l.contains("response completed"))
        .filter_map(|l| Some((field(l, "http.request.method=")?, field(l, "http.request.uri=")?)))
        .collect()
}

impl Containerd {
    /// `ctr run --rm` of `/bin/sh -c script` in a new container of `image` on `snapshotter`; gives stdout.
    pub fn run_script(&self, snapshotter: &str, image: &str, script: &str) -> Result<String, String> {
        self.run_script_in(&self.namespace, snapshotter, image, script)
    }

    /// [`Containerd::run_script`] in containerd namespace `ns`.
    pub fn run_script_in(
        &self,
        ns: &str,
        snapshotter: &str,
        image: &str,
        script: &str,
    ) -> Result<String, String> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let id = format!("c{}", N.fetch_add(1, Ordering::SeqCst));
        self.try_run_in(ns, &["--rm"], snapshotter, image, &id, script)
    }
}

/// One host of a test cluster: lamina (snapshotter only) in the cluster whose tier is `tier`, and a containerd
/// using it. Fields drop in order: containerd (and its shims) first, then lamina.
pub struct ClusterHost {
    /// The host's containerd.
    pub ctrd: Containerd,
    /// The host's lamina.
    pub lamina: super::containerd::LaminaSnap,
    /// Its `[cluster] host_id`.
    pub host: String,
}

/// The `[cluster]` keys of a test host: its id, the lease given and a heartbeat of a third of it.
fn cluster_keys(host: &str, lease_secs: u64) -> String {
    format!(
        "host_id = {host:?}\nlease_secs = {lease_secs}\nheartbeat_secs = {}\n",
        (lease_secs / 3).max(1)
    )
}

impl ClusterHost {
    /// Starts lamina below `dir/lamina` with `[cluster] dir = tier`, `host_id = host` and the lease given (the
    /// heartbeat a third of it), then containerd below `dir/containerd`.
    pub fn start(dir: &Path, tier: &Path, host: &str, lease_secs: u64) -> ClusterHost {
        ClusterHost::start_with(dir, tier, host, lease_secs, None)
    }

    /// [`ClusterHost::start`] with containerd's CRI plugin on (`cri`: the sandbox image and the registry's
    /// `host:port`, see [`Containerd::enable_cri`]) when given.
    pub fn start_with(
        dir: &Path,
        tier: &Path,
        host: &str,
        lease_secs: u64,
        cri: Option<(&str, &str)>,
    ) -> ClusterHost {
        let toml = format!(
            "[cluster]\ndir = {:?}\n{}",
            tier.to_str().expect("utf-8 tier path"),
            cluster_keys(host, lease_secs)
        );
        ClusterHost::start_configured(dir, host, &toml, cri)
    }

    /// [`ClusterHost::start`] of a host whose lamina mounts the cluster's MooseFS itself (`[cluster.moosefs]`
    /// with master `master`, `HOST:PORT`): the tier is `remote_path` in the cluster.
    pub fn start_mounting(
        dir: &Path,
        master: &str,
        remote_path: &str,
        host: &str,
        lease_secs: u64,
    ) -> ClusterHost {
        let toml = format!(
            "[cluster]\n{}[cluster.moosefs]\nmaster = {master:?}\nremote_path = {remote_path:?}\n",
            cluster_keys(host, lease_secs)
        );
        ClusterHost::start_configured(dir, host, &toml, None)
    }

    /// Starts lamina below `dir/lamina` with the config `toml`, then containerd below `dir/containerd` (with
    /// its CRI plugin on when `cri` is given).
    fn start_configured(dir: &Path, host: &str, toml: &str, cri: Option<(&str, &str)>) -> ClusterHost {
        let mut lamina = super::containerd::LaminaSnap::new(&dir.join("lamina"));
        lamina.use_config(toml);
        lamina.spawn();
        lamina.wait_ready();
        let mut ctrd = Containerd::new(&dir.join("containerd"), Some(&lamina.socket));
        if let Some((sandbox_image, registry)) = cri {
            ctrd.enable_cri(super::containerd::PROXY_NAME, sandbox_image, registry);
        }
        ctrd.spawn();
        ctrd.wait_ready();
        ClusterHost {
            ctrd,
            lamina,
            host: host.to_string(),
        }
    }

    /// `lamina gc` (with `--dry-run` when asked) against this host's daemon, as JSON.
    pub fn gc(&self, dry_run: bool) -> serde_json::Value {
        let mut args = vec!["gc"];
        if dry_run {
            args.push("--dry-run");
        }
        lamina_cli_json(&self.lamina.data_root, &args)
    }
}
