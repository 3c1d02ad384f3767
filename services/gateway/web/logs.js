// A project's live logs: `GET /v1/projects/{id}/logs:tail` read as a stream (fetch and a
// ReadableStream reader; NDJSON lines), reconnected with back-off after a drop and resumed
// without repeating lines (each reconnect asks for the last lines again and skips those
// already shown). Auto-scrolls unless the reader scrolled up; a text filter; a pause that
// holds new lines back until resumed. Browsers that cannot read a response body as a stream
// fall back to polling `GET .../logs` every few seconds.

import { useEffect, useLayoutEffect, useRef, useState } from "./vendor/hooks.mjs";
import { ApiError, api, describe, stream } from "./api.js";
import { html, when } from "./ui.js";

const KEEP = 1000; // lines kept on the page
const TAIL = 100; // history asked for on each (re)connect
const POLL_SECONDS = 3;
const BACKOFF_MAX_SECONDS = 30;

export const streamName = (s) => (s || "").replace("LOG_STREAM_", "").toLowerCase() || "stdout";

function keyOf(e) {
  return `${e.containerId || ""}|${e.emittedAt || ""}|${e.stream || ""}|${e.line || ""}`;
}

export function LiveLogs({ projectId }) {
  const [entries, setEntries] = useState([]);
  const [held, setHeld] = useState(0); // lines waiting while paused
  const [paused, setPaused] = useState(false);
  const [filter, setFilter] = useState("");
  const [state, setState] = useState("connecting"); // connecting | live | retrying | polling
  const [error, setError] = useState("");
  const [opens, setOpens] = useState(0); // streams opened so far (1 + reconnects)
  const box = useRef(null);
  const stick = useRef(true); // follow new lines unless the reader scrolled up
  const [following, setFollowing] = useState(true); // the same, for the Follow button
  const pausedRef = useRef(false);
  const pending = useRef([]);
  const seen = useRef(new Set());

  function add(batch) {
    const fresh = [];
    for (const entry of batch) {
      const key = keyOf(entry);
      if (seen.current.has(key)) continue;
      seen.current.add(key);
      fresh.push({ ...entry, key });
    }
    if (!fresh.length) return;
    if (pausedRef.current) {
      pending.current.push(...fresh);
      setHeld(pending.current.length);
      return;
    }
    show(fresh);
  }

  function show(fresh) {
    setEntries((old) => {
      const all = old.concat(fresh);
      if (all.length <= KEEP) return all;
      const kept = all.slice(all.length - KEEP);
      if (seen.current.size > KEEP * 4) seen.current = new Set(kept.map((e) => e.key));
      return kept;
    });
  }

  useEffect(() => {
    const controller = new AbortController();
    let timer = null;
    let alive = true;
    setEntries([]);
    seen.current = new Set();
    pending.current = [];
    setHeld(0);
    const path = `/v1/projects/${encodeURIComponent(projectId)}`;

    async function poll() {
      if (!alive) return;
      try {
        const reply = await api("GET", `${path}/logs?pageSize=${TAIL}`);
        if (!alive) return;
        add((reply.entries || []).slice().reverse()); // the API answers newest first
        setError("");
      } catch (problem) {
        if (alive) setError(describe(problem));
      }
      if (alive) timer = setTimeout(poll, POLL_SECONDS * 1000);
    }

    async function run() {
      let delay = 1;
      while (alive) {
        let opened = 0; // when the response started (0: it did not)
        let lines = 0;
        try {
          await stream(
            `${path}/logs:tail?tailLines=${TAIL}`,
            (entry) => {
              lines++;
              add([entry]);
            },
            controller.signal,
            () => {
              opened = Date.now();
              setState("live");
              setError("");
              setOpens((n) => n + 1);
            },
          );
        } catch (problem) {
          if (!alive) return;
          if (problem instanceof TypeError && problem.message === "streaming") {
            setState("polling");
            poll();
            return;
          }
          if (problem instanceof ApiError && [401, 403, 404].includes(problem.status)) {
            setError(describe(problem));
            setState("stopped");
            return;
          }
          // The gateway ends a long stream with DEADLINE_EXCEEDED (its stream timeout): a
          // normal end of an open stream, reopened without a word.
          if (!(opened && problem instanceof ApiError && problem.status === 504)) setError(describe(problem));
        }
        if (!alive) return;
        // A stream that worked for a while (or brought lines) starts the back-off afresh.
        if (opened && (lines || Date.now() - opened > 5000)) delay = 1;
        setState("retrying");
        await new Promise((resolve) => {
          timer = setTimeout(resolve, delay * 1000);
        });
        delay = Math.min(delay * 2, BACKOFF_MAX_SECONDS);
      }
    }

    run();
    return () => {
      alive = false;
      controller.abort();
      if (timer) clearTimeout(timer);
    };
  }, [projectId]);

  const needle = filter.trim().toLowerCase();
  const visible = needle ? entries.filter((e) => (e.line || "").toLowerCase().includes(needle)) : entries;

  useLayoutEffect(() => {
    const el = box.current;
    if (el && stick.current) el.scrollTop = el.scrollHeight;
  });

  function onScroll() {
    const el = box.current;
    if (!el) return;
    stick.current = el.scrollHeight - el.scrollTop - el.clientHeight < 24;
    if (stick.current !== following) setFollowing(stick.current);
  }

  function follow() {
    const el = box.current;
    stick.current = true;
    setFollowing(true);
    if (el) el.scrollTop = el.scrollHeight;
  }

  function togglePause() {
    const next = !pausedRef.current;
    pausedRef.current = next;
    setPaused(next);
    if (!next) {
      const flushed = pending.current;
      pending.current = [];
      setHeld(0);
      if (flushed.length) show(flushed);
    }
  }

  const stateText = {
    connecting: "connecting…",
    live: "live",
    retrying: "reconnecting…",
    polling: `refreshed every ${POLL_SECONDS} s (this browser cannot stream)`,
    stopped: "stopped",
  }[state];

  return html`<section aria-labelledby="logs-title" id="live-logs" data-state=${state} data-connections=${opens}>
    <h2 id="logs-title">Logs <span class="muted small" id="logs-state" role="status">(${stateText})</span></h2>
    <div class="logs-controls">
      <label class="field inline">
        <span class="label">Filter</span>
        <input type="search" name="log-filter" id="log-filter" value=${filter} autocomplete="off"
          placeholder="text in the line" onInput=${(e) => setFilter(e.currentTarget.value)} />
      </label>
      <button type="button" id="log-pause" aria-pressed=${paused ? "true" : "false"} onClick=${togglePause}>
        ${paused ? "Resume" : "Pause"}
      </button>
      ${following ? null : html`<button type="button" id="log-follow" onClick=${follow}>Follow new lines</button>`}
      ${paused ? html`<span class="muted small" id="log-held">${held} new line${held === 1 ? "" : "s"} held</span>` : null}
      <span class="legend small">
        <span class="stream stream-build">build</span> <span class="stream stream-stdout">stdout</span>
        <span class="stream stream-stderr">stderr</span>
      </span>
    </div>
    ${error ? html`<p class="error" role="alert">${error}</p>` : null}
    ${entries.length === 0 && !error ? html`<p class="notice">No log lines yet.</p>` : null}
    ${needle && entries.length && !visible.length ? html`<p class="notice" id="log-no-match">No line matches the filter.</p>` : null}
    <div class="logs" id="logs" role="log" aria-labelledby="logs-title" tabindex="0" ref=${box} onScroll=${onScroll}
      aria-live=${paused || needle ? "off" : "polite"}>
      ${visible.length
        ? html`<ol>
            ${visible.map(
              (e) => html`<li key=${e.key} class=${`log log-${streamName(e.stream)}`}>
                <time class="muted">${when(e.emittedAt)}</time>
                ${" "}<span class=${`stream stream-${streamName(e.stream)}`}>${streamName(e.stream)}</span>
                ${" "}<span class="line">${e.line}</span>
              </li>`,
            )}
          </ol>`
        : null}
    </div>
  </section>`;
}
