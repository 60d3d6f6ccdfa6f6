// The API's routes from /openapi.json, as text: method, path, summary, the
// request body's schema and each answer's.
"use strict";

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function schemaBlock(title, schema) {
  const d = el("details");
  d.appendChild(el("summary", title));
  d.appendChild(el("pre", JSON.stringify(schema, null, 2)));
  return d;
}

document.addEventListener("DOMContentLoaded", async () => {
  const main = document.getElementById("routes");
  const doc = await (await fetch("/openapi.json", { cache: "no-store" })).json();
  document.getElementById("version").textContent = `· ${doc.info.version}`;
  const byTag = new Map();
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const tag = (op.tags || ["other"])[0];
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push([method.toUpperCase(), path, op]);
    }
  }
  for (const [tag, ops] of [...byTag.entries()].sort()) {
    const s = el("section");
    s.appendChild(el("h2", tag));
    for (const [method, path, op] of ops) {
      const r = el("div", null, "route");
      r.dataset.route = `${method} ${path}`;
      r.appendChild(el("h3", `${method} ${path}`));
      r.appendChild(el("p", op.summary + (op.security && op.security.length === 0 ? " (no token needed)" : "")));
      const body = op.requestBody && Object.values(op.requestBody.content)[0];
      if (body) r.appendChild(schemaBlock("request body", body.schema));
      for (const [status, resp] of Object.entries(op.responses)) {
        const c = resp.content && Object.values(resp.content)[0];
        if (c && c.schema) r.appendChild(schemaBlock(`${status} ${resp.description}`, c.schema));
      }
      s.appendChild(r);
    }
    main.appendChild(s);
  }
});
