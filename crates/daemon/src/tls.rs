//! The TCP endpoint's secrets: the bearer token and the TLS certificate.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("the token file {} has mode {mode:04o}, so group or others can read it (and with it use the API over TCP); run `chmod 600 {}`, replace the token if someone may have read it, and start viridiand again", path.display(), path.display())]
    TokenMode { path: PathBuf, mode: u32 },
    #[error("the TLS certificate and key do not make a usable server configuration: {0}")]
    Config(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the token from `<data-dir>/token`, making one (mode 0600) on first start.
/// An existing token file that group or others may read is refused: whoever
/// reads it can use the API.
pub fn load_or_create_token(data_dir: &Path) -> Result<String, TlsError> {
    let path = data_dir.join("token");
    match fs::metadata(&path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            return Err(TlsError::TokenMode {
                mode: m.permissions().mode() & 0o7777,
                path,
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&path)(e)),
    }
    if let Ok(t) = fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if t.len() >= 32 {
            return Ok(t);
        }
    }
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io(Path::new("/dev/urandom")))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    // `mode` applies only to a new file: an existing one is made private too.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// How long a generated certificate is valid: three years.
pub const GENERATED_VALIDITY_DAYS: i64 = 3 * 365;
/// A generated certificate that ends within this many days is made again at start.
pub const RENEW_WITHIN_DAYS: i64 = 30;
/// Certificates generated before validity was bounded end in this year (rcgen's
/// default); they are made again at start too.
const OLD_DEFAULT_END_YEAR: i64 = 4096;

/// Paths of the certificate and key: the configured ones, or a self-signed pair in
/// `<data-dir>/tls`, made on first start and made again when `renew` is asked, when
/// it ends within [`RENEW_WITHIN_DAYS`] or when it is one of the old ones valid
/// until 4096.
pub fn certificate_paths(
    data_dir: &Path,
    configured: Option<(PathBuf, PathBuf)>,
    renew: bool,
) -> Result<(PathBuf, PathBuf), TlsError> {
    if let Some(pair) = configured {
        return Ok(pair);
    }
    let dir = data_dir.join("tls");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        let end = fs::read(&cert).ok().and_then(|pem| certificate_end(&pem));
        let today = days_since_epoch_now();
        match end {
            _ if renew => {
                tracing::info!(certificate = %cert.display(), "making a new self-signed certificate (--renew-certificate)");
            }
            Some((year, _)) if year >= OLD_DEFAULT_END_YEAR => {
                tracing::info!(certificate = %cert.display(), "the self-signed certificate is valid until {year}; making one valid for {GENERATED_VALIDITY_DAYS} days");
            }
            Some((_, end)) if end - today <= RENEW_WITHIN_DAYS => {
                tracing::info!(certificate = %cert.display(), days_left = end - today, "the self-signed certificate ends soon; making a new one");
            }
            Some(_) => return Ok((cert, key)),
            None => {
                tracing::warn!(certificate = %cert.display(), "cannot read the certificate's validity; using it as it is");
                return Ok((cert, key));
            }
        }
    }
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let host = fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !host.is_empty() {
        names.push(host);
    }
    let generate = |names| -> Result<(String, String), rcgen::Error> {
        let mut params = rcgen::CertificateParams::new(names)?;
        let today = days_since_epoch_now();
        // A day back: a client whose clock is a little behind still accepts it.
        let (y, m, d) = civil_from_days(today - 1);
        params.not_before = rcgen::date_time_ymd(y, m, d);
        let (y, m, d) = civil_from_days(today + GENERATED_VALIDITY_DAYS);
        params.not_after = rcgen::date_time_ymd(y, m, d);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "viridiand self-signed");
        let key_pair = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key_pair)?;
        Ok((cert.pem(), key_pair.serialize_pem()))
    };
    let (cert_pem, key_pem) = generate(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    write_private(&key, key_pem.as_bytes())?;
    write_private(&cert, cert_pem.as_bytes())?;
    Ok((cert, key))
}

fn days_since_epoch_now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2)
}

/// The year and the day (since 1970-01-01) the first certificate of a PEM file
/// ends: its `notAfter`. `None` when the file holds no certificate this can read.
pub fn certificate_end(pem: &[u8]) -> Option<(i64, i64)> {
    let der = rustls_pemfile::certs(&mut &pem[..]).next()?.ok()?;
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter } ...
    let (_, cert, _) = der_item(der.as_ref(), 0x30)?;
    let (_, mut tbs, _) = der_item(cert, 0x30)?;
    if tbs.first() == Some(&0xA0) {
        tbs = der_item(tbs, 0xA0)?.2;
    }
    let tbs = der_item(tbs, 0x02)?.2; // serial number
    let tbs = der_item(tbs, 0x30)?.2; // signature algorithm
    let tbs = der_item(tbs, 0x30)?.2; // issuer
    let (_, validity, _) = der_item(tbs, 0x30)?;
    let (_, _, rest) = der_any_time(validity)?;
    let (tag, not_after, _) = der_any_time(rest)?;
    let text = std::str::from_utf8(not_after).ok()?;
    let digits = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (year, at) = if tag == 0x17 {
        // UTCTime: YYMMDD..., years 1950 to 2049.
        let yy = digits(0..2)?;
        (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
    } else {
        (digits(0..4)?, 4)
    };
    let month = digits(at..at + 2)?;
    let day = digits(at + 2..at + 4)?;
    Some((year, days_from_civil(year, month, day)))
}

/// One DER item of tag `tag` at the start of `buf`: (tag, contents, what follows).
fn der_item(buf: &[u8], tag: u8) -> Option<(u8, &[u8], &[u8])> {
    let item = der_next(buf)?;
    (item.0 == tag).then_some(item)
}

fn der_any_time(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let item = der_next(buf)?;
    matches!(item.0, 0x17 | 0x18).then_some(item)
}

fn der_next(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *buf.first()?;
    let first = *buf.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let len = buf
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, buf.get(header..end)?, buf.get(end..)?))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // In range for any date a clock gives: years fit i32, months 1-12, days 1-31.
    (y as i32, m as u8, d as u8)
}

pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cert_pem = fs::read(cert).map_err(io(cert))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(io(cert))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: cert.into() });
    }
    let key_pem = fs::read(key).map_err(io(key))?;
    let key_der: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(io(key))?
        .ok_or_else(|| TlsError::NoKey { path: key.into() })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip_through_day_numbers() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for z in [-1, 0, 59, 11_016, 20_000, 25_000, 50_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y.into(), m.into(), d.into()), z);
        }
    }
}
