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

/// `100 Mbit/s`, `1.5 Gbit/s`, `64 kbit/s`, `8000 bit/s`.
pub fn human_bits(bits: u64) -> String {
    let units = [
        (1e12, "Tbit/s"),
        (1e9, "Gbit/s"),
        (1e6, "Mbit/s"),
        (1e3, "kbit/s"),
    ];
    for (scale, name) in units {
        let v = bits as f64 / scale;
        if v >= 1.0 {
            return if v.fract() == 0.0 {
                format!("{v:.0} {name}")
            } else {
                format!("{v:.2} {name}")
            };
        }
    }
    format!("{bits} bit/s")
}

/// A network bandwidth: bits per second with decimal units (`100M` is 100
/// Mbit/s, `1.5G`, `64k`, `2500000`; `bit`, `bps` or `b` may follow), or `none`
/// for unlimited (`None`).
pub fn bandwidth_bits(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let bad = || {
        format!("{text:?} is not a bandwidth; give bits per second like 100M, 1.5G or 64k, or none for unlimited")
    };
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let unit = suffix.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("bps")
        .or_else(|| unit.strip_suffix("bit"))
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        _ => return Err(bad()),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let bits = (n * mult).round();
    if bits == 0.0 {
        return Err(format!(
            "a maximum bandwidth of {text:?} would carry nothing; give a rate like 100M, or none for unlimited"
        ));
    }
    if !bits.is_finite() || bits > u64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Some(bits as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidths_parse_in_decimal_bits_and_refuse_zero_and_signs() {
        assert_eq!(bandwidth_bits("100M"), Ok(Some(100_000_000)));
        assert_eq!(bandwidth_bits("1.5Gbit"), Ok(Some(1_500_000_000)));
        assert_eq!(bandwidth_bits("64kbps"), Ok(Some(64_000)));
        assert_eq!(bandwidth_bits("2500000"), Ok(Some(2_500_000)));
        assert_eq!(bandwidth_bits("none"), Ok(None));
        for bad in ["0", "0M", "-5M", "fast", "10Q", ""] {
            let e = bandwidth_bits(bad).unwrap_err();
            assert!(e.contains("bandwidth"), "{bad}: {e}");
        }
    }

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
