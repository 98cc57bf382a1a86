//! Deterministic tar archives for the benchmarks: log-normal file sizes, pseudo-random bytes, ustar headers
//! written by hand (so the generator needs no dependency and its output never changes between versions).

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Deterministic pseudo-random numbers (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        lamina_testkit::reliability::splitmix64(&mut self.0)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller, one value per call).
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A seed that differs between calls and processes.
pub fn now_seed() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}

/// A Docker-style 64-hex layer id.
pub fn hex_id(seed: u64) -> String {
    let mut rng = Rng(seed);
    (0..4).fold(String::with_capacity(64), |mut s, _| {
        let _ = write!(s, "{:016x}", rng.next());
        s
    })
}

/// What [`gen_tar`] writes: `dirs` directories, `files` regular files with log-normal sizes of the given
/// median, scaled so they carry about `payload` bytes, plus `large_files` files of `large_size` bytes.
#[derive(Debug, Clone)]
pub struct TarSpec {
    /// Small regular files.
    pub files: usize,
    /// Directories (two levels).
    pub dirs: usize,
    /// Target payload of the small files, bytes.
    pub payload: u64,
    /// Median size of the small files, bytes.
    pub median: u64,
    /// Large files under `large/`.
    pub large_files: usize,
    /// Size of each large file, bytes.
    pub large_size: u64,
    /// Seed of the sizes and contents.
    pub seed: u64,
}

/// What [`gen_tar`] wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct TarStats {
    /// Entries (files and directories).
    pub entries: u64,
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Regular-file bytes.
    pub payload: u64,
    /// Bytes of the tar itself.
    pub tar_bytes: u64,
}

/// Largest small file; keeps the log-normal tail from producing a handful of huge files.
const MAX_SMALL: f64 = 16.0 * 1024.0 * 1024.0;

fn small_sizes(z: &[f64], median: f64, sigma: f64) -> impl Iterator<Item = u64> + '_ {
    z.iter()
        .map(move |z| (median * (sigma * z).exp()).min(MAX_SMALL).round() as u64)
}

/// ustar header of a generated entry (mode 755 for directories, 644 for files).
fn ustar_header(path: &str, dir: bool, size: u64) -> [u8; 512] {
    let (flag, mode) = if dir { (b'5', 0o755) } else { (b'0', 0o644) };
    lamina_testkit::tar_header(path.as_bytes(), flag, mode, size, b"")
}

struct TarWriter<W: Write> {
    out: W,
    rng: Rng,
    buf: Vec<u8>,
    entries: u64,
    files: u64,
    dirs: u64,
    payload: u64,
    bytes: u64,
}

impl<W: Write> TarWriter<W> {
    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        self.bytes += data.len() as u64;
        self.out.write_all(data)
    }

    fn dir(&mut self, path: &str) -> Result<()> {
        let h = ustar_header(&format!("{path}/"), true, 0);
        self.put(&h)?;
        self.entries += 1;
        self.dirs += 1;
        Ok(())
    }

    fn file(&mut self, path: &str, size: u64) -> Result<()> {
        let h = ustar_header(path, false, size);
        self.put(&h)?;
        let mut left = size;
        while left > 0 {
            let n = left.min(self.buf.len() as u64) as usize;
            let mut chunk = std::mem::take(&mut self.buf);
            self.rng.fill(&mut chunk[..n]);
            let r = self.put(&chunk[..n]);
            self.buf = chunk;
            r?;
            left -= n as u64;
        }
        let pad = (512 - size % 512) % 512;
        self.put(&[0u8; 512][..pad as usize])?;
        self.entries += 1;
        self.files += 1;
        self.payload += size;
        Ok(())
    }
}

/// Writes a deterministic ustar archive to `out` (depth-first order, like `tar -c` of a real tree).
pub fn gen_tar(out: &Path, spec: &TarSpec) -> Result<TarStats> {
    if spec.dirs == 0 {
        bail!("--dirs must be at least 1");
    }
    let mut rng = Rng(spec.seed);
    // Sizes: median * exp(sigma * z), with sigma found by bisection so the total matches the
    // requested payload while the median stays where it was asked to be.
    let z: Vec<f64> = (0..spec.files).map(|_| rng.normal()).collect();
    let median = spec.median as f64;
    let (mut lo, mut hi) = (0.0f64, 3.0f64);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if small_sizes(&z, median, mid).sum::<u64>() < spec.payload {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let sizes: Vec<u64> = small_sizes(&z, median, lo).collect();

    // Two-level tree: `top` directories, the rest spread below them; files spread over all.
    let top = (spec.dirs / 50).max(1);
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); top];
    for d in top..spec.dirs {
        children[(d - top) % top].push(d);
    }
    let names: Vec<String> = (0..spec.dirs)
        .map(|d| {
            if d < top {
                format!("t{d:03}")
            } else {
                format!("t{:03}/d{d:05}", (d - top) % top)
            }
        })
        .collect();
    let mut files_in: Vec<Vec<usize>> = vec![Vec::new(); spec.dirs];
    for f in 0..spec.files {
        files_in[(rng.next() % spec.dirs as u64) as usize].push(f);
    }

    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = TarWriter {
        out: BufWriter::with_capacity(1 << 20, file),
        rng: Rng(spec.seed ^ 0x5eed_da7a),
        buf: vec![0u8; 1 << 20],
        entries: 0,
        files: 0,
        dirs: 0,
        payload: 0,
        bytes: 0,
    };
    // Depth-first, like `tar -c` of a real tree: a directory, its files, then its children.
    for (t, kids) in children.iter().enumerate() {
        for d in std::iter::once(t).chain(kids.iter().copied()) {
            w.dir(&names[d])?;
            for &f in &files_in[d] {
                w.file(&format!("{}/f{f:06}.dat", names[d]), sizes[f])?;
            }
        }
    }
    if spec.large_files > 0 {
        w.dir("large")?;
        for i in 0..spec.large_files {
            w.file(&format!("large/blob{i:02}.bin"), spec.large_size)?;
        }
    }
    w.put(&[0u8; 1024])?;
    w.out.flush()?;
    w.out.get_ref().sync_all()?;

    Ok(TarStats {
        entries: w.entries,
        files: w.files,
        dirs: w.dirs,
        payload: w.payload,
        tar_bytes: w.bytes,
    })
}

/// An in-memory tar holding one small file, for building layer chains.
pub fn tiny_tar(name: &str) -> Result<Vec<u8>> {
    let body = format!("layer {name}\n");
    Ok(lamina_testkit::TarBuilder::new()
        .file(&format!("layer-{name}.txt"), 0o644, body.as_bytes())
        .finish())
}

// ---------------------------------------------------------------------------------------------
