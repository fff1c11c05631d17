// Shared by the jobs page and the job page: the API key, requests, the event stream, and a job folded from its events.
// Plain modules, no build step: everything here is what the server's job API says (README "Reviewing takes").

const KEY = "fishmp.key", REVIEWER = "fishmp.reviewer";

// ---- DOM ------------------------------------------------------------------------------------------------------------
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) node.append(c);
  return node;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function fmtSeconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  if (s < 10) return `${s.toFixed(2)} s`;
  if (s < 90) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60), h = Math.floor(m / 60);
  return h ? `${h} h ${String(m % 60).padStart(2, "0")} min` : `${m} min ${String(Math.round(s % 60)).padStart(2, "0")} s`;
}

export function fmtClock(unix) {
  if (!unix) return "";
  const d = new Date(unix * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

// ---- the key: typed once per tab, kept in sessionStorage, sent as a Bearer token ---------------------------------
let asking = null;

function askKey(message) {
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const input = el("input", { type: "password", id: "api-key", autocomplete: "current-password", required: true,
                                placeholder: "FISH_API_KEY", "aria-label": "API key" });
    const form = el("form", { class: "card keyform" },
      el("h2", { text: "This server needs its API key" }),
      el("p", { class: "muted", text: message }),
      input, el("button", { type: "submit", class: "primary", id: "api-key-submit", text: "Use key" }));
    const overlay = el("div", { class: "overlay", id: "key-overlay" }, form);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, input.value.trim());
      overlay.remove();
      asking = null;
      resolve();
    });
    document.body.append(overlay);
    input.focus();
  });
  return asking;
}

function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

// fetch() on the server's API with the key; a 401 asks for it (again) and retries.
export async function api(path, { method = "GET", body, headers = {}, signal } = {}) {
  for (;;) {
    const init = { method, signal, headers: authHeaders(headers) };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const r = await fetch(path, init);
    if (r.status !== 401) return r;
    const had = sessionStorage.getItem(KEY);
    await askKey(had ? "The key you gave does not match: type it again." :
      "Type the key the server was started with (FISH_API_KEY). It stays in this tab only.");
  }
}

export async function apiJSON(path, opts) {
  const r = await api(path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new ApiError(r.status, data.error || r.statusText, data.detail);
  return data;
}

export class ApiError extends Error {
  constructor(status, error, detail) {
    super(detail ? `${error}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}` : error);
    this.status = status;
  }
}

export const reviewer = {
  get: () => sessionStorage.getItem(REVIEWER) || "",
  set: (name) => sessionStorage.setItem(REVIEWER, name.trim()),
};

export function reviewerInput() {
  const input = el("input", { id: "reviewer", type: "text", placeholder: "your name", maxlength: 100,
                              value: reviewer.get(), "aria-label": "Reviewer (recorded with Accept and Retake)" });
  input.addEventListener("input", () => reviewer.set(input.value));
  return el("label", { class: "reviewer", title: "Recorded in the manifest with Accept and Retake" },
    el("span", { text: "Reviewer" }), input);
}

// The wav of a take as a blob URL (an <audio src> cannot send the key). The caller revokes it.
export async function audioURL(path, signal) {
  const r = await api(path, { signal });
  if (!r.ok) throw new ApiError(r.status, `audio: ${r.status}`);
  return URL.createObjectURL(await r.blob());
}

// ---- the event stream: server-sent events read through fetch, so the key travels as a header ---------------------
// Calls onEvent(event, id) for each; reconnects with Last-Event-ID after the stream ends (an over job's stream
// ends after its last event; the next connection waits for review events) until `signal` aborts.
export async function streamEvents(jobId, onEvent, { signal, onState = () => {} } = {}) {
  let last = -1, wait = 500;
  while (!signal?.aborted) {
    try {
      const headers = last >= 0 ? { "Last-Event-ID": String(last) } : {};
      const r = await api(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal });
      if (!r.ok) throw new ApiError(r.status, `events: ${r.status}`);
      onState("live");
      wait = 500;
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const fields = {};
          for (const line of block.split("\n")) {
            if (!line || line.startsWith(":")) continue;
            const i = line.indexOf(":");
            fields[line.slice(0, i)] = line.slice(i + 1).replace(/^ /, "");
          }
          if (fields.data === undefined) continue;
          last = Number(fields.id);
          onEvent(JSON.parse(fields.data), last);
        }
      }
      onState("ended");
    } catch (e) {
      if (signal?.aborted) return;
      onState("retrying");
      if (e.status === 404) return;
      wait = Math.min(wait * 2, 10000);
    }
    await sleep(wait);
  }
}

// ---- a job folded from its events (as fishmp/server/jobview.py folds them, plus rates and GPU series) -------------
const RATE_WINDOW = 30; // segments: frames/s and ETA over the last ones done

