//! Leases: one instance of a role at a time holds a named job (the analytics throttler's
//! decision), in the `CRM_LEASES` key-value bucket (stream `KV_CRM_LEASES`, provisioned with the
//! others). The holder rewrites its key every tick; the bucket's `max_age` expires a key nobody
//! rewrote, and then another instance takes it. A write carries the revision it read, so two
//! instances can never both take or keep a lease.

use crate::{Bus, BusError};
use async_nats::jetstream::kv;

/// The bucket.
pub const LEASE_BUCKET: &str = "CRM_LEASES";

/// One instance's claim on the lease `name`.
#[derive(Debug)]
pub struct Lease {
    bus: Bus,
    name: String,
    holder: String,
    /// The bucket, looked up once it exists (a STREAM.INFO request; not one per renewal).
    bucket: Option<kv::Store>,
}

impl Lease {
    pub fn new(bus: Bus, name: impl Into<String>, holder: impl Into<String>) -> Self {
        Self {
            bus,
            name: name.into(),
            holder: holder.into(),
            bucket: None,
        }
    }

    /// Take or keep the lease: `true` while this holder has it. Call it more often than the
    /// bucket's `max_age` (10 s) to keep it.
    pub async fn hold(&mut self) -> Result<bool, BusError> {
        let bucket = match &self.bucket {
            Some(bucket) => bucket,
            None => {
                let bucket = self
                    .bus
                    .jetstream()
                    .get_key_value(LEASE_BUCKET)
                    .await
                    .map_err(|err| {
                        BusError::unavailable(format!("the {LEASE_BUCKET} bucket"), err)
                    })?;
                self.bucket.insert(bucket)
            }
        };
        let name = self.name.as_str();
        let entry = bucket
            .entry(name)
            .await
            .map_err(|err| BusError::unavailable(format!("reading lease {name}"), err))?;
        let value = bytes::Bytes::copy_from_slice(self.holder.as_bytes());
        let held = entry.filter(|e| e.operation == kv::Operation::Put);
        Ok(match held {
            // Nobody holds it (never taken, or expired): the first create wins.
            None => bucket.create(name, value).await.is_ok(),
            Some(entry) if entry.value.as_ref() == self.holder.as_bytes() => {
                bucket.update(name, value, entry.revision).await.is_ok()
            }
            Some(_) => false,
        })
    }
}
