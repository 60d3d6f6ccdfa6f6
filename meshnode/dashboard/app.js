// meshnode's dashboard: polls this node's API and fills the tables.  Every
// value from the API is put in the page as text (never as HTML): model names
// and notes come from users.  The token, when the node wants one, is asked
// once and kept in this tab's sessionStorage.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "meshnode-token";
const $ = (id) => document.getElementById(id);

function bytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  if (value instanceof Node) td.appendChild(value); else td.textContent = value == null || value === "" ? "-" : String(value);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function state(value) {
  const s = document.createElement("span");
  s.textContent = value == null ? "-" : String(value);
  s.className = "state-" + String(value).replace(/[^a-z_]/gi, "");
  return s;
}

function fill(id, items, key, columns) {
  const body = $(id).tBodies[0];
  const rows = [];
  for (const item of items) {
    const tr = document.createElement("tr");
    tr.dataset.key = String(typeof key === "function" ? key(item) : item[key]);
    for (const col of columns) {
      const v = col(item);
      cell(tr, v);
    }
    rows.push(tr);
  }
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(tr, "none", "empty");
    td.colSpan = columns.length;
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

async function api(path) {
  const headers = { "Accept": "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  const r = await fetch(path, { headers, cache: "no-store" });
  if (r.status === 401) throw new NeedToken();
  const body = await r.json();
  if (!r.ok) throw new Error(body && body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${r.status}`);
  return body;
}

class NeedToken extends Error {}

function gpuText(n) {
  const gpus = Array.isArray(n.gpus) ? n.gpus : [];
  if (gpus.length === 0) return "-";
  return gpus.map((g) => `gpu${g.index}: ${bytes(g.used_bytes)} / ${bytes(g.total_bytes)}, ${g.util_pct ?? "-"}%`).join("; ");
}

function progress(t) {
  const p = document.createElement("span");
  const bar = document.createElement("progress");
  bar.max = t.bytes_total || 1;
  bar.value = t.bytes_done || 0;
  p.appendChild(bar);
  p.appendChild(document.createTextNode(` ${bytes(t.bytes_done)} / ${bytes(t.bytes_total)}`));
  return p;
}

function steps(j) {
  return (j.actions || []).map((a) => `${a.action_id} (${a.action_type}): ${a.status}`).join(", ");
}

async function refresh() {
  try {
    const [status, nodes, models, transfers, jobs, services] = await Promise.all(
      ["/status", "/nodes", "/models", "/transfers", "/jobs", "/services"].map(api));
    $("token-form").hidden = true;
    $("problem").hidden = true;
    $("node").textContent = `· ${status.node_id} · cluster ${status.cluster}`;
    const n = status.nodes || {};
    $("summary").textContent = `${n.alive ?? 0} of ${n.total ?? 0} nodes alive · ${models.total_count} models · `
      + `${transfers.transfers.filter((t) => t.status === "running" || t.status === "queued").length} transfers active · `
      + `${(status.jobs || {}).running ?? 0} jobs running · updated ${new Date().toLocaleTimeString()}`;
    fill("nodes", nodes.nodes, "node_id", [
      (x) => x.node_id + (x.self ? " (this node)" : ""), (x) => state(x.state), (x) => x.address,
      (x) => x.storage && x.storage.disk ? `${bytes(x.storage.disk.free)} of ${bytes(x.storage.disk.total)}` : "-",
      (x) => x.storage && x.storage.dram ? `${bytes(x.storage.dram.free)} of ${bytes(x.storage.dram.total)}` : "-",
      gpuText, (x) => (x.models || []).join(", ")]);
    fill("models", models.models, "model_name", [
      (x) => x.model_name, (x) => x.model_type, (x) => bytes(x.size), (x) => state(x.status),
      (x) => (x.locations || []).join(", "),
      (x) => (x.services || []).map((s) => `${s.node}:${s.port} ${s.state}`).join(", ")]);
    fill("transfers", transfers.transfers.slice().reverse(), "transfer_id", [
      (x) => x.transfer_id, (x) => x.model, (x) => x.target_device, (x) => state(x.status), progress,
      (x) => x.status === "running" ? `${bytes(x.rate_bps)}/s` : "-",
      (x) => (x.sources || []).join(", ") || x.source]);
    fill("jobs", jobs.jobs, "job_id", [
      (x) => x.job_id, (x) => x.name, (x) => state(x.status), steps, (x) => x.coordinator]);
    fill("services", services.services, (x) => `${x.model_name}@${x.node}:${x.port}`, [
      (x) => x.model_name, (x) => x.node, (x) => x.port, (x) => x.engine, (x) => state(x.state),
      (x) => (x.gpus || []).map((g) => `gpu${g}`).join(", ")]);
  } catch (e) {
    if (e instanceof NeedToken) {
      sessionStorage.removeItem(TOKEN_KEY);
      $("token-form").hidden = false;
      $("summary").textContent = "waiting for a token";
    } else {
      $("problem").hidden = false;
      $("problem").textContent = `cannot read the API: ${e.message}`;
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    $("token").value = "";
    refresh();
  });
  refresh();
  setInterval(refresh, REFRESH_MS);
});
