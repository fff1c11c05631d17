// The job page (/jobs/{id}): GET /v1/jobs/{id} for the segments, then the job's event stream from its first event
// (a segment's fields as jobview.py folds them, the rates, the GPU samples). Retake and Accept are API calls whose
// outcome comes back as events.
import { api, ApiError, apiJSON, countChips, el, fmtClock, fmtSeconds, JobFold, progressBar, reviewer,
         reviewerInput, statusPill, streamEvents, audioURL } from "/static/common.js";
import { gpuChart } from "/static/chart.js";

const jobId = decodeURIComponent(location.pathname.replace(/^\/jobs\//, ""));
const base = `/v1/jobs/${encodeURIComponent(jobId)}`;
// A segment id is a name, never path pieces: "/" travels as %2F. An id of dots only (a browser resolves "..", even
// as %2E%2E; the server refuses such ids, an old job may hold one) gets a URL that names nothing (a 404), never
// another job's.
const segPath = (sid) => `${base}/segments/${/^\.+$/.test(sid) ? sid.replace(/\./g, "%252E") : encodeURIComponent(sid)}`;
const DONE_FIELDS = ["audio_seconds", "synthesis_seconds", "tokens", "worker", "device", "attempts", "suspect", "takes",
                     "kept_take", "seed", "over_slot_s", "fit"];
const FILTERS = { all: () => true, suspect: (s) => s.status === "done" && s.suspect, failed: (s) => s.status === "failed",
                  pending: (s) => s.status === "pending" };

const fold = new JobFold();
const segs = new Map(); // id -> {data, node, audio, take (the take its audio holds), dirty}
let job = null, filter = FILTERS[location.hash.slice(1)] ? location.hash.slice(1) : "all";
const sticky = new Set(); // rows acted on stay in view until the filter changes
const dirty = new Set();
let renderTimer = null, summaryParts = null;

// ---- a segment's state from events (jobview.py's fold) ---------------------------------------------------------
function applyEvent(ev) {
  fold.apply(ev);
  const entry = ev.id !== undefined ? segs.get(ev.id) : undefined;
  if (entry) {
    const s = entry.data;
    switch (ev.event) {
      case "segment_done":
        Object.assign(s, { status: "done", error: null, error_kind: null });
        for (const k of DONE_FIELDS) if (ev[k] !== undefined && ev[k] !== null) s[k] = ev[k];
        break;
      case "segment_failed": Object.assign(s, { status: "failed", error: ev.error, error_kind: ev.kind }); break;
      case "segment_requeued": s.status = "pending"; break;
      case "retake_started": s.retake = { status: "running", seed: ev.seed, take: ev.take }; break;
      case "segment_retaken":
        Object.assign(s, { status: "done", error: null, error_kind: null, retake: null });
        for (const k of [...DONE_FIELDS, "history", "review"]) s[k] = ev[k] ?? null;
        break;
      case "retake_failed": s.retake = { status: "failed", seed: ev.seed, error: ev.error }; break;
      case "segment_accepted": Object.assign(s, { suspect: false, review: ev.review }); break;
    }
    dirty.add(ev.id);
  }
  if (ev.event === "finished") job.status = fold.status;
  else if (ev.event === "plan") job.status = "running";
  schedule();
}

function schedule() {
  if (renderTimer === null) renderTimer = setTimeout(() => { renderTimer = null; renderAll(); }, 60);
}

// ---- one segment -----------------------------------------------------------------------------------------------
// The synthetic test engine's markers (`@@silent:3@@`) are not spoken (the take check skips them too): shown apart.
const spoken = (text) => text.split(/(@@[^@\s]{1,40}@@)/).map((part, i) => (i % 2
  ? el("span", { class: "marker", title: "a test engine's marker: not spoken", text: part }) : part));
const seedText = (seed) => (seed === null || seed === undefined ? "unseeded" : `seed ${seed}`);
const written = (s) => (s.history?.length || 0) + (s.status === "done" ? 1 : 0);
const keptTake = (s) => (s.takes && s.kept_take !== null && s.kept_take !== undefined ? s.takes[s.kept_take] : null);

function takeChip(t, i, kept) {
  const seed = seedText(t.seed);
  const what = t.passed ? "passed" : (t.reasons || []).join(", ");
  const title = `take ${i + 1}: ${seed}, ${fmtSeconds(t.duration_s)} (expected ${fmtSeconds(t.expected_s)}), rms ${t.rms}, ` +
    `active ${Math.round((t.active_ratio || 0) * 100)}%, ${t.tokens} frames${kept ? " — the one written" : ""}`;
  return el("li", { class: `take ${t.passed ? "ok" : "bad"}${kept ? " kept" : ""}`, title },
    el("span", { class: "mono", text: `#${i + 1}` }), ` ${seed} · ${what}`);
}

function historyList(entry) {
  const s = entry.data, items = [];
  (s.history || []).forEach((h, i) => {
    const reasons = h.takes && h.kept_take !== undefined ? h.takes[h.kept_take]?.reasons || [] : [];
    const audio = el("audio", { controls: true, preload: "metadata", "data-take": i + 1 });
    if (entry.takeURLs.has(i + 1)) audio.src = entry.takeURLs.get(i + 1);
    items.push(el("li", { class: "hist", "data-take": i + 1 },
      el("div", {},
        el("b", { text: `Take ${i + 1}` }),
        ` · ${seedText(h.seed)} · ${fmtSeconds(h.audio_seconds)} · `,
        el("span", { class: h.suspect ? "warn" : "good", text: h.suspect ? `suspect (${reasons.join(", ")})` : "passed" }),
        el("span", { class: "muted", text: ` · replaced ${fmtClock(h.replaced_at)}${h.replaced_by ? ` by ${h.replaced_by}` : ""}` })),
      audio));
  });
  if (s.status === "done") {
    items.push(el("li", { class: "hist current", "data-take": written(s) },
      el("b", { text: `Take ${written(s)}` }), ` · ${seedText(s.seed)} · ${fmtSeconds(s.audio_seconds)} · current`));
  }
  const details = el("details", { class: "history", open: entry.historyOpen },
    el("summary", { text: `Take history (${written(s)} written)` }), el("ol", {}, items));
  const load = () => {
    for (const a of details.querySelectorAll("audio[data-take]")) {
      const n = Number(a.dataset.take);
      if (a.src) continue;
      audioURL(`${segPath(s.id)}/takes/${n}`).then((u) => { entry.takeURLs.set(n, u); a.src = u; }).catch(() => {});
    }
  };
  details.addEventListener("toggle", () => {
    entry.historyOpen = details.open;
    if (details.open) load();
  });
  if (entry.historyOpen) load();
  return details;
}

// The fit (docs/dubbing.md): the speed its slot took, or the overrun; the raw take plays on demand.
function fitFact(s) {
  const f = s.fit;
  const text = f.overrun ? `overrun: needs ×${f.overrun.needed_speed} (×${f.speed} applied)`
                         : `fitted ×${f.speed} to ${fmtSeconds(f.slot_s)}`;
  const raw = el("button", { type: "button", class: "small", "data-action": "raw", text: "raw take",
    title: `The take before the fit (${fmtSeconds(f.raw_s)})`, onclick: async () => {
      const audio = el("audio", { controls: true, preload: "auto", src: await audioURL(`${segPath(s.id)}/raw`) });
      raw.replaceWith(audio);
    } });
  return el("span", { class: f.overrun ? "warn" : "muted", "data-field": "fit" }, text, " ", raw);
}

function renderSeg(entry) {
  const s = entry.data;
  const kept = keptTake(s);
  const retaking = s.retake?.status === "running";
  const node = entry.node;
  node.dataset.status = s.status;
  node.dataset.suspect = s.status === "done" && s.suspect ? "true" : "false";
  node.dataset.takes = String(written(s));
  const pills = [statusPill(s.status)];
  if (s.status === "done" && s.suspect) pills.push(statusPill("suspect"));
  if (s.review?.decision === "accepted") pills.push(statusPill("accepted"));
  if (retaking) pills.push(statusPill("retaking"));

  const facts = [];
  if (s.audio_seconds !== undefined && s.audio_seconds !== null) {
    const exp = kept?.expected_s;
    facts.push(el("span", { class: "dur", "data-field": "duration" }, el("b", { text: fmtSeconds(s.audio_seconds) }),
      exp ? el("span", { class: "muted", text: ` / ${fmtSeconds(exp)} expected` }) : ""));
    if (exp) {
      const ratio = s.audio_seconds / exp;
      facts.push(el("span", { class: `ratio ${ratio > 2 || ratio < 0.5 ? "warn" : ""}`, text: `×${ratio.toFixed(2)}` }));
    }
  }
  if (s.seed !== undefined && s.seed !== null) facts.push(el("span", { class: "muted", text: `seed ${s.seed}` }));
  if (s.over_slot_s) facts.push(el("span", { class: "warn", text: `${fmtSeconds(s.over_slot_s)} over its slot` }));
  if (s.fit) facts.push(fitFact(s));

  const notes = [];
  if (s.error) notes.push(el("p", { class: "error", text: `${s.error_kind || "failed"}: ${s.error}` }));
  if (s.review?.decision === "accepted") {
    notes.push(el("p", { class: "note good", "data-field": "review",
      text: `Accepted${s.review.by ? ` by ${s.review.by}` : ""} at ${fmtClock(s.review.at)}` +
            (s.review.reasons?.length ? ` (the check said: ${s.review.reasons.join(", ")})` : "") }));
  }
  if (retaking) notes.push(el("p", { class: "note", text: `Retaking with seed ${s.retake.seed}…` }));
  else if (s.retake?.status === "failed") notes.push(el("p", { class: "error", text: `Retake failed: ${s.retake.error}` }));
  if (entry.message) notes.push(el("p", { class: "error", text: entry.message }));

  const retake = el("button", { type: "button", class: "small", "data-action": "retake", text: "Retake",
    disabled: s.status === "pending" || retaking, title: "Make a new take with the next seed",
    onclick: () => act(entry, "retake") });
  const accept = s.status === "done" && s.suspect && !retaking ? el("button", { type: "button", class: "small primary",
    "data-action": "accept", text: "Accept", title: "Keep this take: clears suspect, recorded in the manifest",
    onclick: () => act(entry, "accept") }) : null;

  entry.meta.replaceChildren(el("span", { class: "seg-id mono", text: s.id }),
    el("span", { class: "speaker", text: s.speaker }), ...pills);
  entry.body.replaceChildren(el("p", { class: "seg-text" }, spoken(s.text)),
    facts.length ? el("div", { class: "facts" }, facts) : "",
    s.takes?.length ? el("ol", { class: "verdicts", "aria-label": "takes of this run" },
      s.takes.map((t, i) => takeChip(t, i, i === s.kept_take))) : "",
    ...notes, written(s) > 1 || s.history?.length ? historyList(entry) : "");
  entry.actions.replaceChildren(retake, accept || "");
  entry.audio.hidden = s.status !== "done";
  if (entry.visible) loadAudio(entry); // done, or retaken, while on screen
  node.hidden = !(FILTERS[filter](s) || sticky.has(s.id));
}

// The current take's wav as a blob (the key travels as a header), once its row is on screen.
async function loadAudio(entry) {
  const s = entry.data;
  if (s.status !== "done") return;
  const take = String(written(s));
  if (entry.audio.dataset.take === take || entry.loading === take) return;
  entry.loading = take;
  try {
    const url = await audioURL(segPath(s.id));
    if (entry.url) URL.revokeObjectURL(entry.url);
    entry.url = url;
    entry.audio.src = url;
    entry.audio.dataset.take = take;
  } catch (e) {
    entry.message = `cannot load the audio: ${e.message}`;
    dirty.add(s.id);
    schedule();
  } finally {
    entry.loading = null;
  }
}

const seen = new IntersectionObserver((items) => {
  for (const it of items) {
    const entry = segs.get(it.target.dataset.segmentId);
    entry.visible = it.isIntersecting;
    if (it.isIntersecting) loadAudio(entry);
  }
}, { rootMargin: "300px" });

async function act(entry, action) {
  const s = entry.data;
  entry.message = null;
  sticky.add(s.id);
  const by = reviewer.get();
  try {
    const out = await apiJSON(`${segPath(s.id)}/${action}`, { method: "POST", body: by ? { by } : {} });
    if (action === "retake") s.retake = { status: "running", seed: out.seed, take: out.take };
    else Object.assign(s, { suspect: false, review: out.review });
  } catch (e) {
    entry.message = `${action}: ${e.message}`;
  }
  dirty.add(s.id);
  schedule();
}

// ---- the job ---------------------------------------------------------------------------------------------------
function counts() {
  const c = { done: 0, failed: 0, pending: 0, suspect: 0 };
  for (const { data: s } of segs.values()) {
    c[s.status]++;
    if (s.status === "done" && s.suspect) c.suspect++;
  }
  return c;
}

function buildSummary() {
  const bar = progressBar();
  const status = el("span"), chips = el("div", { class: "counts" }), fps = el("span", { class: "metric", "data-field": "fps" });
  const eta = el("span", { class: "metric", "data-field": "eta" }), error = el("p", { class: "error", hidden: true });
  const cancel = el("button", { type: "button", class: "danger small", "data-action": "cancel", text: "Cancel job" });
  let armed = false;
  cancel.addEventListener("click", async () => {
    if (!armed) {
      armed = true;
      cancel.textContent = "Confirm cancel";
      setTimeout(() => { armed = false; cancel.textContent = "Cancel job"; }, 4000);
      return;
    }
    cancel.disabled = true;
    await api(base, { method: "DELETE" });
  });
  const zip = el("button", { type: "button", class: "small", text: "Download zip", onclick: async () => {
    const r = await api(`${base}/archive`);
    const a = el("a", { href: URL.createObjectURL(await r.blob()), download: `${jobId}.zip` });
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  } });
  document.getElementById("summary").replaceChildren(
    el("div", { class: "card-head" }, el("h1", { class: "mono", text: jobId }), status,
      el("span", { class: "muted", text: `created ${fmtClock(job.created_at)}` }), el("span", { class: "spacer" }), zip, cancel),
    bar, el("div", { class: "job-foot" }, chips, el("span", { class: "metrics" }, fps, eta)), error);
  summaryParts = { bar, status, chips, fps, eta, cancel, error };
}

function renderSummary() {
  const p = summaryParts, c = counts();
  const over = ["done", "failed", "cancelled", "interrupted", "damaged"].includes(job.status);
  p.status.replaceChildren(statusPill(job.status));
  p.bar.update(c);
  p.chips.replaceChildren(...countChips(c));
  const { fps } = fold.rates(), left = fold.eta();
  p.fps.textContent = !over && fps !== null ? `${fps.toFixed(1)} frames/s` : "";
  p.eta.textContent = over || left === null ? "" : left === 0 ? "finishing" : `ETA ${fmtSeconds(left)}`;
  p.cancel.hidden = over;
  p.error.hidden = !job.error;
  p.error.textContent = job.error || "";
  document.title = `fishmp · ${jobId} · ${job.status}`;
  const labels = { all: "All", suspect: "Suspect", failed: "Failed", pending: "Pending" };
  const n = { all: segs.size, ...c };
  document.getElementById("filters").replaceChildren(...Object.keys(FILTERS).map((f) =>
    el("button", { type: "button", class: `chip ${f}`, "data-filter": f, "aria-pressed": f === filter ? "true" : "false",
                   onclick: () => setFilter(f) }, `${labels[f]} `, el("b", { text: String(n[f]) }))));
}

function renderGpus() {
  const box = document.getElementById("gpus");
  if (!fold.gpus.size) {
    document.getElementById("gpus-note").textContent = "no samples for this job: it ran on the CPU, NVML could not " +
      "be read, or FISH_TELEMETRY_INTERVAL_S=0";
    box.replaceChildren();
    return;
  }
  document.getElementById("gpus-note").textContent = "memory used (filled) and utilisation (line), from the telemetry events";
  box.replaceChildren(...[...fold.gpus.entries()].sort((a, b) => a[0] - b[0]).map(([i, s]) => gpuChart(i, s)));
}

function setFilter(f) {
  filter = f;
  sticky.clear();
  history.replaceState(null, "", f === "all" ? location.pathname : `#${f}`);
  for (const id of segs.keys()) dirty.add(id);
  schedule();
}

let gpuSeen = 0;
function renderAll() {
  for (const id of dirty) renderSeg(segs.get(id));
  dirty.clear();
  renderSummary();
  const samples = [...fold.gpus.values()].reduce((a, s) => a + s.points.length, 0);
  if (samples !== gpuSeen || !document.getElementById("gpus-note").textContent) {
    gpuSeen = samples;
    renderGpus();
  }
  const shown = [...segs.values()].some((e) => !e.node.hidden);
  document.getElementById("segments-empty").hidden = shown;
}

async function main() {
  document.getElementById("header-tools").append(reviewerInput());
  document.getElementById("crumb-job").textContent = jobId;
  try {
    job = await apiJSON(base);
  } catch (e) {
    document.getElementById("summary").replaceChildren(el("h1", { text: "Job not found" }),
      el("p", { class: "error", text: e instanceof ApiError ? e.message : String(e) }), el("a", { href: "/", text: "All jobs" }));
    return;
  }
  fold.total = job.segments.length;
  const list = document.getElementById("segments");
  for (const s of job.segments) {
    const entry = { data: { ...s }, takeURLs: new Map(), historyOpen: false, visible: false, meta: el("div", { class: "seg-meta" }), body: el("div", { class: "seg-body" }),
                    actions: el("div", { class: "actions" }), audio: el("audio", { controls: true, preload: "metadata" }) };
    entry.node = el("article", { class: "seg", "data-segment-id": s.id }, entry.meta, entry.body,
      el("div", { class: "seg-side" }, entry.audio, entry.actions));
    segs.set(s.id, entry);
    list.append(entry.node);
    seen.observe(entry.node);
    dirty.add(s.id);
  }
  buildSummary();
  renderAll();
  document.body.dataset.ready = "true"; // for tests: the segments are on the page
  streamEvents(jobId, applyEvent);
  setInterval(() => summaryParts && renderSummary(), 1000); // the ETA counts down between events
}

main();
