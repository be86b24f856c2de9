//! The usage chart: hourly allowed and refused requests as a server-rendered SVG bar chart.
//! Pure: numbers in, markup out.

use crate::model::UsageRow;
use maud::{html, Markup};

/// One bar: the hour it starts (Unix seconds), allowed and refused requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bar {
    pub hour: i64,
    pub allowed: u64,
    pub denied: u64,
}

/// `hours` hourly bars from `since` (an hour boundary), summing the rows of each hour.
pub fn hourly(rows: &[&UsageRow], since: i64, hours: i64) -> Vec<Bar> {
    let mut bars: Vec<Bar> = (0..hours).map(|i| Bar { hour: since + i * 3600, ..Bar::default() }).collect();
    for r in rows {
        let Some(t) = keyward_core::time::parse_rfc3339(&r.hour) else { continue };
        let Ok(i) = usize::try_from((t - since).div_euclid(3600)) else { continue };
        if let Some(b) = bars.get_mut(i) {
            b.allowed += r.count;
            b.denied += r.denied.values().sum::<u64>();
        }
    }
    bars
}

/// A "nice" axis top at or above `max`: 1, 2 or 5 times a power of ten.
pub fn axis_top(max: u64) -> u64 {
    let mut step = 1u64;
    loop {
        for m in [1, 2, 5] {
            if step.saturating_mul(m) >= max.max(1) {
                return step.saturating_mul(m);
            }
        }
        step = step.saturating_mul(10);
    }
}

const W: u64 = 720;
const H: u64 = 200;
const LEFT: u64 = 48;
const BOTTOM: u64 = 24;

/// The chart, titled `title` for assistive technology; each bar has a tooltip with its counts.
pub fn svg(bars: &[Bar], title: &str) -> Markup {
    let top = axis_top(bars.iter().map(|b| b.allowed + b.denied).max().unwrap_or(0));
    let plot_w = W - LEFT - 8;
    let plot_h = H - BOTTOM - 8;
    let n = bars.len().max(1) as u64;
    let slot = plot_w as f64 / n as f64;
    let bar_w = (slot * 0.8).max(1.0);
    let y = |v: u64| 8.0 + plot_h as f64 * (1.0 - v as f64 / top as f64);
    let total: u64 = bars.iter().map(|b| b.allowed + b.denied).sum();
    // Label about six hours on the axis, whatever the range.
    let every = (bars.len() / 6).max(1);
    html! {
        svg viewBox=(format!("0 0 {W} {H}")) role="img" aria-labelledby="chart-title" class="usage" {
            title id="chart-title" { (title) ": " (total) " requests" }
            @for v in [0, top / 2, top] {
                line.grid x1=(LEFT) x2=(W - 8) y1=(format!("{:.1}", y(v))) y2=(format!("{:.1}", y(v))) {}
                text.axis x=(LEFT - 6) y=(format!("{:.1}", y(v) + 4.0)) text-anchor="end" { (v) }
            }
            @for (i, b) in bars.iter().enumerate() {
                @let x = LEFT as f64 + slot * i as f64 + (slot - bar_w) / 2.0;
                g {
                    title { (keyward_core::time::format_rfc3339(b.hour)) ": " (b.allowed) " allowed, " (b.denied) " refused" }
                    @if b.allowed > 0 {
                        rect.allowed x=(format!("{x:.1}")) y=(format!("{:.1}", y(b.allowed + b.denied))) width=(format!("{bar_w:.1}"))
                            height=(format!("{:.1}", y(b.denied) - y(b.allowed + b.denied))) {}
                    }
                    @if b.denied > 0 {
                        rect.denied x=(format!("{x:.1}")) y=(format!("{:.1}", y(b.denied))) width=(format!("{bar_w:.1}"))
                            height=(format!("{:.1}", y(0) - y(b.denied))) {}
                    }
                }
                @if i % every == 0 {
                    text.axis x=(format!("{:.1}", x + bar_w / 2.0)) y=(H - 6) text-anchor="middle" {
                        (keyward_core::time::format_rfc3339(b.hour).get(11..16).unwrap_or(""))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(hour: &str, count: u64, denied: &[(&str, u64)]) -> UsageRow {
        UsageRow {
            key_id: "k".into(),
            key_name: "n".into(),
            agent: "a".into(),
            hour: hour.into(),
            count,
            denied: denied.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
        }
    }

    #[test]
    fn rows_land_in_their_hour_and_outside_ones_are_dropped() {
        let since = 1_700_000_000 - 1_700_000_000 % 3600;
        let t = |h: i64| keyward_core::time::format_rfc3339(since + h * 3600);
        let rows = [row(&t(0), 5, &[]), row(&t(0), 2, &[("RATE_LIMITED", 3)]), row(&t(2), 1, &[]), row(&t(24), 9, &[]), row(&t(-1), 9, &[])];
        let refs: Vec<&UsageRow> = rows.iter().collect();
        let bars = hourly(&refs, since, 24);
        assert_eq!(bars.len(), 24);
        assert_eq!((bars[0].allowed, bars[0].denied), (7, 3));
        assert_eq!((bars[2].allowed, bars[2].denied), (1, 0));
        assert_eq!(bars.iter().map(|b| b.allowed).sum::<u64>(), 8);
    }

    #[test]
    fn the_axis_top_is_a_round_number_at_or_above_the_highest_bar() {
        for (max, top) in [(0, 1), (1, 1), (3, 5), (7, 10), (10, 10), (11, 20), (240, 500), (501, 1000)] {
            assert_eq!(axis_top(max), top, "{max}");
        }
    }

    #[test]
    fn the_chart_names_its_total_and_draws_one_group_per_hour() {
        let bars = [Bar { hour: 0, allowed: 3, denied: 1 }, Bar { hour: 3600, allowed: 0, denied: 0 }];
        let svg = svg(&bars, "Requests").into_string();
        assert!(svg.contains("Requests: 4 requests"), "{svg}");
        assert_eq!(svg.matches("<g>").count(), 2);
        assert_eq!(svg.matches("class=\"allowed\"").count(), 1);
        assert_eq!(svg.matches("class=\"denied\"").count(), 1);
    }
}
