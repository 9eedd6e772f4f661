//! The key store: SHA-256 digest -> key record, built once per config load.
//!
//! A presented key is hashed exactly once (SHA-256, with the CPU's SHA extensions where
//! present); the digest is already uniformly distributed, so the table uses its first 8 bytes
//! as the hash instead of hashing it a second time.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use crate::auth::KeyDigest;
#[cfg(test)]
use crate::config::DigestConfig;
use crate::config::{KEY_META_HEADER_PREFIX, KeyConfig, KeyId, Plan, PlanName};
use crate::limit::KeyLimits;
use crate::limit::charge::{KeySpec, Layout, QuotaTable};

/// What tollgate knows about a key. Records live in the store's table itself, and what an
/// admission decision reads (digest, limits, disabled, scopes) is the first cache line of one.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct KeyRecord {
    /// The digest the key is found by.
    pub digest: KeyDigest,
    /// The key's token buckets and their header parts; carried over across reloads while
    /// its limits are unchanged.
    pub limits: Arc<KeyLimits>,
    /// Scopes held.
    pub scopes: Box<[String]>,
    /// Revoked keys are answered like unknown ones.
    pub disabled: bool,
    /// When this digest stops working, in seconds since the Unix epoch ([`NEVER_EXPIRES`]:
    /// never); the earlier of the key's and the digest's `expires_at`. Four bytes, so it
    /// shares the first cache line with what else an admission reads.
    pub expires: u32,
    /// The plan's position among the config's plans (in their order), which is also its
    /// index in the snapshot's metrics table: counting a request compares no plan names.
    pub plan_index: usize,
    /// Public id.
    pub id: KeyId,
    /// Plan.
    pub plan: PlanName,
    /// `X-Tollgate-Key-Id` value, built once.
    pub id_header: HeaderValue,
    /// `X-Tollgate-Plan` value, built once.
    pub plan_header: HeaderValue,
    /// `X-Tollgate-Key-Meta-<Name>` headers for the upstream, built once and shared by the
    /// key's digests; `None` for a key without metadata. A thin pointer (not `Arc<[_]>`):
    /// with it the record stays three cache lines.
    pub metadata: Option<Arc<Vec<(HeaderName, HeaderValue)>>>,
}

/// [`KeyRecord::expires`] of a digest that does not expire.
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// Records are found by digest: the table holds records, keyed by their `digest` field.
impl Borrow<KeyDigest> for KeyRecord {
    fn borrow(&self) -> &KeyDigest {
        &self.digest
    }
}

impl Hash for KeyRecord {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.digest.hash(state);
    }
}

impl PartialEq for KeyRecord {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for KeyRecord {}

impl KeyRecord {
    /// The metadata headers for the upstream (none for most keys).
    pub fn metadata_headers(&self) -> &[(HeaderName, HeaderValue)] {
        self.metadata.as_deref().map_or(&[], Vec::as_slice)
    }

    /// Whether the digest has an expiry at all (most have none: no clock is read for them).
    #[inline]
    pub fn expires(&self) -> Option<u32> {
        (self.expires != NEVER_EXPIRES).then_some(self.expires)
    }

    /// The first scope of `required` this key lacks.
    pub fn missing_scope<'r>(&self, required: &'r [String]) -> Option<&'r str> {
        required
            .iter()
            .find(|scope| !self.scopes.contains(scope))
            .map(String::as_str)
    }
}

/// Uses the first 8 bytes of a digest as its hash.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-digest keys; fold so it stays a valid hasher.
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(buf);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// All keys of the running config, by digest. Records live in the table itself: a lookup
/// reads the digest and the record's hot fields from one cache line, with no pointer to
/// follow (with 10k keys that is a cache miss saved on every request).
#[derive(Debug, Default)]
pub struct KeyStore {
    by_digest: HashSet<KeyRecord, BuildHasherDefault<DigestHasher>>,
}

impl KeyStore {
    /// Builds the store from validated keys. A key that was in `previous` (same id) with the
    /// same limits keeps its buckets, so a reload hands nobody a fresh burst.
    // Records are hashed and compared by digest alone, which never changes; the buckets'
    // interior mutability does not touch the key.
    pub fn new(
        keys: &[KeyConfig],
        plans: &BTreeMap<PlanName, Plan>,
        previous: Option<&KeyStore>,
    ) -> Self {
        Self::from_keys(keys.to_vec(), plans, previous)
    }

    /// [`Self::new`] taking the keys: each one's id, plan and scopes move into its record
    /// instead of being copied and then freed with the config (a million keys' worth of
    /// allocations at every load).
    pub fn from_keys(
        keys: Vec<KeyConfig>,
        plans: &BTreeMap<PlanName, Plan>,
        previous: Option<&KeyStore>,
    ) -> Self {
        let quotas = QuotaTable::default();
        let layout = Layout {
            routes: &[],
            quotas: &quotas,
        };
        Self::build(keys, plans, layout, previous)
    }

