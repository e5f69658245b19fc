//! Subject names: `crm.ingest.<tenant>.<type>`, `crm.lane.<lane>.<tenant>.<type>`,
//! `crm.dlq.<stage>.<tenant>.<type>`.

use crate::EventType;

/// Maximum length of a tenant id (it is a subject token).
pub const MAX_TENANT_LEN: usize = 64;

/// A priority lane; each is its own stream so one cannot delay another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    Critical,
    High,
    Standard,
}

impl Lane {
    /// Lanes from highest to lowest priority.
    pub const ALL: [Lane; 3] = [Self::Critical, Self::High, Self::Standard];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::High => "high",
            Self::Standard => "standard",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|lane| lane.as_str() == name)
    }

    /// The stream that stores this lane.
    pub const fn stream(self) -> &'static str {
        match self {
            Self::Critical => "CRM_LANE_CRITICAL",
            Self::High => "CRM_LANE_HIGH",
            Self::Standard => "CRM_LANE_STANDARD",
        }
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The processing stage that dead-lettered an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DlqStage {
    Gateway,
    Router,
    Projector,
    Notifier,
    Analytics,
}

impl DlqStage {
    pub const ALL: [DlqStage; 5] = [
        Self::Gateway,
        Self::Router,
        Self::Projector,
        Self::Notifier,
        Self::Analytics,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Router => "router",
            Self::Projector => "projector",
            Self::Notifier => "notifier",
            Self::Analytics => "analytics",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|stage| stage.as_str() == name)
    }
}

impl std::fmt::Display for DlqStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A subject that could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("tenant id {0:?} is not subject-safe (1..=64 of [A-Za-z0-9_-])")]
    BadTenant(String),
    #[error("subject {0:?} is not crm.ingest.<tenant>.<type> or crm.priority.<tenant>.<type>")]
    NotIngest(String),
    #[error("subject {subject:?} names unknown event type {token:?}")]
    UnknownType { subject: String, token: String },
}

/// Whether `token` can stand as one subject token: 1..=64 of `[A-Za-z0-9_-]`
/// (no dots, wildcards or whitespace).
pub fn is_subject_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TENANT_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn checked_tenant(tenant: &str) -> Result<&str, SubjectError> {
    if is_subject_token(tenant) {
        Ok(tenant)
    } else {
        Err(SubjectError::BadTenant(tenant.to_owned()))
    }
}

/// `crm.ingest.<tenant>.<type>`
pub fn ingest_subject(tenant: &str, kind: EventType) -> Result<String, SubjectError> {
    Ok(format!("crm.ingest.{}.{kind}", checked_tenant(tenant)?))
}

/// `crm.priority.<tenant>.<type>`: the priority ingest subject (stream CRM_INGEST_PRIORITY),
/// for events whose content makes them critical or high-value. It is read before every bulk
/// ingest subject and written over its own connections, so it waits behind no bulk event.
pub fn priority_subject(tenant: &str, kind: EventType) -> Result<String, SubjectError> {
    Ok(format!("crm.priority.{}.{kind}", checked_tenant(tenant)?))
}

/// `crm.lane.<lane>.<tenant>.<type>`
pub fn lane_subject(lane: Lane, tenant: &str, kind: EventType) -> Result<String, SubjectError> {
    Ok(format!(
        "crm.lane.{lane}.{}.{kind}",
        checked_tenant(tenant)?
    ))
}

/// `crm.dlq.<stage>.<tenant>.<type>`; `tenant`/`kind` may be unknown for undecodable input,
/// which goes to `crm.dlq.<stage>._unknown._unknown`.
pub fn dlq_subject(stage: DlqStage, tenant: Option<&str>, kind: Option<EventType>) -> String {
    let tenant = tenant.filter(|t| is_subject_token(t)).unwrap_or("_unknown");
    let kind = kind.map_or("_unknown", EventType::as_str);
    format!("crm.dlq.{stage}.{tenant}.{kind}")
}

/// Core-NATS subject on which the projector announces customers whose profile changed, as
/// `<tenant>\n<customer>` (routers drop their cached context for them).
pub const CUSTOMER_CHANGED_SUBJECT: &str = "crm.control.customer_changed";

/// The tenant and type tokens of `crm.ingest.<t>.<type>`, `crm.lane.<lane>.<t>.<type>` or
/// `crm.dlq.<stage>.<t>.<type>` (tokens as written, not checked).
pub fn tenant_and_type_tokens(subject: &str) -> Option<(&str, &str)> {
    let tokens: Vec<&str> = subject.split('.').collect();
    match tokens.as_slice() {
        ["crm", "ingest" | "priority", tenant, kind]
        | ["crm", "lane", _, tenant, kind]
        | ["crm", "dlq", _, tenant, kind] => Some((tenant, kind)),
        _ => None,
    }
}

/// The parts of an ingest subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestSubject<'a> {
    pub tenant: &'a str,
    pub kind: EventType,
}

