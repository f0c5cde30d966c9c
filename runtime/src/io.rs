//! Reading files whose paths come from users: only regular files, never more than a stated
//! limit. A device (`/dev/zero`), a FIFO (which would block) or a directory is refused before it
//! is opened for reading; a file larger than the limit is refused from its size, and a file that
//! grows while it is read stops at the limit plus one byte.

use std::io::Read;
use std::path::Path;

/// What each kind of file may weigh.
pub mod limits {
    /// A spec file (and each file it extends).
    pub const SPEC: u64 = 1 << 20;
    /// A run-settings file.
    pub const SETTINGS: u64 = 1 << 20;
    /// A `tokenizer.json` (a 256K-token vocabulary takes about 20 MiB).
    pub const TOKENIZER: u64 = 64 << 20;
    /// One text file of a corpus.
    pub const TEXT: u64 = 1 << 30;
    /// One token shard.
    pub const SHARD: u64 = 16 << 30;
    /// A prompt file.
    pub const PROMPT: u64 = 16 << 20;
    /// `run.json` (the spec's text is at most 16 files of 1 MiB).
    pub const RUN_INFO: u64 = 32 << 20;
    /// A checkpoint's `state.json`, the `latest` pointer.
    pub const SMALL: u64 = 1 << 20;
    /// `metrics.jsonl`.
    pub const METRICS: u64 = 1 << 30;
    /// A bundle.
    pub const BUNDLE: u64 = 4 << 30;
}

/// The memory this process may still take: `MemAvailable` from `/proc/meminfo`, or the cgroup's
/// limit less its use when that is smaller; `None` where neither can be read.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let avail = meminfo.as_deref().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    });
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let cgroup = match (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => None,
    };
    match (avail, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// Binary prefixes for messages: `1 MiB`, `64 MiB`, `4 GiB`.
pub fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    }
}

/// Refuses anything but a regular file at most `limit` bytes long; returns its length.
pub fn check_file(path: &Path, limit: u64, what: &str) -> Result<u64, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {what} `{}`: {e}", path.display()))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let is = if kind.is_dir() { "a directory" } else { "not a regular file (a device, FIFO or socket)" };
        return Err(format!("{what} `{}` is {is}: give a regular file", path.display()));
    }
    if meta.len() > limit {
        return Err(format!(
            "{what} `{}` is {}, more than the {} a {what} may have",
            path.display(),
            size(meta.len()),
            size(limit)
        ));
    }
    Ok(meta.len())
}

/// The bytes of a regular file of at most `limit` bytes (see the module notes).
pub fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, String> {
    let len = check_file(path, limit, what)?;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {what} `{}`: {e}", path.display()))?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {what} `{}`: {e}", path.display()))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{what} `{}` grew past the {} a {what} may have", path.display(), size(limit)));
    }
    Ok(bytes)
}

/// As [`read_bounded`], as UTF-8 text; invalid UTF-8 is an error naming the byte offset.
pub fn read_text(path: &Path, limit: u64, what: &str) -> Result<String, String> {
    let bytes = read_bounded(path, limit, what)?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        let col = at - bytes[..at].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
        format!(
            "{what} `{}` is not UTF-8: invalid bytes at line {line}, column {col} (byte offset {at})",
            path.display()
        )
    })
}

/// A prompt from a file, or from standard input for `-`, at most 16 MiB of UTF-8.
pub fn read_prompt(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let limit = limits::PROMPT;
    if path != Path::new("-") {
        return read_text(path, limit, "prompt file");
    }
    let mut bytes = Vec::new();
    std::io::stdin()
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the prompt from standard input: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("the prompt on standard input is more than {}", size(limit)));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!("the prompt on standard input is not UTF-8 (byte offset {})", e.utf8_error().valid_up_to())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = std::env::temp_dir().join(format!("weft-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.txt");
        std::fs::write(&f, "hello\nwörld\n").unwrap();
        assert_eq!(read_text(&f, 100, "text file").unwrap(), "hello\nwörld\n");
        let e = read_bounded(&f, 5, "spec").unwrap_err();
        assert!(e.contains("13 bytes, more than the 5 bytes a spec may have"), "{e}");
        let e = read_bounded(&dir, 100, "spec").unwrap_err();
        assert!(e.contains("is a directory"), "{e}");
        let e = read_bounded(Path::new("/dev/zero"), 100, "spec").unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::write(&f, b"ok\n\xff\xfe").unwrap();
        let e = read_text(&f, 100, "spec").unwrap_err();
        assert!(e.contains("line 2, column 1 (byte offset 3)"), "{e}");
        assert_eq!(size(1 << 20), "1 MiB");
        assert_eq!(size(3 << 29), "1.5 GiB");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
