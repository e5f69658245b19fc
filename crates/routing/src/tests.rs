use super::*;
use events::{
    pb::{ConsentChanged, Money, PaymentFailed, TicketEscalated, TicketOpened},
    sample,
};
use proptest::prelude::*;

fn event(kind: EventType) -> Event {
    sample::event(kind, "acme", "c1")
}

fn with(payload: Payload) -> Event {
    sample::with_payload(payload, "acme", "c1")
}

fn usd(minor_units: i64) -> Option<Money> {
    Some(Money {
        currency_code: "USD".into(),
        minor_units,
    })
}

fn consent(granted: bool) -> Event {
    with(Payload::ConsentChanged(ConsentChanged {
        channel: events::pb::ConsentChannel::Sms as i32,
        granted,
    }))
}

fn ticket_opened(severity: i32) -> Event {
    with(Payload::TicketOpened(TicketOpened {
        ticket_id: "t".into(),
        subject: "s".into(),
        severity,
    }))
}

fn ticket_escalated(severity: TicketSeverity) -> Event {
    with(Payload::TicketEscalated(TicketEscalated {
        ticket_id: "t".into(),
        severity: severity as i32,
        reason: "r".into(),
    }))
}

/// An event of `kind` whose amount (if it has one) is `minor`.
fn with_amount(kind: EventType, minor: i64) -> Event {
    let mut event = event(kind);
    match event.payload.as_mut() {
        Some(Payload::DealWon(p)) => p.amount = usd(minor),
        Some(Payload::DealStageChanged(p)) => p.amount = usd(minor),
        Some(Payload::PaymentFailed(p)) => p.amount = usd(minor),
        _ => {}
    }
    event
}

fn context(tier: CustomerTier, lifetime_value: &[(&str, i64)]) -> CustomerContext {
    CustomerContext {
        tier,
        lifetime_value: lifetime_value
            .iter()
            .map(|&(currency, minor)| (currency.to_owned(), minor))
            .collect(),
    }
}

fn decide(rules: &Rules, event: &Event, context: Option<&CustomerContext>) -> (Lane, String) {
    let decision = rules.classify(event, context);
    (decision.lane, decision.reason)
}

fn rules(text: &str) -> Rules {
    Rules::from_toml(text).expect("valid rules")
}

fn error(text: &str) -> String {
    Rules::from_toml(text)
        .expect_err("invalid rules")
        .to_string()
}

#[test]
fn default_rules_are_the_example_file() {
    assert_eq!(rules(EXAMPLE_TOML), Rules::default());
    assert_eq!(
        Rules::default().reasons().collect::<Vec<_>>(),
        [
            "consent_revoked",
            "payment_failed",
            "ticket_severity",
            "deal_amount",
            "customer_tier",
            "lifetime_value",
            "default"
        ]
    );
}

#[test]
fn committed_routing_toml_matches_the_example_when_present() {
    // The repository's `routing.toml` is a copy of the example; catch the two drifting apart.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../routing.toml");
    if let Ok(text) = std::fs::read_to_string(path) {
        assert_eq!(rules(&text), Rules::default(), "{path}");
    }
}

