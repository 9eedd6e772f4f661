//! The names of the fields in upstream response heads, kept per worker thread. An upstream
//! sends the same names in every response; a custom one (`x-request-id`, `x-powered-by`, ...)
//! would otherwise be checked byte by byte and copied into an allocation of its own each time
//! (`HeaderName::from_bytes`), and that allocation freed when the response is written. A kept
//! name is a reference count instead.
//!
//! The table is direct-mapped: a name has one slot, chosen from its length and three of its
//! bytes, and takes the slot over on a miss. It is keyed by the name exactly as the upstream
//! spelled it, so a hit needs no validation: the same bytes made the same name before. Long
//! names are not kept, so the memory a stream of odd names can hold stays small.

use std::cell::RefCell;

use http::HeaderName;
use http::header::InvalidHeaderName;

/// Slots per thread.
const SLOTS: usize = 64;

/// The longest name kept.
const MAX_KEPT: usize = 40;

/// A kept name: its spelling on the wire, and the name it made.
struct Kept {
    len: u8,
    raw: [u8; MAX_KEPT],
    name: HeaderName,
}

thread_local! {
    static KEPT: RefCell<[Option<Kept>; SLOTS]> = const { RefCell::new([const { None }; SLOTS]) };
}

/// The field name `raw` spells, as [`HeaderName::from_bytes`] makes it.
pub fn name(raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    if raw.is_empty() || raw.len() > MAX_KEPT {
        return HeaderName::from_bytes(raw);
    }
    let slot = slot_of(raw);
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        if let Some(k) = &kept[slot]
            && &k.raw[..usize::from(k.len)] == raw
        {
            return Ok(k.name.clone());
        }
        let name = HeaderName::from_bytes(raw)?;
        let mut copy = [0u8; MAX_KEPT];
        copy[..raw.len()].copy_from_slice(raw);
        kept[slot] = Some(Kept {
            // At most MAX_KEPT.
            len: raw.len() as u8,
            raw: copy,
            name: name.clone(),
        });
        Ok(name)
    })
}

/// `raw`'s slot: from its length and its first, middle and last bytes.
fn slot_of(raw: &[u8]) -> usize {
    let byte = |at: usize| usize::from(raw[at]);
    let mixed = raw.len().wrapping_mul(0x9e37)
        ^ byte(0)
        ^ (byte(raw.len() / 2) << 3)
        ^ (byte(raw.len() - 1) << 6);
    (mixed ^ (mixed >> 7)) % SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_what_from_bytes_makes_whether_kept_or_not() {
        for raw in [
            &b"x-request-id"[..],
            b"X-Request-Id",
            b"content-length",
            b"Content-Type",
            b"x-powered-by",
            b"a",
            &[b'x'; MAX_KEPT],
            &[b'y'; MAX_KEPT + 1],
        ] {
            let want = HeaderName::from_bytes(raw).unwrap();
            // The first call makes and keeps it, the second finds it.
            assert_eq!(name(raw).unwrap(), want);
            assert_eq!(name(raw).unwrap(), want);
        }
    }

    #[test]
    fn an_invalid_name_is_refused_every_time() {
        for raw in [
            &b""[..],
            b"bad name",
            b"x:y",
            b"caf\xc3\xa9",
            &[b' '; MAX_KEPT + 1],
        ] {
            assert!(name(raw).is_err(), "{raw:?}");
            assert!(name(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn names_that_share_a_slot_take_it_over_and_stay_right() {
        // Every two-letter name: far more than the slots, so many collide.
        let names: Vec<[u8; 2]> = (b'a'..=b'z')
            .flat_map(|a| (b'a'..=b'z').map(move |b| [a, b]))
            .collect();
        for _ in 0..2 {
            for raw in &names {
                assert_eq!(name(raw).unwrap().as_str().as_bytes(), raw);
            }
        }
        // A spelling in another case is its own key, and makes the same name.
        assert_eq!(name(b"Ab").unwrap(), name(b"ab").unwrap());
        assert_eq!(name(b"Ab").unwrap().as_str(), "ab");
    }
}
