//! CRC-32C (Castagnoli), the checksum of every VHDX header, region table and
//! log entry.

const POLY: u32 = 0x82F6_3B78; // 0x1EDC6F41, bit-reversed

const TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// CRC-32C of `data` with the 4-byte checksum field at `at` taken as zero.
pub fn crc32c_without(data: &[u8], at: usize) -> u32 {
    let mut copy = data.to_vec();
    if let Some(field) = copy.get_mut(at..at + 4) {
        field.fill(0);
    }
    crc32c(&copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }
}
