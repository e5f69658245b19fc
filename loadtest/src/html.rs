//! `report.html`: one self-contained page (no script) with the summary's tables and inline SVG
//! plots: latency percentiles per lane over time, throughput, throttle level, deferred backlog,
//! CPU and RSS per process.

use crate::report::Report;
use std::fmt::Write as _;

/// One line of a chart; `None` values leave a gap.
#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub color: &'static str,
    pub dashed: bool,
    pub points: Vec<(f64, Option<f64>)>,
}

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 36.0;
const PALETTE: [&str; 8] = [
    "#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" upper bound for an axis (1, 2 or 5 × 10^k).
fn nice_ceiling(value: f64) -> f64 {
    if !(value.is_finite() && value > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= value)
        .unwrap_or(10.0 * magnitude)
}

fn label(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.0}k", value / 1000.0)
    } else if value >= 100.0 || value == value.round() {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// An SVG line chart; `log_y` plots y on a log10 scale (values ≤ 0 are left out).
pub fn chart(title: &str, y_label: &str, lines: &[Line], log_y: bool) -> String {
    let values = || {
        lines
            .iter()
            .flat_map(|l| l.points.iter().filter_map(|(_, y)| *y))
            .filter(|y| y.is_finite() && (!log_y || *y > 0.0))
    };
    let x_max = nice_ceiling(
        lines
            .iter()
            .flat_map(|l| l.points.iter().map(|(x, _)| *x))
            .fold(0.0, f64::max),
    );
    let y_max = nice_ceiling(values().fold(0.0, f64::max));
    let y_min = if log_y {
        let min = values().fold(f64::INFINITY, f64::min);
        if min.is_finite() {
            10f64.powf(min.log10().floor())
        } else {
            1.0
        }
    } else {
        0.0
    };
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / x_max * plot_w;
    let sy = |y: f64| {
        let f = if log_y {
            let span = (y_max.log10() - y_min.log10()).max(1e-9);
            (y.max(y_min).log10() - y_min.log10()) / span
        } else {
            y / y_max
        };
        TOP + plot_h - f.clamp(0.0, 1.0) * plot_h
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        svg,
        r#"<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{}</text>"#,
        escape(title)
    );
    // Grid and y ticks.
    let ticks: Vec<f64> = if log_y {
        let mut v = y_min;
        let mut out = Vec::new();
        while v <= y_max * 1.0001 {
            out.push(v);
            v *= 10.0;
        }
        out
    } else {
        (0..=4).map(|k| y_max * f64::from(k) / 4.0).collect()
    };
    for tick in ticks {
        let y = sy(tick);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            label(tick)
        );
    }
    for k in 0..=5 {
        let x_value = x_max * f64::from(k) / 5.0;
        let x = sx(x_value);
        let _ = write!(
            svg,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + plot_h + 14.0,
            label(x_value)
        );
    }
    let _ = write!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/><text x="{:.1}" y="{:.1}" text-anchor="middle">seconds</text><text x="12" y="{:.1}" transform="rotate(-90 12 {:.1})" text-anchor="middle">{}</text>"##,
        LEFT + plot_w / 2.0,
        HEIGHT - 4.0,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    for (k, line) in lines.iter().enumerate() {
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for (x, y) in &line.points {
            match y.filter(|y| y.is_finite() && (!log_y || *y > 0.0)) {
                Some(y) => segments
                    .last_mut()
                    .map(|s| s.push((sx(*x), sy(y))))
                    .unwrap_or_default(),
                None => segments.push(Vec::new()),
            }
        }
        let dash = if line.dashed {
            r#" stroke-dasharray="4 3""#
        } else {
            ""
        };
        let _ = write!(
            svg,
            r#"<g class="series" data-name="{}">"#,
            escape(&line.name)
        );
        for segment in segments.iter().filter(|s| !s.is_empty()) {
            if segment.len() == 1 {
                let (x, y) = segment[0];
                let _ = write!(
                    svg,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="2" fill="{}"/>"#,
                    line.color
                );
                continue;
            }
            let points: Vec<String> = segment
                .iter()
                .map(|(x, y)| format!("{x:.1},{y:.1}"))
                .collect();
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5"{dash} points="{}"/>"#,
                line.color,
                points.join(" ")
            );
        }
        svg.push_str("</g>");
        let ly = TOP + 10.0 + k as f64 * 15.0;
        let lx = LEFT + plot_w + 10.0;
        let _ = write!(
            svg,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 18.0,
            line.color,
            lx + 22.0,
            ly + 4.0,
            escape(&line.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The summary's Markdown (headings, pipe tables, paragraphs, `**bold**`) as HTML.
fn markdown_to_html(markdown: &str) -> String {
    let inline = |text: &str| {
        let mut out = String::new();
        for (k, part) in escape(text).split("**").enumerate() {
            if k % 2 == 1 {
                let _ = write!(out, "<b>{part}</b>");
            } else {
                out.push_str(part);
            }
        }
        out
    };
    let mut html = String::new();
    let mut in_table = false;
    let mut header = false;
    for line in markdown.lines() {
        let line = line.trim_end();
        if line.starts_with('|') {
            if !in_table {
                html.push_str("<table>");
                in_table = true;
                header = true;
            }
            if line.starts_with("|---") {
                continue;
            }
            let cell = if header { "th" } else { "td" };
            html.push_str("<tr>");
            for value in line.trim_matches('|').split(" | ") {
                let _ = write!(html, "<{cell}>{}</{cell}>", inline(value.trim()));
            }
            html.push_str("</tr>");
            header = false;
            continue;
        }
        if in_table {
            html.push_str("</table>");
            in_table = false;
        }
        if let Some(title) = line.strip_prefix("# ") {
            let _ = write!(html, "<h1>{}</h1>", inline(title));
        } else if let Some(title) = line.strip_prefix("## ") {
            let _ = write!(html, "<h2>{}</h2>", inline(title));
        } else if let Some(item) = line.strip_prefix("- ") {
            let _ = write!(html, "<p>• {}</p>", inline(item));
        } else if !line.is_empty() {
            let _ = write!(html, "<p>{}</p>", inline(line));
        }
    }
    if in_table {
        html.push_str("</table>");
    }
    html
}

fn lane_color(lane: &str) -> &'static str {
    match lane {
        "critical" => PALETTE[0],
        "high" => PALETTE[1],
        "standard" => PALETTE[2],
        "analytics" => PALETTE[3],
        _ => PALETTE[7],
    }
}

/// The whole page.
pub fn render(report: &Report) -> String {
    let s = &report.series;
    let t = &s.t_s;
    let zip = |values: &[Option<f64>]| -> Vec<(f64, Option<f64>)> {
        t.iter().copied().zip(values.iter().copied()).collect()
    };
    let counts = |values: &[u64]| -> Vec<(f64, Option<f64>)> {
        t.iter()
            .copied()
            .zip(values.iter().map(|v| Some(*v as f64)))
            .collect()
    };
    let mut latency = Vec::new();
    for lane in ["critical", "high", "standard", "analytics"] {
        for (quantile, values, dashed) in [("p99", &s.p99_ms, false), ("p50", &s.p50_ms, true)] {
            if let Some(values) = values.get(lane) {
                latency.push(Line {
                    name: format!("{lane} {quantile}"),
                    color: lane_color(lane),
                    dashed,
                    points: zip(values),
                });
            }
        }
    }
    let mut counted = vec![
        ("sent (intended)", PALETTE[7], true, &s.sent),
        ("acked", PALETTE[4], false, &s.acked),
        ("processed", PALETTE[2], false, &s.processed),
        ("analytics", PALETTE[3], false, &s.analytics),
        ("errors", PALETTE[0], false, &s.errors),
    ];
    // Only runs the platform refused events in have that line.
    if s.shed.iter().any(|n| *n > 0) {
        counted.push(("refused (Retry-After)", PALETTE[6], true, &s.shed));
    }
    let throughput: Vec<Line> = counted
        .into_iter()
        .map(|(name, color, dashed, values)| Line {
            name: name.into(),
            color,
            dashed,
            points: counts(values),
        })
        .collect();
    let throttle_points = |f: &dyn Fn(&crate::report::ThrottlePoint) -> f64| {
        report
            .throttle
            .iter()
            .map(|p| (p.t_s, Some(f(p))))
            .collect::<Vec<_>>()
    };
    let level = vec![Line {
        name: "throttle level".into(),
        color: PALETTE[3],
        dashed: false,
        points: throttle_points(&|p| f64::from(p.level)),
    }];
    let deferred = vec![Line {
        name: "deferred".into(),
        color: PALETTE[5],
        dashed: false,
        points: throttle_points(&|p| p.deferred as f64),
    }];
    let per_process = |f: &dyn Fn(&crate::procs::ProcessSeries) -> &Vec<f64>| {
        report
            .processes
            .iter()
            .enumerate()
            .map(|(k, p)| Line {
                name: p.name.clone(),
                color: PALETTE[(k + 2) % PALETTE.len()],
                dashed: false,
                points: p
                    .t_s
                    .iter()
                    .copied()
                    .zip(f(p).iter().map(|v| Some(*v)))
                    .collect(),
            })
            .collect::<Vec<_>>()
    };
    let mut html = String::from("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    let _ = write!(
        html,
        "<title>crm-load: {}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}\
         th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}svg{{display:block;margin:1em 0}}</style></head><body>",
        escape(&report.scenario)
    );
    html.push_str(&markdown_to_html(&report.markdown()));
    html.push_str("<h2>Over time</h2>");
    html.push_str(&chart(
        "End-to-end latency per lane (intended send → processed), per second of completion",
        "ms (log)",
        &latency,
        true,
    ));
    html.push_str(&chart("Throughput", "events/s", &throughput, false));
    html.push_str(&chart(
        "Throttle level (0 = analytics paused)",
        "level",
        &level,
        false,
    ));
    html.push_str(&chart(
        "Deferred analytics backlog",
        "events",
        &deferred,
        false,
    ));
    html.push_str(&chart(
        "CPU per process",
        "% of one core",
        &per_process(&|p| &p.cpu_percent),
        false,
    ));
    html.push_str(&chart(
        "RSS per process",
        "MiB",
        &per_process(&|p| &p.rss_mib),
        false,
    ));
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Series, ThrottlePoint};

    fn sample_report() -> Report {
        let mut series = Series {
            t_s: vec![0.0, 1.0, 2.0, 3.0],
            sent: vec![10, 20, 20, 0],
            acked: vec![10, 20, 20, 0],
            processed: vec![5, 20, 25, 0],
            analytics: vec![0, 10, 30, 0],
            errors: vec![0; 4],
            ..Series::default()
        };
        for lane in ["critical", "high", "standard", "analytics"] {
            series
                .p99_ms
                .insert(lane.into(), vec![Some(3.0), None, Some(40.0), Some(900.0)]);
            series
                .p50_ms
                .insert(lane.into(), vec![Some(1.0), Some(2.0), None, Some(5.0)]);
        }
        Report {
            scenario: "t<&>".into(),
            series,
            throttle: vec![ThrottlePoint {
                t_s: 1.0,
                level: 0,
                deferred: 500,
                ..ThrottlePoint::default()
            }],
            ..Report::default()
        }
    }

    #[test]
    fn the_page_is_well_formed_and_has_every_lane() {
        let html = render(&sample_report());
        for lane in ["critical", "high", "standard", "analytics"] {
            assert!(
                html.contains(&format!("data-name=\"{lane} p99\"")),
                "{lane} p99 series"
            );
            assert!(html.contains(&format!("data-name=\"{lane} p50\"")));
        }
        assert!(html.contains("t&lt;&amp;&gt;"), "titles are escaped");
        assert!(!html.contains("<script"));
        // Every opened element is closed (a cheap well-formedness check on the XML part).
        for tag in ["svg", "g", "table", "tr", "text", "h1", "h2", "p"] {
            let opened = html.matches(&format!("<{tag}>")).count()
                + html.matches(&format!("<{tag} ")).count();
            let closed = html.matches(&format!("</{tag}>")).count();
            assert_eq!(opened, closed, "<{tag}>");
        }
        assert_eq!(html.matches("<svg").count(), 6);
    }

    #[test]
    fn gaps_split_lines_and_log_scale_skips_zero() {
        let line = Line {
            name: "x".into(),
            color: "#000",
            dashed: false,
            points: vec![
                (0.0, Some(1.0)),
                (1.0, Some(10.0)),
                (2.0, None),
                (3.0, Some(0.0)),
                (4.0, Some(100.0)),
                (5.0, Some(1000.0)),
            ],
        };
        let svg = chart("t", "ms", &[line], true);
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(730.0), 1000.0);
        assert_eq!(nice_ceiling(31.0), 50.0);
    }
}
