//! Reading a model directory's small metadata files defensively.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// The largest metadata file (JSON configs, manifests, pickled scalers) a loader reads.
pub const MAX_METADATA_BYTES: u64 = 16 << 20;

/// Reads `path` only if it is a regular file (after symlinks) of at most
/// [`MAX_METADATA_BYTES`]: a symlink to `/dev/zero` or a FIFO in a model directory is refused
/// instead of being read until memory runs out or blocking forever.
pub fn read_metadata(path: &Path) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() > MAX_METADATA_BYTES {
        bail!(
            "{} is {} bytes; metadata files are at most {MAX_METADATA_BYTES}",
            path.display(),
            meta.len()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > MAX_METADATA_BYTES {
        bail!(
            "{} grew past {MAX_METADATA_BYTES} bytes while read",
            path.display()
        );
    }
    Ok(bytes)
}

/// [`read_metadata`] as UTF-8 text.
pub fn read_metadata_string(path: &Path) -> Result<String> {
    String::from_utf8(read_metadata(path)?)
        .with_context(|| format!("{} is not UTF-8 text", path.display()))
}

/// Checks that a size read from a config file lies in `range`: configs are data, and a value
/// like `encoder_layers: 4294967297` must be an error, not an allocation or an overflow.
pub fn check_size(
    file: &str,
    name: &str,
    value: usize,
    range: std::ops::RangeInclusive<usize>,
) -> anyhow::Result<()> {
    if !range.contains(&value) {
        anyhow::bail!(
            "{file}: {name} = {value} is outside {}..={}",
            range.start(),
            range.end()
        );
    }
    Ok(())
}

/// Checks an attention head count read from a config: at least 1, and dividing the width.
pub fn check_heads(
    file: &str,
    (width_name, width): (&str, usize),
    (heads_name, heads): (&str, usize),
) -> anyhow::Result<()> {
    check_size(file, heads_name, heads, 1..=width.max(1))?;
    if !width.is_multiple_of(heads) {
        anyhow::bail!("{file}: {width_name} {width} is not divisible by {heads} heads");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_devices_fifos_and_huge_files() {
        let dir = std::env::temp_dir().join(format!("valence-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("valence.json");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let e = read_metadata(&link).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let fifo = dir.join("fifo.json");
        let _ = std::fs::remove_file(&fifo);
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        assert!(
            read_metadata(&fifo).is_err(),
            "a FIFO must be refused, not opened"
        );
        let big = dir.join("big.json");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_METADATA_BYTES + 1).unwrap();
        assert!(
            read_metadata(&big)
                .unwrap_err()
                .to_string()
                .contains("at most")
        );
        let ok = dir.join("ok.json");
        std::fs::write(&ok, "{}").unwrap();
        assert_eq!(read_metadata_string(&ok).unwrap(), "{}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
