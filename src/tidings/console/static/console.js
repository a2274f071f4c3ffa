// tidings console: the live log (server-sent events) and keyboard shortcuts.
// Event data is only ever set with textContent: a payload can never become markup.
"use strict";

(function () {
  // -- the live log -------------------------------------------------------------------------
  const rows = document.getElementById("log-rows");
  const status = document.getElementById("live-status");
  const head = document.getElementById("head");
  const MAX_ROWS = 500;
  let received = 0;

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    return td;
  }

  function addRow(event) {
    const n = rows.dataset.n;
    const tr = document.createElement("tr");
    tr.className = "fresh";
    tr.dataset.position = String(event.position);
    tr.appendChild(cell(String(event.position), "num"));
    const streamCell = document.createElement("td");
    const link = document.createElement("a");
    link.className = "rowlink";
    link.href = "/s/" + n + "/stream/" + encodeURIComponent(event.stream_id).replace(/%2F/g, "/") +
      "?from=" + event.version + "#v" + event.version;
    link.textContent = event.stream_id;
    streamCell.appendChild(link);
    tr.appendChild(streamCell);
    tr.appendChild(cell(String(event.version), "num"));
    tr.appendChild(cell(event.type, "type"));
    const tagsCell = cell("", "tags");
    (event.tags || []).forEach(function (tag) {
      // the search text of queries.tag_search: quoted when the tag holds spaces
      const search = /\s/.test(tag) || tag.startsWith('"')
        ? 'tag:"' + tag.replace(/\\/g, "\\\\").replace(/"/g, '\\"') + '"'
        : "tag:" + tag;
      const a = document.createElement("a");
      a.className = "badge tag";
      a.href = "/s/" + n + "/streams?q=" + encodeURIComponent(search);
      a.title = "every event tagged " + tag;
      const code = document.createElement("code");
      code.textContent = tag;
      a.appendChild(code);
      tagsCell.appendChild(a);
      tagsCell.appendChild(document.createTextNode(" "));
    });
    tr.appendChild(tagsCell);
    tr.appendChild(cell(event.recorded_at.replace("T", " ").slice(0, 23), "when"));
    const data = event.data.length > 160 ? event.data.slice(0, 157) + "..." : event.data;
    tr.appendChild(cell(data, "excerpt"));
    const placeholder = rows.querySelector("tr.placeholder");
    if (placeholder) placeholder.remove();
    rows.insertBefore(tr, rows.firstChild);
    while (rows.children.length > MAX_ROWS) rows.removeChild(rows.lastChild);
  }

  if (rows && rows.dataset.live && window.EventSource) {
    const source = new EventSource(rows.dataset.live);
    source.addEventListener("open", function () {
      status.textContent = received ? "live: " + received + " new" : "live: waiting for new events";
      status.classList.add("on");
    });
    source.addEventListener("error", function () {
      status.textContent = "disconnected; retrying…";
      status.classList.remove("on");
    });
    source.addEventListener("append", function (message) {
      const event = JSON.parse(message.data);
      addRow(event);
      received += 1;
      if (head) head.textContent = String(event.position);
      status.textContent = "live: " + received + " new";
    });
  }

  // -- time travel: the slider drives the number -------------------------------------------
  const range = document.getElementById("version-range");
  const number = document.getElementById("version");
  if (range && number) {
    range.addEventListener("input", function () { number.value = range.value; });
    range.addEventListener("change", function () { number.form.submit(); });
    number.addEventListener("input", function () { range.value = number.value; });
  }

  // -- the token: typed once per tab, kept in sessionStorage ------------------------------
  const KEY = "tidings-console-token";
  document.querySelectorAll("input.token").forEach(function (input) {
    const saved = sessionStorage.getItem(KEY);
    if (saved && !input.value) input.value = saved;
    input.form.addEventListener("submit", function () {
      if (input.value) sessionStorage.setItem(KEY, input.value);
    });
  });

  // -- keyboard -----------------------------------------------------------------------------
  const GO = {};
  document.querySelectorAll("[data-go]").forEach(function (a) { GO[a.dataset.go] = a.href; });
  let pendingG = false;
  let cursor = -1;

  function typing(target) {
    return target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

  function move(step) {
    const links = Array.from(document.querySelectorAll("main .rowlink"));
    if (!links.length) return;
    const current = links.indexOf(document.activeElement);
    cursor = current >= 0 ? current + step : (step > 0 ? 0 : links.length - 1);
    cursor = Math.max(0, Math.min(links.length - 1, cursor));
    document.querySelectorAll("tr.cursor").forEach(function (tr) { tr.classList.remove("cursor"); });
    const link = links[cursor];
    link.focus();
    const tr = link.closest("tr");
    if (tr) tr.classList.add("cursor");
    link.scrollIntoView({ block: "nearest" });
  }

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (typing(e.target)) {
      if (e.key === "Escape") e.target.blur();
      return;
    }
    const help = document.getElementById("help");
    if (pendingG) {
      pendingG = false;
      if (GO[e.key]) { e.preventDefault(); window.location.href = GO[e.key]; }
      return;
    }
    switch (e.key) {
      case "/": {
        const search = document.getElementById("trace-id") || document.getElementById("search");
        e.preventDefault(); search.focus(); search.select(); break;
      }
      case "j": e.preventDefault(); move(1); break;
      case "k": e.preventDefault(); move(-1); break;
      case "g": pendingG = true; break;
      case "[": case "]": {
        const link = document.querySelector(e.key === "[" ? "[data-page=prev]" : "[data-page=next]");
        if (link) window.location.href = link.href;
        break;
      }
      case "?": if (help && help.showModal) { e.preventDefault(); help.showModal(); } break;
      default: break;
    }
  });
})();