#[test]
fn default_rules_table() {
    let rules = Rules::default();
    let critical = Lane::Critical;
    let high = Lane::High;
    let standard = Lane::Standard;
    let premium = || Some(context(CustomerTier::Premium, &[]));
    let spent = |value: &[(&str, i64)]| Some(context(CustomerTier::Free, value));
    #[rustfmt::skip]
    let cases: Vec<(&str, Event, Option<CustomerContext>, Lane, &str)> = vec![
        ("consent revoked", consent(false), None, critical, "consent_revoked"),
        ("consent granted", consent(true), None, standard, "default"),
        ("consent granted, premium", consent(true), premium(), high, "customer_tier"),
        ("payment failed, any amount", with_amount(EventType::PaymentFailed, 1), None, critical, "payment_failed"),
        ("payment failed, premium", event(EventType::PaymentFailed), premium(), critical, "payment_failed"),
        ("ticket escalated critical", ticket_escalated(TicketSeverity::Critical), None, critical, "ticket_severity"),
        ("ticket opened high", ticket_opened(TicketSeverity::High as i32), None, critical, "ticket_severity"),
        ("ticket opened medium", ticket_opened(TicketSeverity::Medium as i32), None, standard, "default"),
        ("ticket of unknown severity", ticket_opened(99), None, standard, "default"),
        ("deal won at threshold", with_amount(EventType::DealWon, 1_000_000), None, high, "deal_amount"),
        ("deal won below", with_amount(EventType::DealWon, 999_999), None, standard, "default"),
        ("deal stage changed above", with_amount(EventType::DealStageChanged, 2_000_000), None, high, "deal_amount"),
        ("deal lost", event(EventType::DealLost), None, standard, "default"),
        ("page view, no context", event(EventType::PageViewed), None, standard, "default"),
        ("page view, premium", event(EventType::PageViewed), premium(), high, "customer_tier"),
        ("page view, big spender in USD", event(EventType::PageViewed), spent(&[("USD", 5_000_000)]), high, "lifetime_value"),
        ("page view, big spender in EUR", event(EventType::PageViewed), spent(&[("EUR", 4_500_000), ("USD", 1)]), high, "lifetime_value"),
        ("page view, ordinary", event(EventType::PageViewed), spent(&[("USD", 4_999_999), ("EUR", 4_499_999)]), standard, "default"),
        // Currencies are never added: 4.9M USD and 4.4M EUR are not 9.3M of anything.
        ("page view, ordinary in two currencies", event(EventType::PageViewed), spent(&[("USD", 4_900_000), ("EUR", 4_400_000)]), standard, "default"),
        ("page view, big spender in an unlisted currency", event(EventType::PageViewed), spent(&[("JPY", 900_000_000)]), standard, "default"),
        ("no payload", Event::default(), premium(), standard, "default"),
    ];
    for (name, event, context, lane, reason) in cases {
        assert_eq!(
            decide(&rules, &event, context.as_ref()),
            (lane, reason.to_owned()),
            "{name}"
        );
    }
}

#[test]
fn amount_rule_applies_to_payment_failed_too() {
    let rules = rules(
        "[[high]]\nreason = \"big_payment\"\ntypes = [\"payment_failed\"]\nwhen = { min_amount_minor = 100 }\n",
    );
    let amount_missing = with(Payload::PaymentFailed(PaymentFailed {
        payment_id: "p".into(),
        amount: None,
        failure_code: "x".into(),
    }));
    assert_eq!(
        decide(&rules, &with_amount(EventType::PaymentFailed, 100), None).1,
        "big_payment"
    );
    assert_eq!(
        decide(&rules, &with_amount(EventType::PaymentFailed, 99), None).1,
        "default"
    );
    assert_eq!(decide(&rules, &amount_missing, None).1, "default");
}

#[test]
fn severity_order() {
    let order = [
        TicketSeverity::Unspecified,
        TicketSeverity::Low,
        TicketSeverity::Medium,
        TicketSeverity::High,
        TicketSeverity::Critical,
    ];
    for (min_index, (min_name, _)) in SEVERITY_NAMES.iter().enumerate() {
        let rules = rules(&format!(
            "[[critical]]\nreason = \"sev\"\nwhen = {{ min_ticket_severity = \"{min_name}\" }}\n"
        ));
        for (index, severity) in order.into_iter().enumerate() {
            // `order` has Unspecified first, so index i corresponds to SEVERITY_NAMES[i - 1].
            let expected = index > min_index;
            let got = rules.classify(&ticket_escalated(severity), None).lane == Lane::Critical;
            assert_eq!(got, expected, "{severity:?} >= {min_name}");
        }
    }
}

#[test]
fn tier_order() {
    let order = [
        CustomerTier::Unspecified,
        CustomerTier::Free,
        CustomerTier::Standard,
        CustomerTier::Premium,
        CustomerTier::Enterprise,
    ];
    let page = event(EventType::PageViewed);
    for (min_index, (min_name, _)) in TIER_NAMES.iter().enumerate() {
        let rules = rules(&format!(
            "[[high]]\nreason = \"tier\"\nwhen = {{ min_customer_tier = \"{min_name}\" }}\n"
        ));
        for (index, tier) in order.into_iter().enumerate() {
            let expected = index > min_index;
            let got = rules.classify(&page, Some(&context(tier, &[]))).lane == Lane::High;
            assert_eq!(got, expected, "{tier:?} >= {min_name}");
        }
    }
}

#[test]
fn conditions_in_one_rule_must_all_hold() {
    let rules = rules(
        "[[high]]\nreason = \"vip_deal\"\ntypes = [\"deal_won\"]\n\
         when = { min_amount_minor = 100, min_customer_tier = \"premium\", min_lifetime_value = { USD = 10 } }\n",
    );
    let deal = with_amount(EventType::DealWon, 100);
    let vip = context(CustomerTier::Enterprise, &[("USD", 10)]);
    assert_eq!(decide(&rules, &deal, Some(&vip)).1, "vip_deal");
    assert_eq!(decide(&rules, &deal, None).1, "default");
    assert_eq!(
        decide(
            &rules,
            &deal,
            Some(&context(CustomerTier::Enterprise, &[("USD", 9)]))
        )
        .1,
        "default"
    );
    assert_eq!(
        decide(
            &rules,
            &deal,
            Some(&context(CustomerTier::Standard, &[("USD", 10)]))
        )
        .1,
        "default"
    );
    assert_eq!(
        decide(&rules, &with_amount(EventType::DealWon, 99), Some(&vip)).1,
        "default"
    );
}

