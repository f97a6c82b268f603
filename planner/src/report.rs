//! Presenting a plan: a terminal table, and a self-contained HTML page with SVG charts
//! (memory stack per device, step-time breakdown, tokens/s against node count).

use std::fmt::Write;

use crate::estimate::{CurvePoint, Estimate, SearchResult};
use crate::GB;

fn gb(x: f64) -> String {
    format!("{:.1}", x / GB)
}

fn ms(x: f64) -> String {
    if x < 0.01e-3 {
        format!("{:.4}", x * 1e3)
    } else {
        format!("{:.3}", x * 1e3)
    }
}

fn mb(x: f64) -> String {
    format!("{:.2}", x / 1e6)
}

/// Layers with the same kind, times and traffic, as (representative layer, all of them).
fn layer_groups(e: &Estimate) -> Vec<(usize, Vec<usize>)> {
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-3 * a.abs().max(b.abs()).max(1e-12);
    let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, l) in e.layers.iter().enumerate() {
        let found = out.iter_mut().find(|(r, _)| {
            let p = &e.layers[*r];
            p.kind == l.kind && same(p.attention_s, l.attention_s) && same(p.experts_s, l.experts_s) && p.comm == l.comm
        });
        match found {
            Some((_, members)) => members.push(i),
            None => out.push((i, vec![i])),
        }
    }
    out
}

/// "0..=1, 3, 5, 7, ..." cut to `max` characters.
fn short_ranges(xs: &[usize], max: usize) -> String {
    let s = expertmesh_core::config::describe_ranges(xs);
    if s.len() <= max {
        return s;
    }
    let cut = s[..max.saturating_sub(4)].rfind(',').unwrap_or(0);
    format!("{}, ..", &s[..cut])
}

