//! Leases: one instance of a role at a time holds a named job (the analytics throttler's
//! decision), in the `CRM_LEASES` key-value bucket (stream `KV_CRM_LEASES`, provisioned with the
//! others). The holder rewrites its key every tick; the bucket's `max_age` expires a key nobody
//! rewrote, and then another instance takes it. A write carries the revision it read, so two
//! instances can never both take or keep a lease.

use crate::{Bus, BusError};

/// The bucket.
pub const LEASE_BUCKET: &str = "CRM_LEASES";

impl Bus {
    /// Take or keep the lease `name` for `holder`: `true` while `holder` has it. Call it more
    /// often than the bucket's `max_age` (10 s) to keep it.
    pub async fn hold_lease(&self, name: &str, holder: &str) -> Result<bool, BusError> {
        let bucket = self
            .jetstream()
            .get_key_value(LEASE_BUCKET)
            .await
            .map_err(|err| BusError::unavailable(format!("the {LEASE_BUCKET} bucket"), err))?;
        let entry = bucket
            .entry(name)
            .await
            .map_err(|err| BusError::unavailable(format!("reading lease {name}"), err))?;
        let value = bytes::Bytes::copy_from_slice(holder.as_bytes());
        let held = entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put);
        Ok(match held {
            // Nobody holds it (never taken, or expired): the first create wins.
            None => bucket.create(name, value).await.is_ok(),
            Some(entry) if entry.value.as_ref() == holder.as_bytes() => {
                bucket.update(name, value, entry.revision).await.is_ok()
            }
            Some(_) => false,
        })
    }
}
