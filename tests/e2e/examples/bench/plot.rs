//! PNG plots of the results (plotters, bitmap backend, DejaVu Sans embedded: no system fonts).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::{PathResults, Res, Results};

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Err = Box<dyn std::error::Error>;

const DIRECT: RGBColor = RGBColor(120, 120, 120);
const COMPAT: RGBColor = RGBColor(230, 130, 40);
const NATIVE: RGBColor = RGBColor(40, 110, 200);

fn val<T>(r: &Option<Res<T>>, f: impl Fn(&T) -> Option<f64>) -> Option<f64> {
    match r {
        Some(Ok(v)) => f(v).filter(|x| x.is_finite() && *x > 0.0),
        _ => None,
    }
}

/// A short number for a bar label.
fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

struct Series<'a> {
    name: &'a str,
    color: RGBColor,
    values: Vec<Option<f64>>,
}

/// Grouped bars; `log`: log10 y axis. `lines`: horizontal reference lines (value, label).
fn bars(
    area: &Area<'_>,
    title: &str,
    y_desc: &str,
    groups: &[&str],
    series: &[Series<'_>],
    log: bool,
    lines: &[(f64, &str)],
) -> Result<(), Err> {
    let tf = |v: f64| if log { v.log10() } else { v };
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied())
        .chain(lines.iter().map(|l| l.0))
        .collect();
    if all.is_empty() {
        area.draw(&Text::new(
            format!("{title}: not measured"),
            (20, 40),
            ("sans-serif", 18),
        ))?;
        return Ok(());
    }
    let (lo, hi) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (ymin, ymax) = if log {
        (tf(lo).floor(), tf(hi) + 0.8)
    } else {
        (0.0, hi * 1.45)
    };
    let n = groups.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(28)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), ymin..ymax)?;
    let x_fmt = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
            groups[i as usize].to_string()
        } else {
            String::new()
        }
    };
    let y_fmt = |y: &f64| {
        if log {
            // Decades only.
            if (y - y.round()).abs() < 1e-6 {
                short(10f64.powf(y.round()))
            } else {
                String::new()
            }
        } else {
            short(*y)
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&x_fmt)
        .y_labels(8)
        .y_label_formatter(&y_fmt)
        .y_desc(y_desc)
        .label_style(("sans-serif", 13))
        .draw()?;
    let k = series.len() as f64;
    let w = 0.8 / k;
    for (si, s) in series.iter().enumerate() {
        let color = s.color;
        let x0 = |gi: usize| gi as f64 - 0.4 + si as f64 * w;
        chart
            .draw_series(s.values.iter().enumerate().filter_map(|(gi, v)| {
                v.map(|v| {
                    Rectangle::new(
                        [(x0(gi) + 0.05 * w, ymin), (x0(gi) + 0.95 * w, tf(v))],
                        color.filled(),
                    )
                })
            }))?
            .label(s.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        let style = ("sans-serif", 12)
            .into_font()
            .into_text_style(area)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        chart.draw_series(s.values.iter().enumerate().filter_map(|(gi, v)| {
            v.map(|v| Text::new(short(v), (x0(gi) + 0.5 * w, tf(v)), style.clone()))
        }))?;
    }
    for &(y, label) in lines {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(-0.5, tf(y)), (n as f64 - 0.5, tf(y))],
            RED.stroke_width(1),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            label.to_string(),
            (n as f64 - 0.5, tf(y)),
            ("sans-serif", 12)
                .into_font()
                .color(&RED)
                .pos(Pos::new(HPos::Right, VPos::Bottom)),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn three(r: &Results) -> [(&'static str, RGBColor, &PathResults); 3] {
    [
        ("direct", DIRECT, &r.direct),
        ("compat", COMPAT, &r.compat),
        ("native", NATIVE, &r.native),
    ]
}

fn draw(r: &Results, path: &Path) -> Result<(), Err> {
    let root = BitMapBackend::new(path, (1500, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "Tether benchmarks — {} ({} cores), {}, {}",
            r.machine.cpu, r.machine.cores, r.machine.commit, r.machine.date
        ),
        ("sans-serif", 20),
    )?;
    let panels = root.split_evenly((2, 3));

    let s = three(r)
        .map(|(name, color, p)| Series {
            name,
            color,
            values: vec![
                val(&p.bulk, |b| Some(b.mb_per_s)),
                val(&p.many, |m| Some(m.mb_per_s)),
                val(&p.interactive, |i| Some(i.bulk_mb_per_s)),
            ],
        })
        .into_iter()
        .collect::<Vec<_>>();
    bars(
        &panels[0],
        "Throughput each way (MB/s)",
        "MB/s",
        &["1: one stream", "3: many streams", "5: 4 load streams"],
        &s,
        false,
        &[],
    )?;

    let s = three(r)
        .map(|(name, color, p)| Series {
            name,
            color,
            values: vec![
                val(&p.latency, |l| Some(l.p50_us)),
                val(&p.latency, |l| Some(l.p99_us)),
                val(&p.latency, |l| Some(l.p999_us)),
            ],
        })
        .into_iter()
        .collect::<Vec<_>>();
    bars(
        &panels[1],
        "2: round trip 64 B, idle tunnel (µs, log)",
        "µs",
        &["p50", "p99", "p99.9"],
        &s,
        true,
        &[],
    )?;

    let s = three(r)
        .map(|(name, color, p)| Series {
            name,
            color,
            values: vec![
                val(&p.interactive, |i| Some(i.p50_us / 1000.0)),
                val(&p.interactive, |i| Some(i.p99_us / 1000.0)),
            ],
        })
        .into_iter()
        .collect::<Vec<_>>();
    bars(
        &panels[2],
        "5: interactive round trip under load (ms, log)",
        "ms",
        &["p50", "p99"],
        &s,
        true,
        &[(10.0, "native p99 target 10 ms")],
    )?;

    let direct_bulk = val(&r.direct.bulk, |b| Some(b.mb_per_s));
    let direct_many = val(&r.direct.many, |m| Some(m.mb_per_s));
    let s = three(r)[1..]
        .iter()
        .map(|&(name, color, p)| Series {
            name,
            color,
            values: vec![
                val(&p.bulk, |b| Some(b.mb_per_s))
                    .zip(direct_bulk)
                    .map(|(a, b)| a / b),
                val(&p.many, |m| Some(m.mb_per_s))
                    .zip(direct_many)
                    .map(|(a, b)| a / b),
            ],
        })
        .collect::<Vec<_>>();
    bars(
        &panels[3],
        "Throughput as a fraction of direct",
        "× direct",
        &["1: bulk", "3: many streams"],
        &s,
        false,
        &[(0.8, "native target 0.8"), (0.5, "compat target 0.5")],
    )?;

    let s = three(r)[1..]
        .iter()
        .map(|&(name, color, p)| Series {
            name,
            color,
            values: vec![
                val(&p.idle, |i| i.agent_bytes_per_stream.map(|b| b / 1024.0)),
                val(&p.idle, |i| {
                    i.control_plane_bytes_per_stream.map(|b| b / 1024.0)
                }),
            ],
        })
        .collect::<Vec<_>>();
    bars(
        &panels[4],
        &format!("4: memory per idle stream, {} streams (KiB)", r.idle),
        "KiB",
        &["agent", "control plane"],
        &s,
        false,
        &[(4.0, "agent target 4 KiB")],
    )?;

    let s = three(r)[1..]
        .iter()
        .map(|&(name, color, p)| Series {
            name,
            color,
            values: vec![
                val(&p.many, |m| m.agent_peak_kib.map(|k| k as f64 / 1024.0)),
                val(&p.many, |m| {
                    m.control_plane_peak_kib.map(|k| k as f64 / 1024.0)
                }),
            ],
        })
        .collect::<Vec<_>>();
    bars(
        &panels[5],
        &format!("3: peak RSS, {} streams × 1 MiB (MiB)", r.streams),
        "MiB",
        &["agent", "control plane"],
        &s,
        false,
        &[],
    )?;
    root.present()?;
    Ok(())
}

/// Writes `results.png` to `out`; returns the files written (a failure is reported, not fatal).
pub(crate) fn plots(r: &Results, out: &Path) -> Vec<String> {
    let _ =
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    let path = out.join("results.png");
    match draw(r, &path) {
        Ok(()) => vec![path.display().to_string()],
        Err(e) => {
            eprintln!("bench: plot failed: {e}");
            Vec::new()
        }
    }
}