#[test]
fn critical_rules_win_over_earlier_high_rules_and_file_order_decides() {
    let rules = rules(
        "[[high]]\nreason = \"everything\"\n\
         [[critical]]\nreason = \"first\"\ntypes = [\"deal_lost\"]\n\
         [[critical]]\nreason = \"second\"\ntypes = [\"deal_lost\", \"deal_won\"]\n",
    );
    assert_eq!(
        decide(&rules, &event(EventType::DealLost), None),
        (Lane::Critical, "first".into())
    );
    assert_eq!(
        decide(&rules, &event(EventType::DealWon), None),
        (Lane::Critical, "second".into())
    );
    assert_eq!(
        decide(&rules, &event(EventType::PageViewed), None),
        (Lane::High, "everything".into())
    );
}

#[test]
fn customer_context_is_needed_only_when_it_can_change_the_decision() {
    let default = Rules::default();
    let only_types = rules("[[critical]]\nreason = \"x\"\ntypes = [\"deal_lost\"]\n");
    let context_for_deals = rules(
        "[[high]]\nreason = \"vip_deal\"\ntypes = [\"deal_won\"]\n\
         when = { min_amount_minor = 100, min_customer_tier = \"premium\" }\n",
    );
    #[rustfmt::skip]
    let cases: Vec<(&str, &Rules, Event, bool)> = vec![
        ("critical by type decides first", &default, event(EventType::PaymentFailed), false),
        ("revoked consent is critical", &default, consent(false), false),
        ("granted consent falls through to context rules", &default, consent(true), true),
        ("severe ticket is critical", &default, ticket_escalated(TicketSeverity::Critical), false),
        ("mild ticket falls through", &default, ticket_opened(TicketSeverity::Low as i32), true),
        ("big deal matches before context rules", &default, with_amount(EventType::DealWon, 1_000_000), false),
        ("small deal falls through", &default, with_amount(EventType::DealWon, 5), true),
        ("page view", &default, event(EventType::PageViewed), true),
        ("no payload", &default, Event::default(), false),
        ("no context rules at all", &only_types, event(EventType::PageViewed), false),
        ("context rule of another type", &context_for_deals, event(EventType::PageViewed), false),
        ("context rule whose event part fails", &context_for_deals, with_amount(EventType::DealWon, 99), false),
        ("context rule whose event part holds", &context_for_deals, with_amount(EventType::DealWon, 100), true),
    ];
    for (name, rules, event, needed) in cases {
        assert_eq!(rules.needs_customer_context(&event), needed, "{name}");
    }
}

