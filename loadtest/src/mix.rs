//! The events a run sends: classes by weight, tenants and customers by Zipf popularity, padded
//! payloads, and event ids that carry the run's tag and the event's index, so a processed notice
//! leads straight to the event's slot without a shared map.

use crate::scenario::Mix;
use events::{
    Event, EventType, FieldMask, SCHEMA_VERSION,
    pb::{
        ConsentChanged, ConsentChannel, Contact, ContactUpdated, DealStageChanged, DealWon,
        EmailClicked, EmailOpened, Money, PageViewed, PaymentFailed, TicketEscalated, TicketOpened,
        TicketSeverity, event::Payload,
    },
    pbjson_types::Timestamp,
};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use rand_distr::{Distribution, Zipf, weighted::WeightedIndex};

/// What the generator meant an event to be; the router decides its lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Critical = 0,
    High = 1,
    Standard = 2,
    AnalyticsOnly = 3,
}

impl Class {
    pub const ALL: [Class; 4] = [
        Self::Critical,
        Self::High,
        Self::Standard,
        Self::AnalyticsOnly,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::High => "high",
            Self::Standard => "standard",
            Self::AnalyticsOnly => "analytics_only",
        }
    }

    pub const fn from_index(index: u64) -> Self {
        match index & 3 {
            0 => Self::Critical,
            1 => Self::High,
            2 => Self::Standard,
            _ => Self::AnalyticsOnly,
        }
    }
}

pub use bus::control::unix_ms;

/// An event id (UUIDv7, valid for the platform) whose random bits carry `run_tag` (22 bits) and
/// `index` (40 bits). The timestamp part is `millis` (the event's intended send time), so ids
/// stay time-ordered and the report can name a missing event's id from its slot.
pub fn tracked_id(run_tag: u32, index: u64, millis: u64) -> String {
    let mut random = [0u8; 10];
    // random[0..2]: rand_a (the builder keeps its low 12 bits); random[2..5]: variant + tag;
    // random[5..10]: the index.
    random[0] = (index >> 40) as u8;
    random[1] = (index >> 48) as u8;
    let tag = run_tag & 0x3f_ffff;
    random[2] = (tag >> 16) as u8;
    random[3] = (tag >> 8) as u8;
    random[4] = tag as u8;
    for (k, byte) in random[5..10].iter_mut().enumerate() {
        *byte = (index >> (8 * (4 - k))) as u8;
    }
    uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .to_string()
}

/// The index [`tracked_id`] put into `id`, if `id` is one of this run's.
pub fn parse_tracked_id(id: &str, run_tag: u32) -> Option<u64> {
    let uuid = uuid::Uuid::try_parse(id).ok()?;
    let b = uuid.as_bytes();
    let tag = (u32::from(b[8] & 0x3f) << 16) | (u32::from(b[9]) << 8) | u32::from(b[10]);
    if tag != run_tag & 0x3f_ffff {
        return None;
    }
    let low = b[11..16]
        .iter()
        .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));
    Some(low)
}

/// Tenant `k` (0-based): its id and the API key the harness configures for it.
pub fn tenant_id(k: u64) -> String {
    format!("load{k:03}")
}

/// The tenants the harness configures for `mix`.
pub fn tenant_names(mix: &Mix) -> Vec<String> {
    (0..mix.tenants).map(tenant_id).collect()
}

pub fn api_key(k: u64) -> String {
    format!("crm-load-key-{k:03}")
}

/// Ranks 1..=n with Zipf popularity (exponent `s`; 0 = uniform).
#[derive(Debug, Clone)]
pub struct ZipfRank {
    zipf: Option<Zipf<f64>>,
    n: u64,
}

impl ZipfRank {
    pub fn new(n: u64, s: f64) -> Self {
        let zipf = (n > 1 && s > 0.0)
            .then(|| Zipf::new(n as f64, s).ok())
            .flatten();
        Self { zipf, n: n.max(1) }
    }

    /// A rank in 1..=n; rank 1 is the most popular.
    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        match &self.zipf {
            Some(zipf) => (zipf.sample(rng) as u64).clamp(1, self.n),
            None => rng.random_range(1..=self.n),
        }
    }
}

/// An event generated to fail, and how the platform must fail it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doom {
    /// No customer id: the router dead-letters it with reason `invalid_event`.
    Invalid,
    /// About the customer the store refuses: dead-lettered with reason `store_rejected`.
    Poison,
}

impl Doom {
    /// The dead-letter reason the platform must give it.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Invalid => "invalid_event",
            Self::Poison => "store_rejected",
        }
    }
}

