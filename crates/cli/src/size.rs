//! Sizes on the command line: `512M`, `4G`, `1.5GiB`, `1048576`.

/// Parses a size; a bare number counts in `unit` bytes (1 for disks, MiB for memory).
pub fn parse_size(text: &str, unit: u64) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let mult: u64 = match suffix
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => unit,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        other => {
            return Err(format!(
                "{text:?}: unknown size unit {other:?}; use K, M, G or T"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 512M or 4G"))?;
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes as u64)
}

pub fn memory_mib(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text, 1 << 20)?;
    if bytes % (1 << 20) != 0 {
        return Err(format!("{text:?} is not a whole number of MiB"));
    }
    Ok(bytes >> 20)
}

pub fn disk_bytes(text: &str) -> Result<u64, String> {
    parse_size(text, 1)
}

/// `1.5 GiB`, `512 MiB`, `100 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(memory_mib("512"), Ok(512));
        assert_eq!(memory_mib("512M"), Ok(512));
        assert_eq!(memory_mib("2G"), Ok(2048));
        assert_eq!(memory_mib("1.5GiB"), Ok(1536));
        assert_eq!(disk_bytes("10G"), Ok(10 << 30));
        assert_eq!(disk_bytes("4096"), Ok(4096));
        assert!(memory_mib("12Q").is_err());
        assert!(memory_mib("abc").is_err());
        assert_eq!(human(1536 << 20), "1.5 GiB");
    }
}