export class JobFold {
  constructor(total = 0) {
    this.total = total;
    this.status = "queued";
    this.segs = new Map(); // id -> {status, suspect}
    this.recent = []; // [time, tokens] of segments done in this run
    this.gpus = new Map(); // index -> {name, total, points: [{t, used, util}]}
    this.runStart = null;
    this.lastTime = null;
    this.receivedAt = null; // performance.now() of the last event, for an ETA that counts down between events
  }

  apply(ev) {
    const seg = (fields) => this.segs.set(ev.id, { ...(this.segs.get(ev.id) || {}), ...fields });
    this.lastTime = ev.time ?? this.lastTime;
    this.receivedAt = performance.now();
    switch (ev.event) {
      case "plan":
        this.status = "running";
        this.total = Math.max(this.total, ev.segments || 0);
        this.runStart = ev.time;
        this.recent = [];
        break;
      case "segment_done":
        seg({ status: "done", suspect: !!ev.suspect });
        if (!ev.skipped) {
          this.recent.push([ev.time, ev.tokens || 0]);
          if (this.recent.length > RATE_WINDOW) this.recent.shift();
        }
        break;
      case "segment_failed": seg({ status: "failed", suspect: false }); break;
      case "segment_requeued": seg({ status: "pending" }); break;
      case "segment_retaken": seg({ status: "done", suspect: !!ev.suspect }); break;
      case "segment_accepted": seg({ suspect: false }); break;
      case "gpu":
        for (const g of ev.gpus || []) {
          const s = this.gpus.get(g.index) || { name: g.name, total: g.total_gib, points: [] };
          s.points.push({ t: ev.time, used: g.used_gib, util: g.util_pct });
          s.total = g.total_gib || s.total;
          this.gpus.set(g.index, s);
        }
        break;
      case "finished":
        if (ev.cancelled) this.status = "cancelled";
        else if (ev.interrupted) this.status = "interrupted";
        else this.status = ev.failed || ev.pending || ev.error ? "failed" : "done";
        break;
    }
  }

  get over() { return ["done", "failed", "cancelled", "interrupted", "damaged"].includes(this.status); }

  counts() {
    const c = { done: 0, failed: 0, pending: 0, suspect: 0 };
    for (const s of this.segs.values()) {
      if (s.status === "done") c.done++;
      else if (s.status === "failed") c.failed++;
      if (s.status === "done" && s.suspect) c.suspect++;
    }
    c.pending = Math.max(0, this.total - c.done - c.failed);
    return c;
  }

  // {fps, segPerS} over the last RATE_WINDOW segments done (from the run's start while fewer than 2 are).
  rates() {
    const r = this.recent;
    if (!r.length) return { fps: null, segPerS: null };
    let t0 = r[0][0], frames = r.slice(1).reduce((a, x) => a + x[1], 0), n = r.length - 1;
    if (r.length < 2 || r[r.length - 1][0] - t0 <= 0) {
      if (this.runStart === null) return { fps: null, segPerS: null };
      t0 = this.runStart;
      frames = r.reduce((a, x) => a + x[1], 0);
      n = r.length;
    }
    const span = Math.max(1e-3, r[r.length - 1][0] - t0);
    return { fps: frames / span, segPerS: n / span };
  }

  // Seconds left at the recent rate, counted down since the last event; null when it cannot be said.
  eta() {
    if (this.over) return null;
    const { segPerS } = this.rates();
    const pending = this.counts().pending;
    if (!pending) return 0;
    if (!segPerS) return null;
    const since = this.receivedAt === null ? 0 : (performance.now() - this.receivedAt) / 1000;
    return Math.max(0, pending / segPerS - since);
  }
}

export function statusPill(status, extra = "") {
  return el("span", { class: `pill ${status} ${extra}`.trim(), "data-status": status, text: status });
}

// A progress bar: done (and failed) of total, as role=progressbar with its numbers for assistive tech and tests.
export function progressBar() {
  const done = el("span", { class: "fill done" }), failed = el("span", { class: "fill failed" });
  const bar = el("div", { class: "progress", role: "progressbar", "aria-valuemin": 0 }, done, failed);
  bar.update = (c) => {
    const total = c.done + c.failed + c.pending || 1;
    bar.setAttribute("aria-valuemax", total);
    bar.setAttribute("aria-valuenow", c.done + c.failed);
    bar.setAttribute("aria-valuetext", `${c.done + c.failed} of ${total} segments`);
    done.style.width = `${(100 * c.done) / total}%`;
    failed.style.width = `${(100 * c.failed) / total}%`;
  };
  return bar;
}

export function countChips(c) {
  return ["done", "failed", "pending", "suspect"].map((k) =>
    el("span", { class: `count ${k}`, "data-count": k, title: k },
      el("b", { text: String(c[k]) }), el("span", { text: ` ${k}` })));
}