/// The readable plan.
pub fn text(e: &Estimate) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "ExpertMesh plan: {} ({:?}), {} instance(s) of {} devices on {} node(s); attention TP {} x DP {}",
        e.model, e.phase, e.instances, e.devices_per_instance, e.nodes_per_instance, e.layout.attn_tp, e.attn_dp
    );
    let _ = writeln!(
        o,
        "precisions: experts {}, attention {}, KV cache {}; batch {} per instance ({} tokens per step), context {}",
        e.precisions.experts, e.precisions.attention, e.precisions.kv_cache, e.batch, e.tokens_per_step, e.context
    );
    if !e.fits {
        let _ = writeln!(o, "DOES NOT FIT: {}", e.fit_problem.as_deref().unwrap_or("memory"));
    } else if let Some(l) = &e.batch_limit {
        let _ = writeln!(o, "batch chosen as the largest that works; limited by {l}");
    }
    let _ = writeln!(o, "\nMemory per device, GB (the most loaded device of each kind)");
    let mut header = format!("  {:<22}", "");
    for d in &e.devices {
        let _ = write!(header, "{:>18}", format!("{} x{}", d.device, d.count));
    }
    let _ = writeln!(o, "{header}");
    let rows: Vec<Row> = vec![
        ("experts held", |d| d.experts_held.to_string()),
        ("experts", |d| gb(d.memory.experts)),
        ("attention+dense", |d| gb(d.memory.attention_dense)),
        ("embeddings", |d| gb(d.memory.embeddings)),
        ("kv cache", |d| gb(d.memory.kv_cache)),
        ("activations", |d| gb(d.memory.activations)),
        ("comm buffers", |d| gb(d.memory.comm_buffers)),
        ("reserve", |d| gb(d.memory.reserve)),
        ("total / capacity", |d| format!("{} / {}", gb(d.memory.total), gb(d.memory.capacity))),
        ("fits", |d| if d.fits { "yes".into() } else { "NO".into() }),
        ("routed token share", |d| format!("{:.2}%", d.token_share * 100.0)),
        ("expert compute in", |d| d.compute_precision.to_string()),
    ];
    for (name, f) in rows {
        let mut line = format!("  {name:<22}");
        for d in &e.devices {
            let _ = write!(line, "{:>18}", f(d));
        }
        let _ = writeln!(o, "{line}");
    }
    if let Some(p) = &e.fit_problem {
        let _ = writeln!(o, "  does not fit: {p}");
    }
    let pl = &e.placement;
    let _ = writeln!(
        o,
        "\nPlacement ({}{}): {} MoE layers x {} experts x {} replica(s); {}..{} experts per device; hottest device {:.2}x the mean load{}",
        pl.policy,
        if pl.exact { "" } else { ", not run exactly" },
        pl.layers,
        pl.experts_per_layer,
        pl.replicas,
        pl.min_held,
        pl.max_held,
        pl.load_imbalance,
        if pl.from_measured_loads { " (measured loads)" } else { " (uniform routing)" }
    );
    let _ = writeln!(o, "\nPer layer (slowest device), ms; traffic per device, MB inside / between nodes");
    let _ = writeln!(
        o,
        "  {:<22} {:<14} {:>9} {:>9} {:>18} {:>9} {:>18} {:>9} {:>9}",
        "layers", "kind", "attn", "experts", "dispatch MB", "disp", "combine MB", "comb", "overlap"
    );
    for (i, members) in layer_groups(e) {
        let l = &e.layers[i];
        let _ = writeln!(
            o,
            "  {:<22} {:<14} {:>9} {:>9} {:>18} {:>9} {:>18} {:>9} {:>9}",
            format!("{} x [{}]", members.len(), short_ranges(&members, 14)),
            l.kind,
            ms(l.attention_s),
            ms(l.experts_s),
            format!("{}/{}", mb(l.comm.dispatch_intra_bytes), mb(l.comm.dispatch_inter_bytes)),
            ms(l.comm.dispatch_s),
            format!("{}/{}", mb(l.comm.combine_intra_bytes), mb(l.comm.combine_inter_bytes)),
            ms(l.comm.combine_s),
            ms(l.overlap_s)
        );
    }
    let _ = writeln!(
        o,
        "\nStep: {} ms with compute/communication overlap, {} ms without",
        ms(e.step_overlap_s),
        ms(e.step_no_overlap_s)
    );
    for (n, v) in e.breakdown.parts() {
        if v > 0.0 {
            let _ = writeln!(o, "  {n:<28} {:>9} ms  {:>5.1}%", ms(v), 100.0 * v / e.step_no_overlap_s);
        }
    }
    let _ = writeln!(
        o,
        "Tokens/s: {:.0} per instance, {:.1} per device, {:.0} per node; {:.0} for all {} instance(s)",
        e.tokens_per_s, e.tokens_per_s_per_device, e.tokens_per_s_per_node, e.cluster_tokens_per_s, e.instances
    );
    let _ = writeln!(o, "Bottleneck: {}", e.bottleneck);
    if let Some(t) = &e.target {
        let mut goal = Vec::new();
        if let Some(x) = t.target_tokens_per_s {
            goal.push(format!("{x:.0} tokens/s"));
        }
        if let Some(x) = t.max_step_ms {
            goal.push(format!("step <= {x} ms"));
        }
        let _ = writeln!(
            o,
            "Target {}: {}{}",
            goal.join(", "),
            if t.met { "met" } else { "NOT met" },
            match (t.instances_needed, t.nodes_needed) {
                (Some(i), Some(n)) => format!(" (needs {i} instance(s), {n} node(s))"),
                _ => String::new(),
            }
        );
    }
    o
}

