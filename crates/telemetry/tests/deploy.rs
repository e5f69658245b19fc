//! Every metric name used anywhere (the crates' sources, the alert rules, the dashboard) is one
//! the platform declares in `telemetry::metrics`.

const DEPLOY_FILES: [(&str, &str); 3] = [
    (
        "deploy/prometheus/alerts.yml",
        include_str!("../../../deploy/prometheus/alerts.yml"),
    ),
    (
        "deploy/k8s/scaling.yaml",
        include_str!("../../../deploy/k8s/scaling.yaml"),
    ),
    (
        "deploy/grafana/crm-events.json",
        include_str!("../../../deploy/grafana/crm-events.json"),
    ),
];

fn referenced_metrics(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(offset) = text[i..].find("crm_") {
        let start = i + offset;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(text.len() - start);
        if boundary {
            let name = &text[start..end];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.push(base.to_owned());
        }
        i = end.max(start + 1);
    }
    names
}

#[test]
fn deploy_files_reference_only_declared_metrics() {
    let declared: Vec<&str> = telemetry::metrics::ALL.iter().map(|m| m.name).collect();
    let mut checked = 0;
    for (path, text) in DEPLOY_FILES {
        for name in referenced_metrics(text) {
            assert!(
                declared.contains(&name.as_str()),
                "{path} uses undeclared metric {name}"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "expected the deploy files to reference metrics, found {checked}"
    );
}

#[test]
fn the_scanner_finds_histogram_series() {
    assert_eq!(
        referenced_metrics("rate(crm_lane_e2e_latency_seconds_bucket[1m]) + crm_nats_connected"),
        ["crm_lane_e2e_latency_seconds", "crm_nats_connected"]
    );
}

fn rust_sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir)
        .expect("readable source dir")
        .flatten()
    {
        let path = entry.path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn crate_sources_use_only_declared_metrics() {
    let declared: Vec<&str> = telemetry::metrics::ALL.iter().map(|m| m.name).collect();
    let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for krate in std::fs::read_dir(&crates).expect("crates dir").flatten() {
        let src = krate.path().join("src");
        // test-support is test tooling: its `crm_…` strings name test servers, not metrics.
        if src.is_dir() && !krate.path().ends_with("test-support") {
            rust_sources(&src, &mut files);
        }
    }
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable source");
        // Only quoted names: the places that record a metric.
        for name in referenced_metrics(&text) {
            // `"crm_"` alone is the naming rule's prefix, not a metric.
            if name.len() > "crm_".len() && text.contains(&format!("\"{name}\"")) {
                assert!(
                    declared.contains(&name.as_str()),
                    "{} records undeclared metric {name}",
                    file.display()
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 10,
        "expected metric names in the sources, found {checked}"
    );
}

/// Every alert rule has, in `alerts_test.yml`, a case where it fires and one where it stays
/// silent (promtool runs them; this checks that none is missing).
#[test]
fn every_alert_has_a_firing_and_a_silent_test() {
    let rules = include_str!("../../../deploy/prometheus/alerts.yml");
    let tests = include_str!("../../../deploy/prometheus/alerts_test.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 19, "{alerts:?}");
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    // `- {eval_time: …, alertname: X, exp_alerts: []}` is a silent case; `alertname: X` followed
    // by `exp_alerts:` and a `- exp_labels` entry is a firing one.
    let silent = |alert: &str| {
        let needle = format!("alertname: {alert}, exp_alerts: []");
        lines.iter().any(|line| line.contains(&needle))
    };
    let fires = |alert: &str| {
        lines.windows(3).any(|w| {
            w[0] == format!("alertname: {alert}")
                && w[1] == "exp_alerts:"
                && w[2].starts_with("- exp_labels")
        })
    };
    let missing: Vec<String> = alerts
        .iter()
        .flat_map(|alert| {
            let mut out = Vec::new();
            if !fires(alert) {
                out.push(format!("{alert}: no firing case"));
            }
            if !silent(alert) {
                out.push(format!("{alert}: no silent case"));
            }
            out
        })
        .collect();
    assert!(missing.is_empty(), "{missing:#?}");
}

/// Every declared metric is recorded somewhere: its name quoted, or its constant used, in a
/// source outside the catalogue. A declared metric nothing records is a dashboard panel that
/// stays empty and an alert that can never fire.
#[test]
fn every_declared_metric_is_recorded_somewhere() {
    let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let catalogue = crates.join("telemetry/src/metrics.rs");
    let catalogue_text = std::fs::read_to_string(&catalogue).expect("the catalogue");
    // `pub const ROUTER_ROUTED_TOTAL: &str = "crm_router_routed_total";`
    let constants: Vec<(String, String)> = catalogue_text
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("pub const ")?;
            let (ident, value) = rest.split_once(": &str = ")?;
            let name = value.trim().trim_end_matches(';').trim_matches('"');
            Some((ident.to_owned(), name.to_owned()))
        })
        .collect();
    let mut files = Vec::new();
    for krate in std::fs::read_dir(&crates).expect("crates dir").flatten() {
        let src = krate.path().join("src");
        if src.is_dir() && !krate.path().ends_with("test-support") {
            rust_sources(&src, &mut files);
        }
    }
    let sources: Vec<String> = files
        .iter()
        .filter(|file| **file != catalogue)
        .map(|file| std::fs::read_to_string(file).expect("readable source"))
        .collect();
    let unrecorded: Vec<&str> = telemetry::metrics::ALL
        .iter()
        .map(|metric| metric.name)
        .filter(|name| {
            let quoted = format!("\"{name}\"");
            let ident = constants
                .iter()
                .find(|(_, value)| value == name)
                .map(|(ident, _)| ident.as_str());
            !sources.iter().any(|text| {
                text.contains(&quoted) || ident.is_some_and(|ident| text.contains(ident))
            })
        })
        .collect();
    assert!(
        unrecorded.is_empty(),
        "declared but recorded nowhere: {unrecorded:?}"
    );
}