#[test]
fn errors_name_the_rule_and_field() {
    #[rustfmt::skip]
    let cases = [
        (
            "[[high]]\nreason = \"a\"\n[[high]]\nreason = \"b\"\nwhen = { min_customer_tier = \"gold\" }\n",
            "high[1].when.min_customer_tier: unknown tier \"gold\" (one of free, standard, premium, enterprise)",
        ),
        (
            "[[critical]]\nreason = \"a\"\nwhen = { min_ticket_severity = \"urgent\" }\n",
            "critical[0].when.min_ticket_severity: unknown severity \"urgent\" (one of low, medium, high, critical)",
        ),
        (
            "[[critical]]\nreason = \"a\"\ntypes = [\"deal_won\", \"nope\"]\n",
            "critical[0].types[1]: unknown event type \"nope\"",
        ),
        (
            "[[critical]]\nreason = \"a\"\ntypes = []\n",
            "critical[0].types: names no event type (omit it to match every type)",
        ),
        (
            "[[critical]]\nreason = \"Bad Label\"\n",
            "critical[0].reason: \"Bad Label\" must be 1 to 64 of [a-z0-9_] and not \"default\"",
        ),
        (
            "[[high]]\nreason = \"default\"\n",
            "high[0].reason: \"default\" must be 1 to 64 of [a-z0-9_] and not \"default\"",
        ),
        (
            "[[high]]\nreason = \"a\"\ntypes = [\"deal_won\", \"page_viewed\"]\nwhen = { min_amount_minor = 5 }\n",
            "high[0].when.min_amount_minor: does not apply to \"page_viewed\", only to deal_stage_changed, deal_won, payment_failed",
        ),
        (
            "[[high]]\nreason = \"a\"\nwhen = { consent_granted = false, min_amount_minor = 5 }\n",
            "high[0].when.min_amount_minor: no event type carries both this and an earlier condition",
        ),
        (
            "[[high]]\nreason = \"a\"\nwhen = { min_lifetime_value = { USD = -1 } }\n",
            "high[0].when.min_lifetime_value.USD: -1 must be >= 0",
        ),
        (
            "[[high]]\nreason = \"a\"\nwhen = { min_lifetime_value = { usd = 5 } }\n",
            "high[0].when.min_lifetime_value.usd: is not an ISO 4217 currency code such as \"USD\"",
        ),
        (
            "[[high]]\nreason = \"a\"\nwhen = { min_lifetime_value = {} }\n",
            "high[0].when.min_lifetime_value: names no currency (e.g. { USD = 5000000 })",
        ),
        (
            // The key of old rule files: refused with the one that replaced it.
            "[[high]]\nreason = \"a\"\n[[high]]\nreason = \"b\"\nwhen = { min_lifetime_value_minor = 5000000 }\n",
            "high[1].when.min_lifetime_value_minor: is no longer supported: lifetime value is kept per currency; use min_lifetime_value = { USD = 5000000, EUR = 4500000 } (matches when the value in any listed currency reaches its threshold)",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(error(text), expected, "{text}");
    }
    let too_long = format!(
        "[[high]]\nreason = \"{}\"\n",
        "a".repeat(MAX_REASON_LEN + 1)
    );
    assert!(error(&too_long).starts_with("high[0].reason: "));
    rules(&format!(
        "[[high]]\nreason = \"{}\"\n",
        "a".repeat(MAX_REASON_LEN)
    ));
}

#[test]
fn unknown_keys_and_bad_toml_are_refused() {
    for (text, needle) in [
        (
            "[[critical]]\nreason = \"a\"\nwhen = { colour = 1 }\n",
            "colour",
        ),
        ("[[critical]]\nreason = \"a\"\nlane = \"high\"\n", "lane"),
        ("[[medium]]\nreason = \"a\"\n", "medium"),
        ("[[high]]\ntypes = [\"deal_won\"]\n", "reason"),
        ("[[high]]\nreason = 5\n", "string"),
        ("[[high]\n", "TOML"),
    ] {
        let message = error(text);
        assert!(
            message.starts_with("routing rules are not valid: "),
            "{message}"
        );
        assert!(message.contains(needle), "{needle:?} not in {message}");
    }
}

#[test]
fn an_empty_file_routes_everything_to_standard() {
    let rules = rules("");
    assert_eq!(
        decide(&rules, &consent(false), None),
        (Lane::Standard, "default".into())
    );
    assert!(!rules.needs_customer_context(&event(EventType::PageViewed)));
}

// ---- properties ------------------------------------------------------------------------------

/// One generated rule as TOML: an optional event condition with types it applies to (or none),
/// optional customer conditions.
fn arb_rule() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["critical", "high"]),
        0usize..5,
        0usize..4,
        any::<u16>(),
        any::<bool>(),
        0usize..4,
        -1i64..2_000_000,
        prop::option::of(0usize..4),
        prop::option::of(prop::collection::btree_map(
            prop::sample::select(vec!["USD", "EUR", "JPY"]),
            0i64..10_000_000,
            1..3,
        )),
    )
        .prop_map(
            |(lane, reason, condition, mask, granted, severity, amount, tier, ltv)| {
                let (applies, mut when) = match condition {
                    1 => (CONSENT_TYPES, vec![format!("consent_granted = {granted}")]),
                    2 => (
                        SEVERITY_TYPES,
                        vec![format!(
                            "min_ticket_severity = \"{}\"",
                            SEVERITY_NAMES[severity].0
                        )],
                    ),
                    3 => (
                        AMOUNT_TYPES,
                        vec![format!("min_amount_minor = {}", amount.max(0))],
                    ),
                    _ => (TypeSet::ALL, vec![]),
                };
                if let Some(tier) = tier {
                    when.push(format!("min_customer_tier = \"{}\"", TIER_NAMES[tier].0));
                }
                if let Some(ltv) = ltv {
                    let thresholds: Vec<_> =
                        ltv.iter().map(|(c, min)| format!("{c} = {min}")).collect();
                    when.push(format!(
                        "min_lifetime_value = {{ {} }}",
                        thresholds.join(", ")
                    ));
                }
                let types = TypeSet(mask & applies.0);
                let mut text = format!("[[{lane}]]\nreason = \"r{reason}\"\n");
                if types.0 != 0 {
                    let names: Vec<_> = EventType::ALL
                        .into_iter()
                        .filter(|kind| types.contains(*kind))
                        .map(|kind| format!("{:?}", kind.as_str()))
                        .collect();
                    text += &format!("types = [{}]\n", names.join(", "));
                }
                text += &format!("when = {{ {} }}\n", when.join(", "));
                text
            },
        )
}