    /// [`Self::from_keys`] with the routes (for route buckets and costs) and the process's
    /// quota counters.
    #[allow(clippy::mutable_key_type)]
    pub fn build(
        keys: Vec<KeyConfig>,
        plans: &BTreeMap<PlanName, Plan>,
        layout: Layout<'_>,
        previous: Option<&KeyStore>,
    ) -> Self {
        let old: HashMap<&KeyId, &KeyRecord> = previous
            .map(|p| p.by_digest.iter().map(|r| (&r.id, r)).collect())
            .unwrap_or_default();
        let plan_indexes: HashMap<&PlanName, usize> =
            plans.keys().enumerate().map(|(i, p)| (p, i)).collect();
        let mut by_digest =
            HashSet::with_capacity_and_hasher(keys.len(), BuildHasherDefault::default());
        for key in keys {
            let plan = plans.get(&key.plan).expect("key plans are validated");
            let spec = KeySpec {
                plan_name: &key.plan.0,
                plan,
                custom_per_minute: key.requests_per_minute,
                requests_per_month: key.requests_per_month,
                routes: &key.routes,
                id: &key.id,
            };
            let limits = KeyLimits::build(&spec, layout, old.get(&key.id).map(|r| &r.limits));
            let metadata =
                (!key.metadata.is_empty()).then(|| Arc::new(metadata_headers(&key.metadata)));
            let id_header = HeaderValue::from_str(&key.id.0).expect("key ids are validated");
            let plan_header = HeaderValue::from_str(&key.plan.0).expect("plan names are validated");
            // Every digest of a key is one identity: the same buckets, id and plan.
            for digest in &key.digests {
                let expires = key.expiry_of(digest).map_or(NEVER_EXPIRES, |at| {
                    u32::try_from(at).unwrap_or(NEVER_EXPIRES - 1)
                });
                by_digest.insert(KeyRecord {
                    digest: digest.digest,
                    limits: limits.clone(),
                    plan_index: plan_indexes[&key.plan],
                    id_header: id_header.clone(),
                    plan_header: plan_header.clone(),
                    id: key.id.clone(),
                    plan: key.plan.clone(),
                    scopes: key.scopes.clone().into_boxed_slice(),
                    disabled: key.disabled,
                    expires,
                    metadata: metadata.clone(),
                });
            }
        }
        Self { by_digest }
    }

    /// The enabled record for a presented key, if any.
    pub fn lookup(&self, presented: &[u8]) -> Option<&KeyRecord> {
        self.get(&KeyDigest::of(presented))
    }

    /// The record of key id `id`, disabled or not. A scan of every key: for the admin
    /// listener, never the request path.
    pub fn by_id(&self, id: &str) -> Option<&KeyRecord> {
        self.by_digest.iter().find(|record| &*record.id.0 == id)
    }

    /// The admin listener's `GET /usage/<id>` body for key id `id` at `now` (Unix seconds).
    pub fn usage(&self, id: &str, now: u64) -> Option<serde_json::Value> {
        let record = self.by_id(id)?;
        let mut usage = record.limits.usage(now);
        usage["key_id"] = serde_json::Value::from(&*record.id.0);
        usage["plan"] = serde_json::Value::from(&*record.plan.0);
        Some(usage)
    }

    /// The enabled record with this digest, if any.
    #[inline]
    pub fn get(&self, digest: &KeyDigest) -> Option<&KeyRecord> {
        self.by_digest.get(digest).filter(|record| !record.disabled)
    }

