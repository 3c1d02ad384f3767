// A project's CPU, memory and bandwidth over the last hour, day or week, drawn with uPlot
// (a canvas; its element styles are set through the CSSOM, which style-src 'self' allows).
// Refreshed every 10 s while the tab is visible.

import { useEffect, useRef, useState } from "./vendor/hooks.mjs";
import uPlot from "./vendor/uPlot.esm.js";
import { api } from "./api.js";
import { bytesText, html, usePolling } from "./ui.js";

const REFRESH_SECONDS = 10;
// Range -> [seconds shown, bucket width in seconds]: 240 to 336 points per series.
const RANGES = { "1h": [3600, 15], "24h": [86400, 300], "7d": [7 * 86400, 1800] };

const CHARTS = [
  {
    key: "cpu",
    title: "CPU",
    unit: (v) => `${Math.round(v)} mCPU`,
    series: [["METRIC_TYPE_CPU_MILLICORES", "CPU (mCPU)", "#1f5fbf"]],
  },
  {
    key: "memory",
    title: "Memory",
    unit: (v) => bytesText(v),
    series: [["METRIC_TYPE_MEMORY_RSS_BYTES", "Memory (RSS)", "#127a3a"]],
  },
  {
    // Samples are bytes per sample interval: their sum over a bucket is the bytes it moved.
    key: "bandwidth",
    title: "Bandwidth (bytes per step)",
    unit: (v) => bytesText(v),
    series: [
      ["METRIC_TYPE_NETWORK_RX_BYTES", "Received", "#9a6700"],
      ["METRIC_TYPE_NETWORK_TX_BYTES", "Sent", "#b42318"],
    ],
  },
];

// One metric of the whole project: the sum over its containers, per bucket start (seconds).
async function metricSeries(projectId, metric, start, end, step) {
  const query = new URLSearchParams({
    metric,
    // Gauges average over a bucket; the network counters add up (bytes moved per bucket).
    aggregation: metric.startsWith("METRIC_TYPE_NETWORK_") ? "AGGREGATION_SUM" : "AGGREGATION_AVG",
    startTime: new Date(start * 1000).toISOString(),
    endTime: new Date(end * 1000).toISOString(),
    step: `${step}s`,
  });
  const reply = await api("GET", `/v1/projects/${encodeURIComponent(projectId)}/metrics?${query}`);
  const sums = new Map();
  for (const series of reply.series || []) {
    for (const point of series.points || []) {
      const t = Math.floor(Date.parse(point.time) / 1000);
      sums.set(t, (sums.get(t) || 0) + Number(point.value || 0));
    }
  }
  return sums;
}

async function loadCharts(projectId, range) {
  const [span, step] = RANGES[range];
  const end = Math.floor(Date.now() / 1000);
  const start = end - span;
  const wanted = CHARTS.flatMap((c) => c.series.map((s) => s[0]));
  const sums = await Promise.all(wanted.map((m) => metricSeries(projectId, m, start, end, step)));
  const byMetric = new Map(wanted.map((m, i) => [m, sums[i]]));
  const charts = {};
  for (const chart of CHARTS) {
    const times = new Set();
    for (const [metric] of chart.series) for (const t of byMetric.get(metric).keys()) times.add(t);
    const xs = [...times].sort((a, b) => a - b);
    const ys = chart.series.map(([metric]) => xs.map((t) => byMetric.get(metric).get(t) ?? null));
    charts[chart.key] = { data: [xs, ...ys], points: xs.length };
  }
  return { start, end, step, charts };
}

// The newest value of each series, as text: what the canvas shows, for those who cannot see it.
function latestText(spec, data) {
  const parts = spec.series.map(([, label], i) => {
    const ys = data[i + 1];
    for (let k = ys.length - 1; k >= 0; k--) if (ys[k] != null) return `${label} ${spec.unit(ys[k])}`;
    return "";
  });
  const known = parts.filter(Boolean);
  return known.length ? `latest: ${known.join(", ")}` : "";
}

function chartWidth(element) {
  return Math.max(240, Math.floor(element.clientWidth || 600));
}

function Chart({ spec, data, start, end }) {
  const box = useRef(null);
  const plot = useRef(null);
  const shown = useRef([start, end]);
  shown.current = [start, end];
  useEffect(() => {
    const element = box.current;
    const opts = {
      width: chartWidth(element),
      height: 180,
      legend: { show: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true, range: () => shown.current } },
      axes: [{}, { values: (_, ticks) => ticks.map(spec.unit), size: 80 }],
      series: [
        {},
        ...spec.series.map(([, label, stroke]) => ({
          label,
          stroke,
          width: 2,
          spanGaps: false,
          value: (_, v) => (v == null ? "–" : spec.unit(v)),
        })),
      ],
    };
    plot.current = new uPlot(opts, data, element);
    // The canvas as an image with a name; its values are in the caption and uPlot's legend.
    const canvas = element.querySelector("canvas");
    if (canvas) {
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", `${spec.title} chart; the newest values are in its caption`);
    }
    const onResize = () => plot.current && plot.current.setSize({ width: chartWidth(element), height: 180 });
    addEventListener("resize", onResize);
    return () => {
      removeEventListener("resize", onResize);
      plot.current.destroy();
      plot.current = null;
    };
  }, []);
  useEffect(() => {
    if (plot.current) plot.current.setData(data);
  }, [data]);
  return html`<div class="chart" data-metric=${spec.key} data-points=${data[0].length} ref=${box}></div>`;
}

export function MetricsPanel({ projectId }) {
  const [range, setRange] = useState("1h");
  const last = useRef(undefined);
  const [loaded, error] = usePolling(
    async () => {
      // While the tab is hidden, keep what is drawn and ask nothing.
      if (document.hidden && last.current && last.current.range === range) return last.current;
      last.current = { range, ...(await loadCharts(projectId, range)) };
      return last.current;
    },
    REFRESH_SECONDS,
    [projectId, range],
  );
  const current = loaded && loaded.range === range ? loaded : null;
  return html`<section aria-labelledby="metrics-title" id="metrics">
    <h2 id="metrics-title">Metrics <span class="muted small">(refreshed every ${REFRESH_SECONDS} s)</span></h2>
    <div class="choice ranges" role="group" aria-label="Time range">
      ${Object.keys(RANGES).map(
        (r) => html`<button type="button" key=${r} class=${r === range ? "range current" : "range"}
          aria-pressed=${r === range ? "true" : "false"} data-range=${r} onClick=${() => setRange(r)}>${r}</button>`,
      )}
    </div>
    ${error ? html`<p class="error" role="alert">${error}</p>` : null}
    ${current
      ? html`<div class="charts">
          ${CHARTS.map(
            (spec) => html`<figure key=${`${spec.key}-${range}`} class="card chart-card">
              <figcaption>${spec.title}${current.charts[spec.key].points === 0
                ? html` <span class="muted small">no samples in this range yet</span>`
                : html` <span class="muted small chart-latest">${latestText(spec, current.charts[spec.key].data)}</span>`}</figcaption>
              <${Chart} spec=${spec} data=${current.charts[spec.key].data} start=${current.start} end=${current.end} />
            </figure>`,
          )}
        </div>`
      : html`<p class="loading">Loading metrics…</p>`}
  </section>`;
}
