//! The one place that reads the wall clock. Everything time-dependent (expiry, waiting
//! periods, TOTP, TTLs) takes a [`Clock`], so tests can fix time instead of sleeping.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of the current time, as Unix milliseconds (UTC).
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        #[allow(clippy::disallowed_methods)] // the one sanctioned wall-clock read
        let now = SystemTime::now();
        now.duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis()
            .try_into()
            .unwrap_or(i64::MAX)
    }
}

/// A clock that moves only when told (unit tests).
#[cfg(test)]
#[derive(Debug, Default)]
pub struct ManualClock(pub std::sync::atomic::AtomicI64);

#[cfg(test)]
impl ManualClock {
    /// A clock at `ms`.
    pub fn at(ms: i64) -> Self {
        ManualClock(std::sync::atomic::AtomicI64::new(ms))
    }

    /// Moves the clock forward.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Formats Unix milliseconds as RFC 3339 UTC with millisecond precision
/// (`2026-11-26T14:18:05.123Z`). Out-of-range values render as the epoch.
pub fn rfc3339(ms: i64) -> String {
    let ms = ms.max(0);
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `24h`, `30m`, `90s`, `7d`, `1h30m`, `250ms` → ms. `None` for anything else (no
/// number, no unit, an unknown unit, overflow).
pub fn parse_duration_ms(s: &str) -> Option<i64> {
    let mut total: i64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: i64 = rest[..digits].parse().ok()?;
        if rest[digits..].starts_with("ms") {
            total = total.checked_add(n)?;
            rest = &rest[digits + 2..];
            continue;
        }
        let unit_ms = match rest.as_bytes().get(digits)? {
            b's' => 1000,
            b'm' => 60 * 1000,
            b'h' => 3600 * 1000,
            b'd' => 86_400_000,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit_ms)?)?;
        rest = &rest[digits + 1..];
    }
    Some(total)
}

/// Parses RFC 3339 UTC (`2027-01-31T12:00:00Z`, optional fraction of a second) or a
/// bare date (`2027-01-31`, midnight UTC) into Unix ms. `None` for anything else,
/// including offsets other than `Z`.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, time) = match s.split_once(['T', 't']) {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut d = date.splitn(3, '-');
    let (y, m, day) = (d.next()?, d.next()?, d.next()?);
    if y.len() != 4 || m.len() != 2 || day.len() != 2 {
        return None;
    }
    let num = |x: &str| -> Option<i64> {
        x.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| x.parse().ok())?
    };
    let (y, m, day) = (num(y)?, num(m)?, num(day)?);
    if !(1..=12).contains(&m) || day < 1 || day > days_in_month(y, m) {
        return None;
    }
    let mut ms = days_from_civil(y, m, day).checked_mul(86_400_000)?;
    if let Some(t) = time {
        let t = t.strip_suffix(['Z', 'z'])?;
        let (hms, frac) = match t.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (t, None),
        };
        let mut p = hms.splitn(3, ':');
        let (h, mi, se) = (p.next()?, p.next()?, p.next()?);
        if h.len() != 2 || mi.len() != 2 || se.len() != 2 {
            return None;
        }
        let (h, mi, se) = (num(h)?, num(mi)?, num(se)?);
        if h > 23 || mi > 59 || se > 59 {
            return None;
        }
        ms += (h * 3600 + mi * 60 + se) * 1000;
        if let Some(f) = frac {
            if f.is_empty() || f.len() > 9 {
                return None;
            }
            let f3 = format!("{f:0<3}");
            ms += num(&f3[..3])?;
            num(f)?;
        }
    }
    Some(ms)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// (year, month, day) → days since 1970-01-01 (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_702_685_123), "2026-11-26T14:18:05.123Z");
    }

    #[test]
    fn parses_rfc3339() {
        for ms in [0, 951_782_400_000, 1_795_702_685_123, 4_102_444_800_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(parse_rfc3339("2000-02-29"), Some(951_782_400_000));
        assert_eq!(
            parse_rfc3339("2026-11-26T14:18:05Z"),
            Some(1_795_702_685_000)
        );
        assert_eq!(
            parse_rfc3339("2026-11-26T14:18:05.1Z"),
            Some(1_795_702_685_100)
        );
        for bad in [
            "",
            "2026-11-26T14:18:05",
            "2026-11-26T14:18:05+01:00",
            "2026-02-30",
            "2026-13-01",
            "2026-1-01",
            "2026-11-26T24:00:00Z",
            "2026-11-26T14:18:05.Z",
            "x026-11-26",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn system_clock_is_after_2024() {
        assert!(SystemClock.now_ms() > 1_700_000_000_000);
    }
}
