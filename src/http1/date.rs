//! The `Date` of an answer (RFC 9110 §6.6.1), formatted once a second per
//! thread.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

/// `Sun, 06 Nov 1994 08:49:37 GMT`: always this long.
pub const DATE_LEN: usize = 29;

struct Cached {
    second: u64,
    text: [u8; DATE_LEN],
}

thread_local! {
    static CACHED: RefCell<Cached> = const {
        RefCell::new(Cached { second: u64::MAX, text: [b' '; DATE_LEN] })
    };
}

/// Now, as an HTTP date.
pub fn date() -> [u8; DATE_LEN] {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.second != second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == DATE_LEN {
                c.text.copy_from_slice(text.as_bytes());
                c.second = second;
            }
        }
        c.text
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_parse_back() {
        let d = super::date();
        let text = std::str::from_utf8(&d).expect("ascii");
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
    }
}
