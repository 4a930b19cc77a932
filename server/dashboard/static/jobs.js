// Polls /admin/jobs.json and redraws the two job tables: live progress without a page reload.
"use strict";

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function progressCell(job) {
  const td = document.createElement("td");
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuenow", job.progress.percent.toFixed(1));
  const fill = document.createElement("div");
  fill.style.width = `${job.progress.percent}%`;
  bar.appendChild(fill);
  td.appendChild(bar);
  const label = job.progress.stage ? ` ${job.progress.stage} ${job.progress.percent.toFixed(0)}%` : " waiting";
  td.appendChild(document.createTextNode(label));
  return td;
}

function cancelCell(job) {
  const td = document.createElement("td");
  const form = document.createElement("form");
  form.method = "post";
  form.action = `/admin/jobs/${job.id}/cancel`;
  form.onsubmit = () => confirm(`Cancel job ${job.id}?`);
  const button = document.createElement("button");
  button.type = "submit";
  button.textContent = "Cancel";
  form.appendChild(button);
  td.appendChild(form);
  return td;
}

function render(data) {
  const pending = document.querySelector("#pending-jobs tbody");
  pending.replaceChildren(...data.pending.map((job) => {
    const tr = document.createElement("tr");
    tr.dataset.job = job.id;
    tr.append(cell(job.id), cell(job.task_id), cell(job.state), progressCell(job), cancelCell(job));
    return tr;
  }));
  const finished = document.querySelector("#finished-jobs tbody");
  finished.replaceChildren(...data.finished.map((job) => {
    const tr = document.createElement("tr");
    tr.dataset.job = job.id;
    const state = cell(job.state);
    state.className = `state-${job.state}`;
    tr.append(cell(job.id), cell(job.task_id), state,
      cell(job.version_id ? `v${job.version_id}` : "–"), cell(job.error || job.note || ""));
    return tr;
  }));
}

async function refresh() {
  const response = await fetch("/admin/jobs.json", { credentials: "same-origin" });
  if (response.status === 401) { window.location = "/admin/login?next=/admin/jobs"; return; }
  if (response.ok) { render(await response.json()); }
}

refresh();
setInterval(refresh, 1000);
