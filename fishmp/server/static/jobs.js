// The jobs page (/): every job, newest first; a running job's row is folded live from its event stream (progress,
// counts, frames/s, ETA), the others from GET /v1/jobs, polled.
import { api, apiJSON, countChips, el, fmtClock, fmtSeconds, JobFold, progressBar, sleep, statusPill,
         streamEvents } from "/static/common.js";

const MAX_STREAMS = 4; // a browser opens about 6 connections per server: leave room for the page's other requests
const POLL_MS = 3000;
const rows = new Map(); // job id -> row
const list = document.getElementById("jobs");

function sum(c) { return c.done + c.failed + c.pending; }

function makeRow(job) {
  const row = { job, fold: null, stream: null, armed: null };
  row.bar = progressBar();
  row.counts = el("div", { class: "counts" });
  row.status = el("span", { class: "status-slot" });
  row.total = el("span", { class: "muted total" });
  row.fps = el("span", { class: "metric", "data-field": "fps" });
  row.eta = el("span", { class: "metric", "data-field": "eta" });
  row.cancel = el("button", { class: "danger small", type: "button", "data-action": "cancel", text: "Cancel",
                              onclick: () => cancel(row) });
  row.node = el("article", { class: "job", "data-job-id": job.id },
    el("div", { class: "job-head" },
      el("a", { class: "job-id mono", href: `/jobs/${encodeURIComponent(job.id)}`, text: job.id }),
      row.status, row.total,
      el("span", { class: "muted created", title: new Date(job.created_at * 1000).toString(),
                   text: fmtClock(job.created_at) })),
    row.bar,
    el("div", { class: "job-foot" }, row.counts, el("span", { class: "metrics" }, row.fps, row.eta), row.cancel));
  return row;
}

const OVER = ["done", "failed", "cancelled", "interrupted", "damaged"]; // damaged: its files could not be read

function render(row) {
  // The stream's fold while the job runs; once GET /v1/jobs says it is over, the server's counts (they include
  // the reviews made since).
  const live = row.fold !== null && !OVER.includes(row.job.status);
  const counts = live ? row.fold.counts() : row.job.counts;
  const status = live && row.fold.status !== "queued" ? row.fold.status : row.job.status;
  const over = OVER.includes(status);
  row.node.dataset.status = status;
  row.status.replaceChildren(statusPill(status));
  row.bar.update(counts);
  row.total.textContent = `${sum(counts)} segments`;
  row.counts.replaceChildren(...countChips(counts));
  const fps = live && !over ? row.fold.rates().fps : null;
  const eta = live && !over ? row.fold.eta() : null;
  row.fps.textContent = fps === null ? "" : `${fps.toFixed(1)} frames/s`;
  row.eta.textContent = eta === null ? "" : eta === 0 ? "finishing" : `ETA ${fmtSeconds(eta)}`;
  row.cancel.hidden = over;
  row.cancel.disabled = row.armed === "sent";
}

async function cancel(row) {
  if (row.armed !== "confirm") { // two clicks: no dialog to dismiss on a phone, no job lost to a stray tap
    row.armed = "confirm";
    row.cancel.textContent = "Confirm cancel";
    row.cancel.classList.add("armed");
    setTimeout(() => {
      if (row.armed === "confirm") {
        row.armed = null;
        row.cancel.textContent = "Cancel";
        row.cancel.classList.remove("armed");
      }
    }, 4000);
    return;
  }
  row.armed = "sent";
  row.cancel.textContent = "Cancelling…";
  render(row);
  const r = await api(`/v1/jobs/${encodeURIComponent(row.job.id)}`, { method: "DELETE" });
  if (!r.ok && r.status !== 409) { row.armed = null; row.cancel.textContent = "Cancel"; }
  render(row);
}

function startStream(row) {
  row.fold = new JobFold(sum(row.job.counts));
  row.stream = new AbortController();
  streamEvents(row.job.id, (ev) => {
    row.fold.apply(ev);
    render(row);
    if (row.fold.over && row.stream) { // its last event came: free the connection for another running job
      const stream = row.stream;
      row.stream = null;
      setTimeout(() => stream.abort(), 500);
    }
  }, { signal: row.stream.signal });
}

async function poll() {
  let jobs;
  try {
    jobs = (await apiJSON("/v1/jobs")).jobs;
    document.getElementById("jobs-note").textContent = "";
  } catch (e) {
    document.getElementById("jobs-note").textContent = `cannot reach the server: ${e.message}`;
    return;
  }
  jobs.sort((a, b) => b.created_at - a.created_at);
  for (const job of jobs) {
    let row = rows.get(job.id);
    if (!row) rows.set(job.id, (row = makeRow(job)));
    row.job = job;
  }
  list.replaceChildren(...jobs.map((j) => rows.get(j.id).node)); // newest first; rows keep their state
  document.getElementById("jobs-empty").hidden = jobs.length > 0;
  document.body.dataset.ready = "true"; // for tests: the first list is on the page
  let streams = [...rows.values()].filter((r) => r.stream).length;
  for (const job of jobs) {
    const row = rows.get(job.id);
    if (!OVER.includes(job.status) && !row.stream && streams < MAX_STREAMS) {
      startStream(row);
      streams++;
    }
    render(row);
  }
}

async function main() {
  for (;;) {
    await poll();
    await sleep(POLL_MS);
  }
}

setInterval(() => rows.forEach((row) => row.fold && render(row)), 1000); // the ETA counts down between events
main();