/// The customer a poison event is about: the harness's trigger makes the store refuse it.
pub const POISON_CUSTOMER: &str = "poison";

/// One generated event and what it is for.
#[derive(Debug, Clone)]
pub struct Generated {
    pub event: Event,
    pub kind: EventType,
    pub class: Class,
    /// 0-based tenant number (selects the API key).
    pub tenant: u64,
    pub doom: Option<Doom>,
}

/// Events per the scenario's mix. One per sender task (no shared state, no locks).
#[derive(Debug)]
pub struct Generator {
    rng: SmallRng,
    classes: WeightedIndex<f64>,
    tenants: ZipfRank,
    customers: ZipfRank,
    tenant_names: Vec<String>,
    run_tag: u32,
    page_padding: usize,
    invalid_share: f64,
    poison_share: f64,
    idempotency_keys: bool,
    same_key_across_tenants: bool,
}

/// A page view's URL before padding.
const PAGE_URL: &str = "https://example.com/pricing";

impl Generator {
    /// Events for `tenants` (Zipf over them, in this order); [`tenant_names`] for a platform the
    /// harness configured, the key's one tenant for a running platform.
    pub fn new(mix: &Mix, tenants: &[String], run_tag: u32, seed: u64) -> Self {
        let weights = [mix.critical, mix.high, mix.standard, mix.analytics_only];
        // Validated by the scenario (non-negative, positive sum); uniform as a fallback.
        let classes = WeightedIndex::new(weights)
            .or_else(|_| WeightedIndex::new([1.0; 4]))
            .unwrap_or_else(|_| unreachable!("uniform weights are valid"));
        let mut generator = Self {
            rng: SmallRng::seed_from_u64(seed),
            classes,
            tenants: ZipfRank::new(tenants.len() as u64, mix.tenant_zipf_s),
            customers: ZipfRank::new(mix.customers_per_tenant, mix.customer_zipf_s),
            tenant_names: tenants.to_vec(),
            run_tag,
            page_padding: 0,
            invalid_share: mix.invalid_share,
            poison_share: mix.poison_share,
            idempotency_keys: mix.idempotency_keys,
            same_key_across_tenants: mix.same_key_across_tenants,
        };
        if mix.payload_bytes > 0 {
            let probe = generator.build(
                0,
                Class::AnalyticsOnly,
                EventType::PageViewed,
                0,
                1,
                unix_ms(),
            );
            let natural = events::encode_json(&probe).len();
            generator.page_padding = mix.payload_bytes.saturating_sub(natural);
        }
        generator
    }

    /// The next event, as event number `index` of the run, its id stamped now.
    pub fn next(&mut self, index: u64) -> Generated {
        self.next_for(index, None, unix_ms())
    }

    /// The next event, for `tenant` when given (a batch is one tenant's), else a Zipf pick; its
    /// id is stamped `id_millis`.
    pub fn next_for(&mut self, index: u64, tenant: Option<u64>, id_millis: u64) -> Generated {
        let class = Class::from_index(self.classes.sample(&mut self.rng) as u64);
        let kind = self.kind_of(class);
        let tenants = self.tenant_names.len().max(1) as u64;
        let tenant = match tenant {
            Some(tenant) => tenant,
            None if self.same_key_across_tenants => index % tenants,
            None => self.tenants.sample(&mut self.rng) - 1,
        };
        let customer = self.customers.sample(&mut self.rng);
        let mut event = self.build(index, class, kind, tenant, customer, id_millis);
        if self.same_key_across_tenants {
            event.idempotency_key = format!("k-{}", index / tenants);
        } else if self.idempotency_keys {
            event.idempotency_key = format!("k-{index}");
        }
        // A draw only when something is doomed: the other scenarios' events stay as they were.
        let draw: f64 = if self.invalid_share + self.poison_share > 0.0 {
            self.rng.random()
        } else {
            1.0
        };
        let doom = if draw < self.invalid_share {
            event.customer_id.clear();
            Some(Doom::Invalid)
        } else if draw < self.invalid_share + self.poison_share {
            event.customer_id = POISON_CUSTOMER.into();
            Some(Doom::Poison)
        } else {
            None
        };
        Generated {
            event,
            kind,
            class,
            tenant,
            doom,
        }
    }