/// Any event type with arbitrary values in the fields rules look at, or no payload at all.
fn arb_event() -> impl Strategy<Value = Event> {
    (
        0usize..EventType::ALL.len(),
        -1i32..6,
        prop::option::of(any::<i64>()),
        any::<bool>(),
        0u8..20,
    )
        .prop_map(|(kind, severity, amount, granted, roll)| {
            let mut event = event(EventType::ALL[kind]);
            let money = amount.and_then(usd);
            match event.payload.as_mut() {
                Some(Payload::TicketOpened(p)) => p.severity = severity,
                Some(Payload::TicketEscalated(p)) => p.severity = severity,
                Some(Payload::ConsentChanged(p)) => p.granted = granted,
                Some(Payload::DealWon(p)) => p.amount = money,
                Some(Payload::DealStageChanged(p)) => p.amount = money,
                Some(Payload::PaymentFailed(p)) => p.amount = money,
                _ => {}
            }
            if roll == 0 {
                event.payload = None;
            }
            event
        })
}

fn arb_context() -> impl Strategy<Value = CustomerContext> {
    (
        0i32..5,
        prop::collection::btree_map(
            prop::sample::select(vec!["USD", "EUR", "JPY", "GBP"]).prop_map(str::to_owned),
            any::<i64>(),
            0..3,
        ),
    )
        .prop_map(|(tier, lifetime_value)| CustomerContext {
            tier: CustomerTier::try_from(tier).unwrap_or_default(),
            lifetime_value,
        })
}

proptest! {
    #[test]
    fn decisions_are_total_and_carry_a_configured_reason(
        rule_texts in prop::collection::vec(arb_rule(), 0..8),
        event in arb_event(),
        context in arb_context(),
    ) {
        let rules = Rules::from_toml(&rule_texts.concat());
        prop_assert!(rules.is_ok(), "{:?}", rules);
        let rules = rules.unwrap_or_default();
        for context in [None, Some(&context)] {
            let decision = rules.classify(&event, context);
            prop_assert!(rules.reasons().any(|r| r == decision.reason), "{decision:?}");
            if decision.reason == DEFAULT_REASON {
                prop_assert_eq!(decision.lane, Lane::Standard);
            } else {
                prop_assert!(rules.rules.iter().any(|r| r.lane == decision.lane && r.reason == decision.reason));
            }
        }
    }

    #[test]
    fn context_never_matters_when_it_is_not_needed(
        rule_texts in prop::collection::vec(arb_rule(), 0..8),
        event in arb_event(),
        context in arb_context(),
    ) {
        let rules = Rules::from_toml(&rule_texts.concat()).unwrap_or_default();
        if !rules.needs_customer_context(&event) {
            prop_assert_eq!(rules.classify(&event, Some(&context)), rules.classify(&event, None));
        }
    }

    #[test]
    fn lifetime_value_holds_iff_a_listed_currency_reaches_its_threshold(
        thresholds in prop::collection::btree_map(
            prop::sample::select(vec!["USD", "EUR", "JPY"]), 0i64..1_000, 1..3),
        context in arb_context(),
    ) {
        let listed: Vec<_> = thresholds.iter().map(|(c, min)| format!("{c} = {min}")).collect();
        let rules = Rules::from_toml(&format!(
            "[[high]]\nreason = \"ltv\"\nwhen = {{ min_lifetime_value = {{ {} }} }}\n",
            listed.join(", ")
        ));
        prop_assert!(rules.is_ok(), "{:?}", rules);
        let rules = rules.unwrap_or_default();
        let expected = thresholds
            .iter()
            .any(|(currency, min)| context.lifetime_value.get(*currency).is_some_and(|v| v >= min));
        let decided = rules.classify(&event(EventType::PageViewed), Some(&context));
        prop_assert_eq!(decided.reason == "ltv", expected, "{:?}", decided);
    }

    #[test]
    fn default_rules_never_panic(event in arb_event(), context in arb_context(), with_context in any::<bool>()) {
        let rules = Rules::default();
        let decision = rules.classify(&event, with_context.then_some(&context));
        prop_assert!(rules.reasons().any(|r| r == decision.reason));
    }
}
