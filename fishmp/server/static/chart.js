// One GPU's memory and utilisation over a job, from its `gpu` events, as an inline SVG (no chart library).
import { el } from "/static/common.js";

const NS = "http://www.w3.org/2000/svg";
const W = 640, H = 190, L = 56, R = 44, T = 12, B = 28; // the plot box inside the viewBox
const MAX_POINTS = 480; // more samples than pixels gain nothing: every k-th is drawn (peaks are read from all)

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function clock(seconds) {
  const s = Math.round(seconds), m = Math.floor(s / 60), h = Math.floor(m / 60);
  return h ? `${h}:${String(m % 60).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`
    : `${m}:${String(s % 60).padStart(2, "0")}`;
}

function thin(points) {
  if (points.length <= MAX_POINTS) return points;
  const k = Math.ceil(points.length / MAX_POINTS);
  const out = points.filter((_, i) => i % k === 0);
  if (out[out.length - 1] !== points[points.length - 1]) out.push(points[points.length - 1]);
  return out;
}

export function gpuChart(index, series) {
  const all = series.points;
  const pts = thin(all);
  const t0 = pts[0].t, t1 = Math.max(pts[pts.length - 1].t, t0 + 1);
  const total = series.total || Math.max(...all.map((p) => p.used), 1);
  const x = (t) => (L + ((W - L - R) * (t - t0)) / (t1 - t0)).toFixed(1);
  const yMem = (g) => (T + (H - T - B) * (1 - Math.min(g, total) / total)).toFixed(1);
  const yUtil = (u) => (T + (H - T - B) * (1 - Math.min(u, 100) / 100)).toFixed(1);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
                            "aria-label": `GPU ${index}: memory used and utilisation over the job` });
  for (const f of [0, 0.25, 0.5, 0.75, 1]) {
    const y = (T + (H - T - B) * (1 - f)).toFixed(1);
    root.append(svg("line", { x1: L, x2: W - R, y1: y, y2: y, class: f === 0 ? "axis" : "grid" }));
    const gib = (total * f).toFixed(total * f >= 10 || f === 0 ? 0 : 1);
    root.append(svg("text", { x: L - 6, y: Number(y) + 4, class: "tick mem-tick", "text-anchor": "end" },
                    f === 1 ? `${gib} GiB` : gib));
    root.append(svg("text", { x: W - R + 6, y: Number(y) + 4, class: "tick util-tick" }, `${f * 100}%`));
  }
  for (const f of [0, 0.5, 1]) {
    const t = t0 + f * (t1 - t0);
    root.append(svg("text", { x: x(t), y: H - 8, class: "tick", "text-anchor": f === 0 ? "start" : f === 1 ? "end" : "middle" },
                    clock(t - t0)));
  }
  const mem = pts.map((p) => `${x(p.t)},${yMem(p.used)}`).join(" ");
  root.append(svg("polygon", { class: "mem-area", points: `${x(pts[0].t)},${yMem(0)} ${mem} ${x(pts[pts.length - 1].t)},${yMem(0)}` }));
  root.append(svg("polyline", { class: "mem", points: mem, "data-points": pts.length }));
  const util = pts.filter((p) => p.util !== null && p.util !== undefined);
  if (util.length) root.append(svg("polyline", { class: "util", points: util.map((p) => `${x(p.t)},${yUtil(p.util)}`).join(" ") }));

  const peak = Math.max(...all.map((p) => p.used));
  const utils = all.map((p) => p.util).filter((u) => u !== null && u !== undefined);
  const mean = utils.length ? utils.reduce((a, b) => a + b, 0) / utils.length : null;
  const last = all[all.length - 1];
  const legend = el("div", { class: "legend" },
    el("span", { class: "key mem" }, `memory ${last.used.toFixed(1)} of ${total.toFixed(0)} GiB, peak ${peak.toFixed(1)}`),
    el("span", { class: "key util" }, mean === null ? "utilisation: not reported"
      : `utilisation ${last.util === null || last.util === undefined ? "–" : Math.round(last.util)}%, mean ${mean.toFixed(0)}%`),
    el("span", { class: "muted" }, `${all.length} samples`));
  return el("figure", { class: "gpu", "data-gpu": index, "data-samples": all.length },
    el("figcaption", {}, el("b", { text: `GPU ${index}` }), el("span", { class: "muted", text: ` ${series.name || ""}` })),
    root, legend);
}