    fn kind_of(&mut self, class: Class) -> EventType {
        let pick = self.rng.random_range(0..4u8);
        match class {
            Class::Critical => match pick {
                0 | 1 => EventType::PaymentFailed,
                2 => EventType::ConsentChanged,
                _ => EventType::TicketEscalated,
            },
            Class::High => EventType::DealWon,
            Class::Standard => match pick {
                0 | 1 => EventType::ContactUpdated,
                2 => EventType::DealStageChanged,
                _ => EventType::TicketOpened,
            },
            Class::AnalyticsOnly => match pick {
                0 | 1 => EventType::PageViewed,
                2 => EventType::EmailOpened,
                _ => EventType::EmailClicked,
            },
        }
    }

    fn build(
        &mut self,
        index: u64,
        class: Class,
        kind: EventType,
        tenant: u64,
        customer: u64,
        id_millis: u64,
    ) -> Event {
        let rng = &mut self.rng;
        let usd = |minor_units| {
            Some(Money {
                currency_code: "USD".into(),
                minor_units,
            })
        };
        let deal = format!("deal-{customer}-{}", rng.random_range(0..8u8));
        let ticket = format!("t-{customer}-{}", rng.random_range(0..4u8));
        let payload = match (class, kind) {
            (_, EventType::PaymentFailed) => Payload::PaymentFailed(PaymentFailed {
                payment_id: format!("pay-{index}"),
                amount: usd(rng.random_range(500..50_000)),
                failure_code: "card_declined".into(),
            }),
            (_, EventType::ConsentChanged) => Payload::ConsentChanged(ConsentChanged {
                channel: ConsentChannel::Email as i32,
                granted: false,
            }),
            (_, EventType::TicketEscalated) => Payload::TicketEscalated(TicketEscalated {
                ticket_id: ticket,
                severity: if rng.random_bool(0.5) {
                    TicketSeverity::High
                } else {
                    TicketSeverity::Critical
                } as i32,
                reason: "customer outage".into(),
            }),
            (_, EventType::DealWon) => Payload::DealWon(DealWon {
                deal_id: deal,
                amount: usd(rng.random_range(1_000_000..5_000_000)),
            }),
            (_, EventType::ContactUpdated) => Payload::ContactUpdated(ContactUpdated {
                contact: Some(Contact {
                    title: ["CTO", "VP Sales", "Engineer", "Buyer"][rng.random_range(0..4)].into(),
                    ..Contact::default()
                }),
                update_mask: Some(FieldMask {
                    paths: vec!["title".into()],
                }),
            }),
            (_, EventType::DealStageChanged) => Payload::DealStageChanged(DealStageChanged {
                deal_id: deal,
                from_stage: "qualified".into(),
                to_stage: "proposal".into(),
                amount: usd(rng.random_range(10_000..900_000)),
            }),
            (_, EventType::TicketOpened) => Payload::TicketOpened(TicketOpened {
                ticket_id: ticket,
                subject: "Cannot log in".into(),
                severity: TicketSeverity::Low as i32,
            }),
            (_, EventType::EmailOpened) => Payload::EmailOpened(EmailOpened {
                campaign_id: "spring".into(),
                message_id: format!("m-{customer}"),
            }),
            (_, EventType::EmailClicked) => Payload::EmailClicked(EmailClicked {
                campaign_id: "spring".into(),
                message_id: format!("m-{customer}"),
                url: "https://example.com/offer".into(),
            }),
            _ => {
                let mut url = String::with_capacity(PAGE_URL.len() + 3 + self.page_padding);
                url.push_str(PAGE_URL);
                if self.page_padding > 3 {
                    url.push_str("?p=");
                    url.extend(std::iter::repeat_n('x', self.page_padding - 3));
                }
                Payload::PageViewed(PageViewed {
                    url,
                    referrer: "https://example.com/".into(),
                })
            }
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Event {
            event_id: tracked_id(self.run_tag, index, id_millis),
            tenant_id: self
                .tenant_names
                .get(tenant as usize)
                .cloned()
                .unwrap_or_else(|| tenant_id(tenant)),
            customer_id: format!("c{customer}"),
            occurred_at: Some(Timestamp {
                seconds: now.as_secs() as i64,
                nanos: now.subsec_nanos() as i32,
            }),
            source: "crm-load".into(),
            idempotency_key: String::new(),
            schema_version: SCHEMA_VERSION,
            payload: Some(payload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracked_ids_are_valid_v7_and_round_trip() {
        for (tag, index) in [
            (0, 0),
            (1, 1),
            (0x3f_ffff, (1 << 40) - 1),
            (12345, 987_654_321),
        ] {
            let id = tracked_id(tag, index, unix_ms());
            assert!(events::is_uuid_v7(&id), "{id}");
            assert_eq!(parse_tracked_id(&id, tag), Some(index), "{id}");
            assert_eq!(parse_tracked_id(&id, tag ^ 1), None, "another run's id");
        }
        assert_eq!(parse_tracked_id("not-an-id", 1), None);
    }

    #[test]
    fn doomed_events_fail_as_meant_and_keys_follow_the_scheme() {
        let mix = Mix {
            invalid_share: 0.1,
            poison_share: 0.05,
            idempotency_keys: true,
            ..Mix::default()
        };
        let mut generator = Generator::new(&mix, &tenant_names(&mix), 3, 1);
        let (mut invalid, mut poison) = (0, 0);
        for index in 0..10_000 {
            let generated = generator.next(index);
            assert_eq!(generated.event.idempotency_key, format!("k-{index}"));
            match generated.doom {
                Some(Doom::Invalid) => {
                    invalid += 1;
                    let err = events::validate(&generated.event).expect_err("invalid");
                    assert!(err.to_string().contains("customer_id"), "{err}");
                }
                Some(Doom::Poison) => {
                    poison += 1;
                    events::validate(&generated.event).unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(generated.event.customer_id, POISON_CUSTOMER);
                }
                None => {
                    events::validate(&generated.event).unwrap_or_else(|e| panic!("{e}"));
                    assert_ne!(generated.event.customer_id, POISON_CUSTOMER);
                }
            }
        }
        assert!((800..1200).contains(&invalid), "{invalid}");
        assert!((350..650).contains(&poison), "{poison}");

        let pairs = Mix {
            tenants: 2,
            same_key_across_tenants: true,
            ..Mix::default()
        };
        let mut generator = Generator::new(&pairs, &tenant_names(&pairs), 3, 1);
        let a = generator.next(10);
        let b = generator.next(11);
        assert_eq!(a.event.idempotency_key, b.event.idempotency_key);
        assert_ne!(a.event.tenant_id, b.event.tenant_id);
        assert_ne!(a.event.event_id, b.event.event_id);
        assert_ne!(
            generator.next(12).event.idempotency_key,
            a.event.idempotency_key
        );
    }

    #[test]
    fn zipf_ranks_stay_in_bounds_and_favour_the_top() {
        let mut rng = SmallRng::seed_from_u64(7);
        let zipf = ZipfRank::new(100, 1.1);
        let mut counts = [0u32; 101];
        for _ in 0..100_000 {
            let rank = zipf.sample(&mut rng);
            assert!((1..=100).contains(&rank), "{rank}");
            counts[rank as usize] += 1;
        }
        // Rank 1 of Zipf(100, 1.1) has p ≈ 0.22; rank 2 ≈ 0.10; rank 100 ≈ 0.001.
        assert!(counts[1] > 18_000 && counts[1] < 26_000, "{}", counts[1]);
        assert!(
            counts[1] > 2 * counts[2] - 2_000,
            "{} vs {}",
            counts[1],
            counts[2]
        );
        assert!(counts[100] < 400, "{}", counts[100]);
        // s = 0 is uniform.
        let uniform = ZipfRank::new(4, 0.0);
        let mut seen = [0u32; 5];
        for _ in 0..40_000 {
            seen[uniform.sample(&mut rng) as usize] += 1;
        }
        assert!(
            seen[1..].iter().all(|c| (9_000..11_000).contains(c)),
            "{seen:?}"
        );
        assert_eq!(ZipfRank::new(1, 1.0).sample(&mut rng), 1);
    }

    #[test]
    fn events_follow_the_mix_and_validate() {
        let mix = Mix {
            critical: 1.0,
            high: 1.0,
            standard: 0.0,
            analytics_only: 2.0,
            payload_bytes: 2048,
            ..Mix::default()
        };
        let mut generator = Generator::new(&mix, &tenant_names(&mix), 99, 1);
        let mut by_class = std::collections::BTreeMap::new();
        for index in 0..4000 {
            let generated = generator.next(index);
            events::validate(&generated.event).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(parse_tracked_id(&generated.event.event_id, 99), Some(index));
            assert_eq!(EventType::of(&generated.event), Some(generated.kind));
            *by_class.entry(generated.class).or_insert(0u32) += 1;
            if generated.kind == EventType::PageViewed {
                let size = events::encode_json(&generated.event).len();
                assert!((2000..2200).contains(&size), "{size}");
            }
        }
        assert_eq!(by_class.get(&Class::Standard), None);
        let analytics = by_class[&Class::AnalyticsOnly];
        assert!((1800..2200).contains(&analytics), "{by_class:?}");
    }
}