    /// Number of digests (a key with two digests counts twice).
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

/// `X-Tollgate-Key-Meta-<Name>` (with `_` written `-`) for each validated metadata entry.
fn metadata_headers(metadata: &[(String, String)]) -> Vec<(HeaderName, HeaderValue)> {
    metadata
        .iter()
        .filter_map(|(name, value)| {
            let name = format!("{KEY_META_HEADER_PREFIX}{}", name.replace('_', "-"));
            Some((
                HeaderName::from_bytes(name.as_bytes()).ok()?,
                HeaderValue::from_str(value).ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ApiKey;

    fn key(id: &str, secret: &str, scopes: &[&str], disabled: bool) -> KeyConfig {
        KeyConfig {
            id: KeyId(Arc::from(id)),
            digests: vec![DigestConfig::new(ApiKey::new(secret).digest())],
            plan: PlanName(Arc::from("pro")),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            requests_per_minute: None,
            disabled,
            requests_per_month: None,
            routes: Default::default(),
            expires_at: None,
            metadata: Vec::new(),
            created_at: None,
        }
    }

    fn plans() -> BTreeMap<PlanName, Plan> {
        let rpm = std::num::NonZeroU32::new(300).unwrap();
        [(
            PlanName(Arc::from("pro")),
            Plan {
                requests_per_minute: rpm,
                burst: rpm,
                requests_per_hour: None,
                requests_per_day: None,
                requests_per_month: None,
                routes: Default::default(),
            },
        )]
        .into_iter()
        .collect()
    }

    #[test]
    fn reload_keeps_buckets_of_unchanged_keys() {
        let first = KeyStore::new(&[key("a", "secret-a", &[], false)], &plans(), None);
        let again = KeyStore::new(&[key("a", "secret-a", &[], false)], &plans(), Some(&first));
        assert!(Arc::ptr_eq(
            &first.lookup(b"secret-a").unwrap().limits,
            &again.lookup(b"secret-a").unwrap().limits
        ));
        let mut custom = key("a", "secret-a", &[], false);
        custom.requests_per_minute = std::num::NonZeroU32::new(5);
        let changed = KeyStore::new(&[custom], &plans(), Some(&again));
        assert_eq!(
            changed.lookup(b"secret-a").unwrap().limits.limiter.specs()[0]
                .limit
                .get(),
            5
        );
    }

    #[test]
    fn what_a_lookup_reads_is_one_cache_line() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!(align_of::<KeyRecord>(), 64);
        assert!(offset_of!(KeyRecord, digest) + size_of::<KeyDigest>() <= 64);
        assert!(offset_of!(KeyRecord, limits) + 8 <= 64);
        assert!(offset_of!(KeyRecord, disabled) < 64);
        assert!(offset_of!(KeyRecord, scopes) + 16 <= 64);
        assert!(offset_of!(KeyRecord, expires) + 4 <= 64);
        // Three cache lines, as before keys had expiries and metadata.
        assert_eq!(size_of::<KeyRecord>(), 192);
    }

    #[test]
    fn every_digest_of_a_key_is_one_identity() {
        let mut k = key("a", "new", &["x:read"], false);
        k.expires_at = Some(2_000);
        k.digests.push(DigestConfig {
            digest: ApiKey::new("old").digest(),
            expires_at: Some(1_000),
        });
        k.metadata = vec![("customer_id".to_owned(), "cus_1".to_owned())];
        let store = KeyStore::new(&[k], &plans(), None);
        let (new, old) = (store.lookup(b"new").unwrap(), store.lookup(b"old").unwrap());
        assert!(Arc::ptr_eq(&new.limits, &old.limits), "one set of buckets");
        assert!(Arc::ptr_eq(
            new.metadata.as_ref().unwrap(),
            old.metadata.as_ref().unwrap()
        ));
        assert_eq!((new.expires(), old.expires()), (Some(2_000), Some(1_000)));
        assert_eq!(
            new.metadata_headers()[0].0,
            "x-tollgate-key-meta-customer-id"
        );
        assert_eq!(new.metadata_headers()[0].1, "cus_1");
        assert_eq!(store.len(), 2);
        let plain = KeyStore::new(&[key("b", "b", &[], false)], &plans(), None);
        assert_eq!(plain.lookup(b"b").unwrap().expires(), None);
    }

    #[test]
    fn records_carry_their_plans_position() {
        let mut plans = plans();
        let mut free = plans[&PlanName(Arc::from("pro"))].clone();
        free.requests_per_minute = std::num::NonZeroU32::new(60).unwrap();
        plans.insert(PlanName(Arc::from("free")), free);
        let store = KeyStore::new(&[key("a", "secret-a", &[], false)], &plans, None);
        // "free" sorts first, so "pro" is the second plan, as in the metrics table.
        assert_eq!(store.lookup(b"secret-a").unwrap().plan_index, 1);
    }

    #[test]
    fn lookup_by_presented_key() {
        let store = KeyStore::new(
            &[
                key("a", "secret-a", &["x:read"], false),
                key("b", "secret-b", &[], true),
            ],
            &plans(),
            None,
        );
        let a = store.lookup(b"secret-a").unwrap();
        assert_eq!(&*a.id.0, "a");
        assert_eq!(a.id_header, "a");
        assert_eq!(a.plan_header, "pro");
        assert!(store.lookup(b"secret-b").is_none(), "disabled");
        assert!(store.lookup(b"secret-c").is_none());
        assert_eq!(a.missing_scope(&["x:read".to_owned()]), None);
        assert_eq!(
            a.missing_scope(&["x:read".to_owned(), "x:write".to_owned()]),
            Some("x:write")
        );
    }
}
