// Turnstile's console: four pages over the admin API. Everything shown is set as text
// (textContent, SVG <title>), never parsed as HTML.
"use strict";

(function () {
  if (document.body.classList.contains("signin")) {
    if (location.hash === "#signin-failed") document.getElementById("failed").hidden = false;
    return;
  }

  let csrf = "";
  const page = document.getElementById("page");

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "on") for (const [type, fn] of Object.entries(value)) node.addEventListener(type, fn);
      else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  async function api(path, options) {
    const opts = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
    if (opts.method && opts.method !== "GET") {
      opts.headers["X-CSRF-Token"] = csrf;
      opts.headers["Content-Type"] = "application/json";
    }
    const resp = await fetch(path, opts);
    if (resp.status === 401) { location.reload(); throw new Error("signed out"); }
    const body = resp.status === 204 ? {} : await resp.json();
    if (!resp.ok) throw new Error((body.error && body.error.message) || resp.statusText);
    return body;
  }

  const usd = (v) => "$" + (Math.abs(v) >= 100 ? v.toFixed(2) : Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(4) : v.toFixed(6));
  const num = (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US"));
  const ms = (v) => (v === null || v === undefined ? "–" : v.toFixed(0) + " ms");
  const ms3 = (p) => (p.p50 === null ? "–" : p.p99 >= 1000
    ? `${(p.p50 / 1000).toFixed(2)} / ${(p.p95 / 1000).toFixed(2)} / ${(p.p99 / 1000).toFixed(2)} s`
    : `${p.p50.toFixed(0)} / ${p.p95.toFixed(0)} / ${p.p99.toFixed(0)} ms`);
  const when = (t) => (typeof t === "number" ? new Date(t * 1000) : new Date(t)).toISOString().replace("T", " ").slice(0, 19);

  function card(label, value) {
    return el("div", { class: "card" }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
  }

  // A bar chart drawn as SVG: one bar per value, a <title> per bar for its figure.
  function bars(title, values, labels, format, errors) {
    const svgNS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(svgNS, "svg");
    const width = 600, height = 140, top = Math.max(...values, 0) || 1, step = width / Math.max(values.length, 1);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    values.forEach((value, i) => {
      const h = (value / top) * (height - 14);
      const rect = document.createElementNS(svgNS, "rect");
      const w = Math.min(Math.max(step - 2, 1), 48);
      rect.setAttribute("x", String(i * step + (step - w) / 2));
      rect.setAttribute("y", String(height - 12 - h));
      rect.setAttribute("width", String(w));
      rect.setAttribute("height", String(Math.max(h, value > 0 ? 1 : 0)));
      const tip = document.createElementNS(svgNS, "title");
      tip.textContent = `${labels[i]}: ${format(value)}` + (errors && errors[i] ? `, ${format(errors[i])} failed` : "");
      rect.append(tip);
      svg.append(rect);
      if (errors && errors[i]) {  // the failed part of the bar, in red, at its foot
        const e = Math.max((errors[i] / top) * (height - 14), 1);
        const bad = rect.cloneNode(false);
        bad.setAttribute("y", String(height - 12 - e));
        bad.setAttribute("height", String(e));
        bad.setAttribute("class", "err");
        bad.append(tip.cloneNode(true));
        svg.append(bad);
      }
    });
    for (const i of [0, values.length - 1]) {
      if (values.length === 0) break;
      const text = document.createElementNS(svgNS, "text");
      text.setAttribute("x", String(i === 0 ? 0 : width));
      text.setAttribute("y", String(height - 1));
      text.setAttribute("text-anchor", i === 0 ? "start" : "end");
      text.textContent = labels[i];
      svg.append(text);
    }
    const peak = Math.max(...values, 0);
    return el("div", { class: "chart" }, el("div", { class: "muted" }, peak ? `${title} (peak ${format(peak)})` : `${title}: none yet`), svg);
  }

  // Labelled horizontal bars, for figures by key, model, day or tag.
  function hbars(title, values, labels, format) {
    const top = Math.max(...values, 0) || 1;
    return el("div", { class: "chart" }, el("div", { class: "muted" }, title),
      values.map((value, i) => el("div", { class: "hbar" },
        el("span", { class: "hlabel", title: labels[i] }, labels[i]),
        el("span", { class: "htrack" }, el("span", { class: "hfill", "data-share": (value / top).toFixed(4) })),
        el("span", { class: "hvalue" }, format(value)))));
  }

  function sizeBars() {
    for (const bar of page.querySelectorAll("[data-share]")) bar.style.width = (Number(bar.dataset.share) * 100).toFixed(1) + "%";
  }

  function ready(name) {
    sizeBars();
    document.body.dataset.ready = name;
    window.turnstileReady = performance.now();
  }

  // Overview.
  async function overview() {
    const [hour, day] = await Promise.all([api("/admin/v1/stats?window=hour"), api("/admin/v1/stats?window=day")]);
    const short = (b) => b.t.slice(11, 16) + " UTC";
    const dated = (b) => `${b.t.slice(5, 10)} ${b.t.slice(11, 16)} UTC`;
    page.replaceChildren(
      el("h1", {}, "Overview"),
      el("div", { class: "cards" },
        card("Requests per second", hour.totals.requests_per_second),
        card("Error rate (hour)", (hour.totals.error_rate * 100).toFixed(2) + " %"),
        card("Latency p50 / p95 / p99", ms3(hour.latency_ms)),
        card("First byte p50 / p95 / p99", ms3(hour.ttfb_ms)),
        card("Streams in flight", num(hour.streams_in_flight)),
        card("Requests hour / day", `${num(hour.totals.requests)} / ${num(day.totals.requests)}`),
        card("Tokens hour / day", `${num(hour.totals.tokens)} / ${num(day.totals.tokens)}`),
        card("Spend hour / day", `${usd(hour.totals.cost_usd)} / ${usd(day.totals.cost_usd)}`)),
      el("h2", {}, "Last hour, per minute"),
      el("div", { class: "grid2" },
        bars("Requests (failed in red)", hour.buckets.map((b) => b.requests), hour.buckets.map(short), num, hour.buckets.map((b) => b.errors)),
        bars("Spend", hour.buckets.map((b) => b.cost_usd), hour.buckets.map(short), usd)),
      el("h2", {}, "Last day, per hour"),
      el("div", { class: "grid2" },
        bars("Tokens", day.buckets.map((b) => b.tokens), day.buckets.map(dated), num),
        bars("Spend", day.buckets.map((b) => b.cost_usd), day.buckets.map(dated), usd)));
    ready("overview");
  }

  // Keys.
  function splitList(text) { return text.split(",").map((s) => s.trim()).filter(Boolean); }

  // The form's settings as the admin API takes them; an Error naming a field that is not right.
  function settingsFrom(form) {
    const get = (name) => form.elements[name].value.trim();
    const out = {};
    for (const name of ["rpm", "tpm", "concurrency"]) {
      if (get(name) && !/^[0-9]+$/.test(get(name))) throw new Error(`${name}: a whole number, or empty for none`);
      out[name] = get(name) ? Number(get(name)) : null;
    }
    out.budgets = get("budgets") ? splitList(get("budgets")) : null;
    out.allow = get("allow") ? splitList(get("allow")) : null;
    out.deny = get("deny") ? splitList(get("deny")) : null;
    out.expires_at = get("expires_at") || null;
    out.owner = get("owner") || null;
    // One tag per line: a value may hold commas.
    const tags = form.elements.tags.value.split("\n").map((t) => t.trim()).filter(Boolean);
    for (const t of tags) if (!t.includes("=")) throw new Error(`tag "${t}": name=value`);
    out.tags = tags.length ? Object.fromEntries(tags.map((t) => [t.split("=")[0], t.split("=").slice(1).join("=")])) : null;
    return out;
  }

  function settingsFields(current) {
    const s = current || {};
    const field = (name, label, value, placeholder) =>
      el("label", {}, label, el("input", { name, value: value === undefined ? "" : value, placeholder, size: 10 }));
    return [
      field("rpm", "Requests/min", s.rpm), field("tpm", "Tokens/min", s.tpm), field("concurrency", "At once", s.concurrency),
      field("budgets", "Budgets", (s.budgets || []).join(", "), "5/day, 100/month"),
      field("allow", "Allow", (s.allow || []).join(", "), "anthropic/*"),
      field("deny", "Deny", (s.deny || []).join(", ")),
      field("expires_at", "Expires", s.expires_at, "2027-01-01T00:00:00Z"),
      field("owner", "Owner", s.owner),
      el("label", {}, "Tags, one per line", el("textarea", { name: "tags", rows: 2, cols: 18, placeholder: "team=search" },
        Object.entries(s.tags || {}).map(([k, v]) => `${k}=${v}`).join("\n"))),
    ];
  }

  function progress(used, limit) {
    const share = limit ? Math.min(used / limit, 1) : 0;
    return el("div", { class: "bar" + (share > 0.8 ? " high" : "") }, el("span", { style: null, "data-share": share.toFixed(3) }));
  }

  let keysAfter = [0];
  async function keys(message) {
    const after = keysAfter[keysAfter.length - 1];
    const listing = await api(`/admin/v1/keys?detail=1&limit=50&after=${after}`);
    const notice = el("div", { id: "notice" }, message || "");
    const create = el("form", { class: "inline", id: "create" },
      el("label", {}, "Name", el("input", { name: "name", required: true })),
      el("label", {}, "Balance USD", el("input", { name: "balance", value: "0", size: 8 })),
      settingsFields(null),
      el("button", { class: "primary", type: "submit" }, "Create key"));
    create.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const made = await api("/admin/v1/keys", { method: "POST", body: JSON.stringify({
          name: create.elements.name.value, balance: create.elements.balance.value, settings: settingsFrom(create) }) });
        const shown = el("input", { readonly: true, id: "newkey", value: made.key });
        const copied = el("span", { class: "muted" });
        const copy = el("button", { type: "button", on: { click: async () => {
          try {
            await navigator.clipboard.writeText(made.key);  // only in a secure context (HTTPS, localhost)
          } catch {
            shown.select();
            document.execCommand("copy");
          }
          copied.textContent = " copied";
        } } }, "Copy");
        await keys(el("div", { class: "newkey" }, `Key for ${made.data.name} (shown once): `, shown, " ", copy, copied));
      } catch (err) { notice.replaceChildren(el("span", { class: "error" }, err.message)); }
    });
    const failed = (err) => notice.replaceChildren(el("span", { class: "error" }, err.message));
    const rows = listing.data.map((k) => {
      const expired = k.settings.expires_at && new Date(k.settings.expires_at) <= new Date();
      const status = k.revoked_at ? "revoked" : expired ? "expired" : "active";
      const budgets = (k.budgets || []).map((b) => el("div", {}, `${usd(b.spent)} of ${usd(b.limit)} / ${b.window}`, progress(b.spent, b.limit)));
      const limits = Object.entries(k.limits || {}).map(([name, v]) =>
        el("div", {}, name === "concurrent_requests" ? `${v.in_flight} of ${v.limit} at once` : `${num(v.remaining)} of ${num(v.limit)} ${name.replace(/_/g, " ")}`,
          progress(name === "concurrent_requests" ? v.in_flight : v.limit - v.remaining, v.limit)));
      const actions = k.revoked_at ? [] : [
        el("button", { type: "button", on: { click: async () => {
          const amount = prompt(`Add USD to ${k.name}'s balance (negative takes off):`, "");
          if (amount) {
            try { await api(`/admin/v1/keys/${k.id}/balance`, { method: "POST", body: JSON.stringify({ add: amount }) }); keys(); }
            catch (err) { failed(err); }
          }
        } } }, "Top up"),
        el("button", { type: "button", on: { click: () => edit(k) } }, "Edit"),
        el("button", { type: "button", class: "revoke", on: { click: async () => {
          if (confirm(`Revoke ${k.name}'s key? It stops working at once.`)) {
            try { await api(`/admin/v1/keys/${k.id}`, { method: "DELETE" }); keys(); } catch (err) { failed(err); }
          }
        } } }, "Revoke"),
      ];
      return el("tr", { "data-key": k.id },
        el("td", { class: "num" }, k.id), el("td", { class: "name" }, k.name), el("td", { class: "muted" }, k.key_hint),
        el("td", { class: "num" }, usd(k.balance)), el("td", { class: "num" }, usd(k.spent || 0)),
        el("td", {}, budgets), el("td", {}, limits), el("td", { class: "status" }, status), el("td", {}, actions));
    });
    const pager = el("div", { class: "toolbar" },
      keysAfter.length > 1 ? el("button", { type: "button", on: { click: () => { keysAfter.pop(); keys(); } } }, "Previous") : null,
      listing.next_after ? el("button", { type: "button", on: { click: () => { keysAfter.push(listing.next_after); keys(); } } }, "Next") : null);
    page.replaceChildren(el("h1", {}, "Keys"), create, notice,
      el("table", { id: "keys" }, el("thead", {}, el("tr", {}, ["ID", "Name", "Key", "Balance", "Spent", "Budgets", "Limits", "Status", ""]
        .map((h, i) => el("th", { class: [0, 3, 4].includes(i) ? "num" : null }, h)))), el("tbody", {}, rows)), pager);
    ready("keys");
  }

  function edit(k) {
    const form = el("form", { class: "inline", id: "edit" },
      el("label", {}, "Name", el("input", { name: "name", value: k.name })), settingsFields(k.settings),
      el("button", { class: "primary", type: "submit" }, `Save ${k.name}`),
      el("button", { type: "button", on: { click: () => keys() } }, "Cancel"));
    const problem = el("span", { class: "error" });
    form.append(problem);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await api(`/admin/v1/keys/${k.id}`, { method: "PATCH", body: JSON.stringify({ name: form.elements.name.value, settings: settingsFrom(form) }) });
        keys();
      } catch (err) { problem.textContent = err.message; }
    });
    page.replaceChildren(el("h1", {}, `Edit key ${k.id}`), form);
  }

  // Usage.
  const usageState = { by: "model", days: "7" };
  async function usage() {
    const since = usageState.days === "all" ? "" : `&since=${new Date(Date.now() - Number(usageState.days) * 86400000).toISOString().slice(0, 19)}Z`;
    const query = `by=${usageState.by}${since}&limit=1000`;
    const result = await api(`/admin/v1/usage?${query}`);
    const rows = result.data;
    const label = (r) => (r[usageState.by] === null ? "–" : usageState.by === "key" && r.name ? `${r.name} (#${r.key})` : String(r[usageState.by]));
    const chosen = rows.slice(0, 12);
    const select = (name, options) => {
      const node = el("select", { name, on: { change: (e) => { usageState[name] = e.target.value; usage(); } } },
        options.map(([value, text]) => el("option", { value, selected: usageState[name] === value }, text)));
      return node;
    };
    page.replaceChildren(el("h1", {}, "Usage"),
      el("div", { class: "toolbar" }, "By ", select("by", [["model", "model"], ["key", "key"], ["day", "day"], ["tag", "tag"]]),
        " over ", select("days", [["1", "1 day"], ["7", "7 days"], ["30", "30 days"], ["all", "all time"]]),
        el("a", { class: "button", id: "csv", href: `/admin/v1/usage?${query.replace("limit=1000", "limit=100000")}&format=csv`, download: "" }, "Download CSV")),
      el("div", { class: "grid2" },
        hbars(`Spend, top ${chosen.length}`, chosen.map((r) => r.cost_usd), chosen.map(label), usd),
        hbars(`Tokens, top ${chosen.length}`, chosen.map((r) => r.prompt_tokens + r.completion_tokens), chosen.map(label), num)),
      el("h2", {}, result.next_offset ? `The first ${rows.length} rows (the CSV has them all)` : `${rows.length} rows`),
      el("table", { id: "usage" }, el("thead", {}, el("tr", {}, [usageState.by, "Requests", "Prompt", "Completion", "Cached", "Cost"]
        .map((h, i) => el("th", { class: i ? "num" : null }, h)))),
        el("tbody", {}, rows.map((r) => el("tr", {}, el("td", {}, label(r)), el("td", { class: "num" }, num(r.requests)),
          el("td", { class: "num" }, num(r.prompt_tokens)), el("td", { class: "num" }, num(r.completion_tokens)),
          el("td", { class: "num" }, num(r.cached_tokens)), el("td", { class: "num" }, usd(r.cost_usd)))))));
    ready("usage");
  }

  // Live.
  let stream = null;
  function live() {
    const waiting = el("tr", {}, el("td", { colspan: 9, class: "muted" }, "Waiting for requests…"));
    const body = el("tbody", {}, waiting);
    page.replaceChildren(el("h1", {}, "Live"), el("p", { class: "muted" }, "Requests of this gateway process as they finish; no prompt or answer is ever shown."),
      el("table", { id: "live" }, el("thead", {}, el("tr", {}, ["Time (UTC)", "Key", "Model asked", "Model", "Provider", "Status", "Latency", "Tokens", "Cost"]
        .map((h) => el("th", {}, h)))), body));
    stream = new EventSource("/admin/v1/live");
    stream.addEventListener("request", (event) => {
      const r = JSON.parse(event.data);
      waiting.remove();
      body.prepend(el("tr", { "data-request": r.request_id },
        el("td", {}, when(r.time)), el("td", {}, r.key_name || (r.key ? `#${r.key}` : "anonymous")), el("td", {}, r.model_asked),
        el("td", {}, r.model), el("td", {}, r.provider || "–"), el("td", { class: `status-${String(r.status)[0]}` }, r.status),
        el("td", { class: "num" }, ms(r.latency_ms)), el("td", { class: "num" }, num(r.prompt_tokens + r.completion_tokens)),
        el("td", { class: "num" }, usd(r.cost_usd))));
      while (body.children.length > 200) body.lastChild.remove();
    });
    ready("live");
  }

  const pages = { overview, keys, usage, live };
  async function route() {
    if (stream) { stream.close(); stream = null; }
    const name = (location.hash || "#overview").slice(1);
    for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.page === name);
    delete document.body.dataset.ready;
    try { await (pages[name] || overview)(); } catch (err) { page.replaceChildren(el("p", { class: "error" }, err.message)); }
  }

  document.getElementById("signout").addEventListener("click", async () => {
    await api("/admin/logout", { method: "POST" }).catch(() => {});
    location.reload();
  });
  window.addEventListener("hashchange", route);
  api("/admin/session").then((s) => { csrf = s.csrf; route(); });
})();
