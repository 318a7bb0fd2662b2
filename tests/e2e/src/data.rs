//! Deterministic test payloads and their checksums.

use std::io::{Read, Write};
use std::path::Path;

use sha2::Digest as _;

/// Deterministic, incompressible bytes (xorshift64), so transfers cannot be "won" by compression.
/// The stream depends only on the seed, not on how it is read (any chunking gives the same bytes).
#[derive(Clone, Debug)]
pub struct Prng {
    state: u64,
    spare: [u8; 8],
    spare_len: usize,
}

impl Prng {
    /// A generator for `seed`; equal seeds give equal streams.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            spare: [0; 8],
            spare_len: 0,
        }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, mut buf: &mut [u8]) {
        if self.spare_len > 0 {
            let n = self.spare_len.min(buf.len());
            let start = 8 - self.spare_len;
            buf[..n].copy_from_slice(&self.spare[start..start + n]);
            self.spare_len -= n;
            buf = &mut buf[n..];
        }
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            self.spare = self.next_word().to_le_bytes();
            rest.copy_from_slice(&self.spare[..rest.len()]);
            self.spare_len = 8 - rest.len();
        }
    }

    /// `len` bytes of the stream.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }

    fn next_word(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }
}

/// Checks a received stream against the [`Prng`] stream it should be, byte for byte (stronger
/// than a checksum, and fast in unoptimized test builds, unlike SHA-256).
#[derive(Clone, Debug)]
pub struct PrngCheck {
    prng: Prng,
    expected: Vec<u8>,
    offset: u64,
    mismatch: Option<u64>,
}

impl PrngCheck {
    /// Expects the stream of `Prng::new(seed)`.
    pub fn new(seed: u64) -> Self {
        Self {
            prng: Prng::new(seed),
            expected: Vec::new(),
            offset: 0,
            mismatch: None,
        }
    }

    /// Checks the next received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.expected.resize(data.len(), 0);
        self.prng.fill(&mut self.expected);
        if self.mismatch.is_none() && data != self.expected.as_slice() {
            let at = data
                .iter()
                .zip(&self.expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            self.mismatch = Some(self.offset + at as u64);
        }
        self.offset += data.len() as u64;
    }

    /// Bytes checked so far.
    pub fn len(&self) -> u64 {
        self.offset
    }

    /// Whether nothing was checked.
    pub fn is_empty(&self) -> bool {
        self.offset == 0
    }

    /// The offset of the first byte that differed, if any.
    pub fn first_mismatch(&self) -> Option<u64> {
        self.mismatch
    }
}

/// Writes `len` bytes of [`Prng`] `seed` data to `path`.
pub fn write_random_file(path: &Path, len: usize, seed: u64) {
    let file = std::fs::File::create(path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    let mut out = std::io::BufWriter::new(file);
    let mut prng = Prng::new(seed);
    let mut chunk = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        prng.fill(&mut chunk[..n]);
        out.write_all(&chunk[..n]).expect("write test file");
        left -= n;
    }
    out.flush().expect("flush test file");
}

/// Hex SHA-256 of a file's contents: `sha256sum` when it is installed (the in-process SHA-256 of
/// an unoptimized test build runs at ~30 MiB/s), else computed here.
pub fn sha256_file(path: &Path) -> String {
    if let Ok(out) = std::process::Command::new("sha256sum").arg(path).output()
        && out.status.success()
        && let Some(hex) = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
        && hex.len() == 64
    {
        return hex.to_string();
    }
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).expect("read file");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// Hex SHA-256 of bytes.
pub fn sha256(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

/// Incremental hex SHA-256 (for streams too large to keep).
#[derive(Clone, Default)]
pub struct Sha256Stream {
    inner: sha2::Sha256,
    len: u64,
}

impl Sha256Stream {
    /// An empty hash.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was hashed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hex digest.
    pub fn hex(self) -> String {
        hex(&self.inner.finalize())
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Mebibytes per second for `bytes` moved in `secs`.
pub fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / secs.max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prng_stream_does_not_depend_on_chunking() {
        let whole = Prng::new(9).bytes(1000);
        let mut p = Prng::new(9);
        let mut pieces = Vec::new();
        for n in [1, 7, 8, 3, 100, 5, 876] {
            pieces.extend(p.bytes(n));
        }
        assert_eq!(pieces, whole);
        let mut check = PrngCheck::new(9);
        check.feed(&whole[..13]);
        check.feed(&whole[13..]);
        assert_eq!((check.len(), check.first_mismatch()), (1000, None));
        let mut bad = whole.clone();
        bad[500] ^= 1;
        let mut check = PrngCheck::new(9);
        check.feed(&bad);
        assert_eq!(check.first_mismatch(), Some(500));
    }
}
