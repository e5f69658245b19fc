//! A batch's register writes, reduced before they reach the store: one multi-row statement per
//! table instead of one statement per write.
//!
//! Each register (a profile field, a consent channel, a deal's state or amount, a ticket) is
//! last-writer-wins by `(occurred_at_ns, event_id)`, so of several writes to one register in a
//! batch only the greatest can matter: the rest are reduced away here, in memory. Profile fields
//! also log the writes that lost (a write that arrived after a newer one), which needs the
//! register's value before the batch: [`settle_fields`] replays the batch's writes over it in
//! batch order, exactly as one statement per write would have. Every statement keeps its
//! `WHERE newer` guard, so a concurrent transaction (PostgreSQL) can never make a register go
//! back.

use crate::writes::{Write, occurred_at_ns, writes};
use events::Event;
use std::collections::{BTreeMap, BTreeSet};

/// `(tenant_id, customer_id, key)`: a register of one customer.
pub(crate) type Key = (String, String, String);

/// One version of a register: its value and `(occurred_at_ns, event_id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Version<V> {
    pub value: V,
    pub at: i64,
    pub id: String,
}

impl<V> Version<V> {
    fn newer_than(&self, other: &Self) -> bool {
        (self.at, &self.id) > (other.at, &other.id)
    }
}

/// The deal state register's value: stage and status.
pub(crate) type DealState = (String, &'static str);
/// The deal amount register's value: minor units and currency.
pub(crate) type DealAmount = (i64, String);

/// Every register write of a batch's applied events, grouped by table.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Profile field writes in batch order (the order decides which writes are logged as lost).
    pub fields: Vec<(Key, Version<String>)>,
    /// The newest write per register.
    pub consents: BTreeMap<Key, Version<bool>>,
    pub tickets: BTreeMap<Key, Version<(String, &'static str)>>,
    pub deal_states: BTreeMap<Key, Version<DealState>>,
    pub deal_amounts: BTreeMap<Key, Version<DealAmount>>,
    /// Customers with a deal write: their lifetime value may have changed.
    pub deal_customers: BTreeSet<(String, String)>,
}

fn keep_newest<V>(map: &mut BTreeMap<Key, Version<V>>, key: Key, version: Version<V>) {
    match map.get(&key) {
        Some(current) if !version.newer_than(current) => {}
        _ => {
            map.insert(key, version);
        }
    }
}

impl Plan {
    /// Add `event`'s writes (call in the order the events apply).
    pub fn add(&mut self, event: &Event) {
        let (tenant, customer) = (&event.tenant_id, &event.customer_id);
        let (at, id) = (occurred_at_ns(event), &event.event_id);
        let key = |k: &str| (tenant.clone(), customer.clone(), k.to_owned());
        fn version<V>(value: V, at: i64, id: &str) -> Version<V> {
            Version {
                value,
                at,
                id: id.to_owned(),
            }
        }
        for write in writes(event) {
            match write {
                Write::Field { field, value } => {
                    self.fields.push((key(field), version(value, at, id)))
                }
                Write::Consent { channel, granted } => {
                    keep_newest(&mut self.consents, key(&channel), version(granted, at, id));
                }
                Write::Ticket {
                    ticket_id,
                    severity,
                    status,
                } => keep_newest(
                    &mut self.tickets,
                    key(&ticket_id),
                    version((severity, status), at, id),
                ),
                Write::Deal {
                    deal_id,
                    stage,
                    status,
                    amount,
                } => {
                    self.deal_customers
                        .insert((tenant.clone(), customer.clone()));
                    if let Some(amount) = amount {
                        keep_newest(
                            &mut self.deal_amounts,
                            key(&deal_id),
                            version(amount, at, id),
                        );
                    }
                    keep_newest(
                        &mut self.deal_states,
                        key(&deal_id),
                        version((stage, status), at, id),
                    );
                }
            }
        }
    }

    /// The distinct profile field registers the batch writes, sorted.
    pub fn field_keys(&self) -> Vec<Key> {
        let keys: BTreeSet<&Key> = self.fields.iter().map(|(key, _)| key).collect();
        keys.into_iter().cloned().collect()
    }
}

/// A profile field write that lost to a newer version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lost {
    pub key: Key,
    pub losing: Version<String>,
    pub winning_id: String,
    pub winning_at: i64,
}

