// The overview's charts, from /ui/history.json (per-minute rows kept by the daemon), and the
// metrics page's, from /ui/task-metrics.json. Redrawn
// every minute; no inline script, so the Content-Security-Policy needs no 'unsafe-inline'.
(function () {
  const box = document.querySelector(".charts[data-history], .charts[data-task-metrics]");
  if (!box || !window.Chart) return;
  const charts = {};
  const colours = ["#2457c5", "#1f7a3a", "#b3261e", "#c77700", "#6a3fb5", "#00838f", "#8d6e63", "#555"];
  const time = (t) => new Date(t * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  function draw(id, labels, sets) {
    if (charts[id]) {
      charts[id].data.labels = labels;
      sets.forEach((s, i) => { charts[id].data.datasets[i].data = s.data; });
      charts[id].update("none");
      return;
    }
    charts[id] = new Chart(document.getElementById(id), {
      type: "line",
      data: {labels, datasets: sets.map((s) => Object.assign({pointRadius: 0, borderWidth: 1.5, tension: 0.2}, s))},
      options: {animation: false, maintainAspectRatio: false, interaction: {mode: "index", intersect: false},
                scales: {y: {beginAtZero: true}, y2: {beginAtZero: true, position: "right", display: sets.some((s) => s.yAxisID === "y2")}}},
    });
  }
  // The metrics page: per task name (helpers/task_metrics.py series), one line each.
  async function refreshTasks() {
    if (document.hidden) return;
    const response = await fetch(box.dataset.taskMetrics, {credentials: "same-origin"});
    if (!response.ok) return;
    const m = await response.json();
    const labels = m.minutes.map(time);
    const names = Object.keys(m.tasks);
    const line = (key) => names.map((name, i) => ({label: name, data: m.tasks[name][key],
                                                   borderColor: colours[i % colours.length], pointRadius: 2}));
    for (const id of ["chart-task-runs", "chart-task-p95"]) {  // the tasks seen may change
      if (charts[id] && charts[id].data.datasets.length !== names.length) { charts[id].destroy(); delete charts[id]; }
    }
    draw("chart-task-runs", labels, line("runs"));
    draw("chart-task-p95", labels, line("run_p95"));
  }
  if (box.dataset.taskMetrics) {
    refreshTasks();
    setInterval(() => { if (!window.oosLivePaused()) refreshTasks(); }, 60000);  // paused: from the menu
    return;
  }
  async function refresh() {
    if (document.hidden) return;
    const response = await fetch(box.dataset.history, {credentials: "same-origin"});
    if (!response.ok) return;
    const h = await response.json();
    const labels = h.minutes.map(time);
    draw("chart-done", labels, [{label: "succeeded", data: h.succeeded, borderColor: "#1f7a3a"},
                                {label: "failed", data: h.failed, borderColor: "#b3261e"}]);
    draw("chart-depth", labels, [{label: "queued", data: h.queued, borderColor: "#2457c5"},
                                 {label: "oldest ready (s)", data: h.oldest_age, borderColor: "#c77700", yAxisID: "y2"}]);
  }
  refresh();
  setInterval(() => { if (!window.oosLivePaused()) refresh(); }, 60000);
})();