/// Parse `crm.ingest.<tenant>.<type>` or `crm.priority.<tenant>.<type>`.
pub fn parse_ingest_subject(subject: &str) -> Result<IngestSubject<'_>, SubjectError> {
    let not_ingest = || SubjectError::NotIngest(subject.to_owned());
    let rest = subject
        .strip_prefix("crm.ingest.")
        .or_else(|| subject.strip_prefix("crm.priority."))
        .ok_or_else(not_ingest)?;
    let (tenant, token) = rest.split_once('.').ok_or_else(not_ingest)?;
    if !is_subject_token(tenant) || token.contains('.') {
        return Err(not_ingest());
    }
    let kind = EventType::from_name(token).ok_or_else(|| SubjectError::UnknownType {
        subject: subject.to_owned(),
        token: token.to_owned(),
    })?;
    Ok(IngestSubject { tenant, kind })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn builds_subjects() {
        assert_eq!(
            ingest_subject("acme", EventType::DealWon).as_deref(),
            Ok("crm.ingest.acme.deal_won")
        );
        assert_eq!(
            lane_subject(Lane::Critical, "acme-eu_1", EventType::PaymentFailed).as_deref(),
            Ok("crm.lane.critical.acme-eu_1.payment_failed")
        );
        assert_eq!(
            dlq_subject(DlqStage::Router, Some("acme"), Some(EventType::PageViewed)),
            "crm.dlq.router.acme.page_viewed"
        );
        assert_eq!(
            dlq_subject(DlqStage::Router, Some("a.b"), None),
            "crm.dlq.router._unknown._unknown"
        );
    }

    #[test]
    fn refuses_unsafe_tenants() {
        for bad in ["", "a.b", "a b", "*", ">", "a>", &"x".repeat(65), "é"] {
            assert_eq!(
                ingest_subject(bad, EventType::DealWon),
                Err(SubjectError::BadTenant(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn parses_ingest_subjects() {
        assert_eq!(
            parse_ingest_subject("crm.priority.acme.consent_changed"),
            Ok(IngestSubject {
                tenant: "acme",
                kind: EventType::ConsentChanged
            })
        );
        assert_eq!(
            priority_subject("acme", EventType::PaymentFailed).as_deref(),
            Ok("crm.priority.acme.payment_failed")
        );
        assert_eq!(
            tenant_and_type_tokens("crm.priority.acme.deal_won"),
            Some(("acme", "deal_won"))
        );
        assert!(parse_ingest_subject("crm.prio.acme.deal_won").is_err());
        let parsed = parse_ingest_subject("crm.ingest.acme.ticket_opened");
        assert_eq!(
            parsed,
            Ok(IngestSubject {
                tenant: "acme",
                kind: EventType::TicketOpened
            })
        );
        assert!(matches!(
            parse_ingest_subject("crm.ingest.acme.bogus"),
            Err(SubjectError::UnknownType { .. })
        ));
        for bad in [
            "crm.lane.x.y",
            "crm.ingest.acme",
            "crm.ingest.acme.deal_won.extra",
            "crm.ingest..deal_won",
        ] {
            assert!(
                matches!(parse_ingest_subject(bad), Err(SubjectError::NotIngest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn reads_tenant_and_type_tokens() {
        let tokens = tenant_and_type_tokens;
        assert_eq!(
            tokens("crm.ingest.acme.deal_won"),
            Some(("acme", "deal_won"))
        );
        assert_eq!(
            tokens("crm.lane.critical.acme.payment_failed"),
            Some(("acme", "payment_failed"))
        );
        assert_eq!(
            tokens("crm.dlq.router._unknown._unknown"),
            Some(("_unknown", "_unknown"))
        );
        assert_eq!(tokens("crm.ingest.acme"), None);
        assert_eq!(tokens("other.subject"), None);
    }

    #[test]
    fn lane_names_round_trip() {
        for lane in Lane::ALL {
            assert_eq!(Lane::from_name(lane.as_str()), Some(lane));
        }
        for stage in DlqStage::ALL {
            assert_eq!(DlqStage::from_name(stage.as_str()), Some(stage));
        }
    }

    proptest! {
        #[test]
        fn ingest_subjects_parse_back(tenant in "[A-Za-z0-9_-]{1,64}", index in 0usize..12) {
            let kind = EventType::ALL[index];
            let subject = ingest_subject(&tenant, kind).expect("safe tenant");
            let parsed = parse_ingest_subject(&subject).expect("parses");
            prop_assert_eq!(parsed.tenant, tenant.as_str());
            prop_assert_eq!(parsed.kind, kind);
        }

        #[test]
        fn arbitrary_tokens_never_make_multi_token_subjects(tenant in ".{0,80}") {
            if let Ok(subject) = ingest_subject(&tenant, EventType::DealWon) {
                prop_assert_eq!(subject.split('.').count(), 4);
                prop_assert!(!subject.contains(['*', '>', ' ']));
            }
        }
    }
}