/// The outcome of replaying a batch's field writes over the registers' stored versions.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SettledFields {
    /// The version to store per register the batch changed, sorted by key.
    pub winners: Vec<(Key, Version<String>)>,
    /// Writes that lost to a newer version with a different value, in batch order.
    pub lost: Vec<Lost>,
}

/// Replay `writes` (in batch order) over `stored` (each register's version before the batch):
/// a write wins when it is newer than the register's version at that point; a write that does not
/// win and carries a different value than the version it lost to is logged as lost.
pub(crate) fn settle_fields(
    writes: &[(Key, Version<String>)],
    mut stored: BTreeMap<Key, Version<String>>,
) -> SettledFields {
    let mut changed: BTreeSet<&Key> = BTreeSet::new();
    let mut lost = Vec::new();
    for (key, write) in writes {
        match stored.get(key) {
            Some(current) if !write.newer_than(current) => {
                if current.value != write.value {
                    lost.push(Lost {
                        key: key.clone(),
                        losing: write.clone(),
                        winning_id: current.id.clone(),
                        winning_at: current.at,
                    });
                }
            }
            _ => {
                stored.insert(key.clone(), write.clone());
                changed.insert(key);
            }
        }
    }
    let winners = changed
        .into_iter()
        .filter_map(|key| stored.remove_entry(key))
        .collect();
    SettledFields { winners, lost }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(field: &str) -> Key {
        ("t".into(), "c".into(), field.into())
    }

    fn v(value: &str, at: i64, id: &str) -> Version<String> {
        Version {
            value: value.into(),
            at,
            id: id.into(),
        }
    }

    #[test]
    fn a_write_loses_only_to_what_is_newer_when_it_arrives() {
        let stored = BTreeMap::from([(key("title"), v("CEO", 20, "e20"))]);
        let writes = [
            // Older than the stored version, other value: lost.
            (key("title"), v("Intern", 10, "e10")),
            // Older, same value: not a conflict.
            (key("title"), v("CEO", 5, "e05")),
            // A register the store does not have: wins, then a newer write in the batch wins over it.
            (key("company"), v("A", 1, "e01")),
            (key("company"), v("B", 2, "e02")),
            // Older than the batch's own winner: lost to it.
            (key("company"), v("C", 1, "e00")),
        ];
        let settled = settle_fields(&writes, stored);
        assert_eq!(settled.winners, [(key("company"), v("B", 2, "e02"))]);
        let lost: Vec<_> = settled
            .lost
            .iter()
            .map(|l| (l.losing.value.as_str(), l.winning_id.as_str()))
            .collect();
        assert_eq!(lost, [("Intern", "e20"), ("C", "e02")]);
    }

    #[test]
    fn the_same_instant_is_decided_by_the_event_id() {
        let writes = [
            (key("company"), v("B", 1, "b")),
            (key("company"), v("A", 1, "a")),
        ];
        let settled = settle_fields(&writes, BTreeMap::new());
        assert_eq!(settled.winners, [(key("company"), v("B", 1, "b"))]);
        assert_eq!(settled.lost.len(), 1);
    }

    #[test]
    fn only_the_newest_write_per_register_is_kept() {
        let mut map = BTreeMap::new();
        keep_newest(&mut map, key("email"), v("x", 2, "b"));
        keep_newest(&mut map, key("email"), v("y", 1, "z"));
        keep_newest(&mut map, key("email"), v("z", 2, "c"));
        assert_eq!(map[&key("email")], v("z", 2, "c"));
    }
}
