use uuid::{Uuid, Version};

/// A new time-ordered event id (UUIDv7), in its hyphenated lower-case form.
pub fn new_event_id() -> String {
    Uuid::now_v7().to_string()
}

/// Whether `id` is a UUID of version 7 (RFC 9562) in its canonical hyphenated form.
pub fn is_uuid_v7(id: &str) -> bool {
    id.len() == 36
        && Uuid::try_parse(id).is_ok_and(|uuid| uuid.get_version() == Some(Version::SortRand))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_v7_and_ordered() {
        let a = new_event_id();
        let b = new_event_id();
        assert!(is_uuid_v7(&a), "{a}");
        assert!(a < b, "v7 ids sort by creation time: {a} !< {b}");
    }

    #[test]
    fn rejects_other_versions_and_forms() {
        assert!(!is_uuid_v7(&Uuid::new_v4().to_string()));
        assert!(!is_uuid_v7(&Uuid::now_v7().simple().to_string()));
        assert!(!is_uuid_v7("not-a-uuid"));
        assert!(!is_uuid_v7(""));
    }
}