pub fn search_text(r: &SearchResult) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "Search: smallest inventory per device kind");
    for c in &r.per_pool {
        let _ = writeln!(
            o,
            "  {:<14} {} node(s) = {} instance(s) x {} node(s), attention TP {}, batch {}, {:.0} tokens/s per instance",
            c.pool, c.total_nodes, c.instances, c.nodes_per_instance, c.attn_tp, c.batch, c.instance_tokens_per_s
        );
    }
    if let Some(n) = &r.note {
        let _ = writeln!(o, "  {n}");
    }
    if let Some(c) = &r.choice {
        let _ = writeln!(o, "Chosen: {} x {} node(s)", c.total_nodes, c.pool);
    }
    if let Some(n) = &r.next_bottleneck {
        let _ = writeln!(o, "Next bottleneck: {n}");
    }
    if let Some(b) = &r.best {
        let _ = writeln!(o, "\n{}", text(b));
    }
    o
}

/// One bar of a stacked chart: its label, its parts, and an optional limit mark.
type Bar<'a> = (String, Vec<(&'a str, f64)>, Option<f64>);

/// A row of the memory table: its name and how a device's value is shown.
type Row = (&'static str, fn(&crate::estimate::DeviceReport) -> String);

const COLORS: [&str; 8] = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Horizontal stacked bars: one per row, parts in a shared legend; an optional limit tick.
fn stacked_bars(title: &str, unit: &str, rows: &[Bar<'_>]) -> String {
    let (w, bar_h, left, top) = (760.0, 28.0, 170.0, 40.0);
    let max = rows
        .iter()
        .map(|(_, p, lim)| p.iter().map(|x| x.1).sum::<f64>().max(lim.unwrap_or(0.0)))
        .fold(0.0, f64::max)
        .max(1e-12);
    let legend_rows = rows.first().map_or(0, |(_, p, _)| p.len().div_ceil(4)) as f64;
    let h = top + rows.len() as f64 * (bar_h + 12.0) + 20.0 + 20.0 * legend_rows;
    let scale = (w - left - 90.0) / max;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><text x="10" y="20" font-size="15" font-weight="bold">{}</text>"#,
        esc(title)
    );
    for (ri, (label, parts, limit)) in rows.iter().enumerate() {
        let y = top + ri as f64 * (bar_h + 12.0);
        let _ = write!(s, r#"<text x="10" y="{:.1}">{}</text>"#, y + bar_h * 0.65, esc(label));
        let mut x = left;
        for (pi, (name, v)) in parts.iter().enumerate() {
            let bw = v * scale;
            // A single-part bar (a total) is drawn in grey, apart from the stacked colours.
            let color = if parts.len() == 1 { "#999999" } else { COLORS[pi % COLORS.len()] };
            let _ = write!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="{bar_h}" fill="{color}"><title>{}: {v:.3} {unit}</title></rect>"#,
                esc(name)
            );
            x += bw;
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{:.2} {unit}</text>"#,
            x + 4.0,
            y + bar_h * 0.65,
            x / scale - left / scale
        );
        if let Some(l) = limit {
            let lx = left + l * scale;
            let _ = write!(
                s,
                r#"<line x1="{lx:.1}" x2="{lx:.1}" y1="{:.1}" y2="{:.1}" stroke="black" stroke-width="2" stroke-dasharray="4 2"><title>capacity {l:.1} {unit}</title></line>"#,
                y - 4.0,
                y + bar_h + 4.0
            );
        }
    }
    if let Some((_, parts, _)) = rows.first() {
        let y0 = top + rows.len() as f64 * (bar_h + 12.0) + 20.0;
        for (pi, (name, _)) in parts.iter().enumerate() {
            let (lx, ly) = (10.0 + (pi % 4) as f64 * 185.0, y0 + (pi / 4) as f64 * 20.0);
            let _ = write!(
                s,
                r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
                ly - 10.0,
                COLORS[pi % COLORS.len()],
                lx + 16.0,
                esc(name)
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// A line chart of tokens/s against node count, one line per device kind.
fn curve_chart(curves: &[(String, Vec<CurvePoint>)]) -> String {
    let (w, h, left, bottom, top) = (760.0, 320.0, 80.0, 40.0, 36.0);
    let max_x = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.nodes)).max().unwrap_or(1).max(1) as f64;
    let max_y = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.tokens_per_s)).fold(0.0, f64::max).max(1.0);
    let px = |x: f64| left + (x - 1.0).max(0.0) / (max_x - 1.0).max(1.0) * (w - left - 140.0);
    let py = |y: f64| h - bottom - y / max_y * (h - bottom - top);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><text x="10" y="20" font-size="15" font-weight="bold">Tokens/s against node count</text><line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="black"/><text x="{:.1}" y="{:.1}">nodes (1..{max_x})</text><text x="10" y="{top}">{max_y:.0}</text><text x="10" y="{:.1}">0</text>"#,
        h - bottom,
        w - 140.0,
        h - bottom,
        h - bottom,
        w / 2.0 - 40.0,
        h - 8.0,
        h - bottom
    );
    for (ci, (name, pts)) in curves.iter().enumerate() {
        let path: Vec<String> =
            pts.iter().map(|p| format!("{:.1},{:.1}", px(p.nodes as f64), py(p.tokens_per_s))).collect();
        let color = COLORS[ci % COLORS.len()];
        let _ = write!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, path.join(" "));
        for p in pts {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{} nodes: {:.0} tokens/s ({} node instances, TP {}, batch {})</title></circle>"#,
                px(p.nodes as f64),
                py(p.tokens_per_s),
                p.nodes,
                p.tokens_per_s,
                p.nodes_per_instance,
                p.attn_tp,
                p.batch
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="{color}">{}</text>"#,
            w - 130.0,
            top + 16.0 * ci as f64,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

/// A self-contained HTML report.
pub fn html(e: &Estimate, curves: &[(String, Vec<CurvePoint>)], search: Option<&SearchResult>) -> String {
    let mem_rows: Vec<Bar<'_>> = e
        .devices
        .iter()
        .map(|d| {
            (
                format!("{} x{}", d.device, d.count),
                d.memory.parts().iter().map(|(n, v)| (*n, v / GB)).collect(),
                Some(d.memory.capacity / GB),
            )
        })
        .collect();
    let step_rows = vec![
        (
            "without overlap".to_string(),
            e.breakdown.parts().iter().map(|(n, v)| (*n, v * 1e3)).collect::<Vec<_>>(),
            None,
        ),
        ("with overlap".to_string(), vec![("step", e.step_overlap_s * 1e3)], None),
    ];
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>ExpertMesh plan: {}</h1><p>{} tokens/s per instance ({:.1} per device, {:.0} per node); step {:.3} ms with overlap, {:.3} ms without. Bottleneck: {}.</p>",
        esc(&e.model),
        e.tokens_per_s.round(),
        e.tokens_per_s_per_device,
        e.tokens_per_s_per_node,
        e.step_overlap_s * 1e3,
        e.step_no_overlap_s * 1e3,
        esc(&e.bottleneck)
    );
    if let Some(r) = search {
        let _ =
            write!(body, "<h2>Search</h2><pre>{}</pre>", esc(&search_text(&SearchResult { best: None, ..r.clone() })));
    }
    let _ = write!(body, "<div>{}</div>", stacked_bars("Memory per device (GB)", "GB", &mem_rows));
    let _ = write!(body, "<div>{}</div>", stacked_bars("Step time (ms)", "ms", &step_rows));
    if !curves.is_empty() {
        let _ = write!(body, "<div>{}</div>", curve_chart(curves));
    }
    let _ = write!(body, "<h2>Details</h2><pre>{}</pre>", esc(&text(e)));
    format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>ExpertMesh plan: {}</title><style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}pre{{background:#f6f6f6;padding:1em;overflow-x:auto}}</style></head><body>{body}<p>Roofline estimates; see docs/planner.md for the equations and how rough each one is.</p></body></html>\n",
        esc(&e.model)
    )
}
