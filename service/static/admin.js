/*
 * The ops page (/admin): policy versions with metrics and provenance (GET /admin/versions), feedback counts and win
 * rates and per-annotator reliability (GET /admin/stats), a chart of the main metrics across versions (inline SVG), and rollback
 * (POST /admin/rollback {"version"}). Each section shows its own error, so a missing endpoint leaves the rest usable.
 */
(function () {
  "use strict";

  var KEY_STORE = "alignd.adminKey";
  // Metrics charted across versions, in this order, when a version reports them (training/evaluate.py names).
  var MAIN_METRICS = ["score/mean", "heldout_score", "oracle_utility", "live_win_rate", "thumbs_up_rate",
    "over_caution", "harmful_compliance", "jailbreak_compliance", "kl_to_ref", "length_mean"];
  var MAX_CHARTS = 8;
  var LOW_WEIGHT = 0.3;  // an annotator weighed below this in training is flagged on the page

  var $ = function (id) { return document.getElementById(id); };
  var state = { versions: null, current: null, stats: null, serving: null, events: [], reward: null };

  function key() { return sessionStorage.getItem(KEY_STORE) || ""; }

  function node(tag, text, className) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (className) e.className = className;
    return e;
  }

  function showLogin(message) {
    $("dashboard").hidden = true;
    $("login").hidden = false;
    $("login-error").hidden = !message;
    $("login-error").textContent = message || "";
    $("admin-key").focus();
  }

  /** fetch JSON with the admin key; rejects with an Error carrying the API's error.message and the status. */
  function api(method, path, body) {
    var init = { method: method, headers: { Authorization: "Bearer " + key() } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).catch(function (e) {
      throw Object.assign(new Error(method + " " + path + ": could not reach the server (" + e.message + ")"),
        { status: 0 });
    }).then(function (res) {
      return res.text().then(function (t) {
        var data = null;
        try { data = t ? JSON.parse(t) : null; } catch (e) { /* reported below */ }
        if (res.ok) return data;
        var msg = data && data.error && data.error.message ? data.error.message : res.statusText;
        if (res.status === 404 && !(data && data.error && data.error.code))
          msg = "this server has no " + path + " endpoint (" + msg + ")";
        throw Object.assign(new Error(method + " " + path + " → " + res.status + ": " + msg), { status: res.status });
      });
    });
  }

  function sectionError(id, err) {
    var box = $(id);
    box.hidden = !err;
    box.textContent = err ? err.message : "";
  }

  function authFailed(err) {
    if (err && (err.status === 401 || err.status === 403)) {
      sessionStorage.removeItem(KEY_STORE);
      showLogin(err.message.replace(/^.*?: /, ""));
      return true;
    }
    return false;
  }

  // --- versions

  /** GET /admin/versions: {data: [...], current, serving?, events?, reward?}; a bare list or items carrying
   * current/is_current are accepted too, so an older server still renders. */
  function normaliseVersions(body) {
    var list = Array.isArray(body) ? body : (body && (body.data || body.versions)) || [];
    var current = body && !Array.isArray(body) ? (body.current !== undefined ? body.current : body.current_version)
      : null;
    if (current && typeof current === "object") current = current.version;
    list.forEach(function (v) { if (v.current === true || v.is_current === true) current = v.version; });
    list = list.slice().sort(function (a, b) { return a.version - b.version; });
    var extra = body && !Array.isArray(body) ? body : {};
    return { list: list, current: current === null || current === undefined ? null : Number(current),
      serving: extra.serving || null, events: extra.events || [], reward: extra.reward || null };
  }

  function fmt(x) {
    if (typeof x === "number") return Number.isInteger(x) ? String(x) : x.toFixed(3);
    if (x === null || x === undefined) return "—";
    if (typeof x === "object") return JSON.stringify(x);
    return String(x);
  }

  function kv(obj, keys) {
    var box = node("div", null, "kv");
    (keys || Object.keys(obj)).forEach(function (k) {
      if (obj[k] === undefined) return;
      var s = node("span");
      s.appendChild(node("b", k + ": "));
      s.appendChild(document.createTextNode(fmt(obj[k])));
      box.appendChild(s);
    });
    return box;
  }

  function renderVersions() {
    var tbody = $("versions").querySelector("tbody");
    tbody.textContent = "";
    var cur = state.current;
    var serving = state.serving && state.serving.current !== undefined ? state.serving.current : cur;
    $("current").hidden = cur === null;
    $("current").textContent = serving === cur ? "serving v" + cur
      : "registry: v" + cur + " · this process serves v" + serving;
    $("current").className = serving === cur ? "badge current" : "badge warn";
    var reward = state.reward;
    $("reward").textContent = !reward || !reward.versions ? ""
      : reward.versions.length ? "Reward model: r" + reward.current + " is current (" + reward.versions.length
        + " trained)." : "Reward model: none trained yet.";
    if (!state.versions.length) {
      var tr = node("tr");
      var td = node("td", "No versions yet: run `alignd bootstrap`.");
      td.colSpan = 5;
      tr.appendChild(td);
      tbody.appendChild(tr);
    }
    state.versions.slice().reverse().forEach(function (v) {
      var tr = node("tr");
      tr.dataset.version = v.version;
      var vcell = node("td");
      vcell.appendChild(node("strong", "v" + v.version));
      if (v.created) vcell.appendChild(node("div", new Date(v.created * 1000).toLocaleString(), "muted"));
      tr.appendChild(vcell);

      var prov = {};
      ["source", "parent", "reward_version", "feedback", "annotators", "base"].forEach(function (k) {
        if (v[k] !== undefined) prov[k] = Array.isArray(v[k]) ? v[k].join(", ") : v[k];
      });
      var pcell = node("td");
      pcell.appendChild(kv(prov));
      tr.appendChild(pcell);

      var metrics = v.metrics || {};
      var shown = MAIN_METRICS.filter(function (m) { return typeof metrics[m] === "number"; });
      if (!shown.length) shown = Object.keys(metrics).filter(function (m) { return typeof metrics[m] === "number"; }).slice(0, 6);
      var mcell = node("td");
      mcell.appendChild(shown.length ? kv(metrics, shown) : node("span", "—", "muted"));
      tr.appendChild(mcell);

      var statusCell = node("td");
      var status = v.status || (v.version === cur ? "current" : v.refused ? "refused" : "available");
      statusCell.appendChild(node("span", status, "badge" + (status === "current" ? " current"
        : status === "available" ? "" : " warn")));
      var notes = {};
      var live = v.live_win_rate;
      if (live && typeof live === "object") notes["live win rate vs v" + live.vs] = pct(live.win_rate) + " (" + live.votes + " votes)";
      else if (typeof live === "number") notes["live win rate"] = pct(live);
      ["refused", "gate", "reason"].forEach(function (k) { if (v[k]) notes[k] = v[k]; });
      if (Object.keys(notes).length) statusCell.appendChild(kv(notes));
      tr.appendChild(statusCell);

      var act = node("td");
      if (v.version !== cur) act.appendChild(rollbackButton(v.version));
      tr.appendChild(act);
      tbody.appendChild(tr);
    });
  }

  /** Two clicks: the first arms the button (no blocking confirm() dialog), the second posts the rollback. */
  function rollbackButton(version) {
    var b = node("button", "Roll back to v" + version, "secondary");
    b.type = "button";
    var armed = false;
    b.addEventListener("click", function () {
      if (!armed) {
        armed = true;
        b.className = "danger";
        b.textContent = "Confirm rollback to v" + version;
        setTimeout(function () {
          if (armed && document.body.contains(b)) { armed = false; b.className = "secondary"; b.textContent = "Roll back to v" + version; }
        }, 8000);
        return;
      }
      armed = false;
      b.disabled = true;
      b.textContent = "Rolling back…";
      api("POST", "/admin/rollback", { version: version }).then(function (res) {
        notice("Rolled back: v" + ((res && (res.current || res.version)) || version) + " is now current.", false);
        return loadVersions();
      }, function (err) {
        if (authFailed(err)) return;
        notice(err.message, true);
        b.disabled = false;
        b.className = "secondary";
        b.textContent = "Roll back to v" + version;
      });
    });
    return b;
  }

  function notice(message, isError) {
    var box = $("notice");
    box.className = isError ? "error" : "panel";
    box.setAttribute("role", isError ? "alert" : "status");
    box.textContent = message;
  }

  function renderEvents() {
    fillTable("events", (state.events || []).map(function (e) {
      var rest = Object.assign({}, e);
      delete rest.event; delete rest.at; delete rest.version;
      return [e.at ? new Date(e.at * 1000).toLocaleString() : "—", e.event, e.version !== undefined ? "v" + e.version : "—",
        Object.keys(rest).map(function (k) { return k + "=" + fmt(rest[k]); }).join("  ")];
    }), "No registry events.");
  }

  // --- stats

  function renderStats() {
    var s = state.stats;
    var cards = $("stat-cards");
    cards.textContent = "";
    var items = [["events", s.events && s.events.total], ["current votes", s.votes && s.votes.total],
      ["unconsumed", s.unconsumed], ["pending", s.pending], ["imported", s.imported]];
    var byType = (s.votes && s.votes.by_type) || {};
    Object.keys(byType).forEach(function (t) { items.push([t + " votes", byType[t]]); });
    items.forEach(function (it) {
      if (it[1] === undefined) return;
      var c = node("div", null, "stat");
      c.dataset.stat = it[0];
      c.appendChild(node("div", fmt(it[1]), "v"));
      c.appendChild(node("div", it[0], "k"));
      cards.appendChild(c);
    });
    fillTable("thumbs", Object.keys(s.thumbs || {}).map(function (v) {
      var t = s.thumbs[v];
      return ["v" + v, t.up, t.down, pct(t.up_rate)];
    }), "No thumbs yet.");
    fillTable("pairs", Object.keys(s.pairs || {}).map(function (p) {
      var x = s.pairs[p];
      return [p.replace(/^(\d+)_vs_(\d+)$/, "v$1 vs v$2"), x.wins, x.losses, x.ties, x.both_bad, pct(x.win_rate)];
    }), "No comparisons between different versions yet.");
    var ann = (s.reliability && s.reliability.annotators) || {};
    fillTable("reliability", Object.keys(ann).map(function (name) {
      var a = ann[name];
      return [name, a.identified ? pct(a.accuracy) : "—", a.weight.toFixed(2), a.labels, a.overlap, reliabilityNote(a)];
    }), "No feedback yet.");
    Object.keys(ann).forEach(function (name, i) {  // a down-weighted annotator stands out (lowest weight first)
      var row = $("reliability").querySelector("tbody").children[i];
      if (row && ann[name].identified && ann[name].weight < LOW_WEIGHT) row.className = "low-weight";
    });
  }

  function reliabilityNote(a) {
    if (!a.identified) return "not measured: no item shared with another annotator (weight 1)";
    if (a.accuracy < 0.5) return "contrary to the consensus (or a minority taste): weight 0";
    if (a.weight < LOW_WEIGHT) return "near chance: down-weighted";
    return "";
  }

  function pct(x) { return typeof x === "number" ? (100 * x).toFixed(1) + " %" : "—"; }

  function fillTable(id, rows, empty) {
    var tbody = $(id).querySelector("tbody");
    tbody.textContent = "";
    if (!rows.length) {
      var tr = node("tr"), td = node("td", empty, "muted");
      td.colSpan = $(id).querySelectorAll("th").length;
      tr.appendChild(td);
      tbody.appendChild(tr);
    }
    rows.forEach(function (r) {
      var tr = node("tr");
      r.forEach(function (c) { tr.appendChild(node("td", fmt(c))); });
      tbody.appendChild(tr);
    });
  }

  // --- chart: one small SVG line chart per metric, versions on the x axis

  var SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function series() {
    var out = {};
    var versions = state.versions || [];
    var thumbs = (state.stats && state.stats.thumbs) || {};
    versions.forEach(function (v) {
      var m = Object.assign({}, v.metrics || {});
      var live = v.live_win_rate;
      if (live && typeof live.win_rate === "number") m.live_win_rate = live.win_rate;
      else if (typeof live === "number") m.live_win_rate = live;
      if (thumbs[v.version] && typeof thumbs[v.version].up_rate === "number") m.thumbs_up_rate = thumbs[v.version].up_rate;
      Object.keys(m).forEach(function (k) {
        if (typeof m[k] !== "number" || !isFinite(m[k])) return;
        (out[k] = out[k] || []).push([v.version, m[k]]);
      });
    });
    var names = MAIN_METRICS.filter(function (k) { return out[k]; });
    if (!names.length) names = Object.keys(out).filter(function (k) { return k !== "n"; });
    return names.slice(0, MAX_CHARTS).map(function (k) { return [k, out[k]]; });
  }

  function renderCharts() {
    var box = $("charts");
    box.textContent = "";
    var all = series();
    if (!all.length) {
      box.appendChild(node("p", state.versions ? "No version reports metrics yet." : "Versions are unavailable, so there is nothing to chart.", "muted"));
      return;
    }
    var xs = (state.versions || []).map(function (v) { return v.version; });
    var xmin = Math.min.apply(null, xs), xmax = Math.max.apply(null, xs);
    all.forEach(function (s) { box.appendChild(lineChart(s[0], s[1], xmin, xmax)); });
  }

  function lineChart(name, points, xmin, xmax) {
    var W = 300, H = 150, L = 46, R = 12, T = 10, B = 24;
    var ys = points.map(function (p) { return p[1]; });
    var ymin = Math.min.apply(null, ys), ymax = Math.max.apply(null, ys);
    if (ymin >= 0 && ymax <= 1 && name !== "kl_to_ref" && name !== "length_mean") { ymin = 0; ymax = 1; }
    if (ymax === ymin) { ymax += 1; ymin -= ymin === 0 ? 0 : 1; }
    var sx = function (x) { return xmax === xmin ? L + (W - L - R) / 2 : L + (x - xmin) / (xmax - xmin) * (W - L - R); };
    var sy = function (y) { return T + (1 - (y - ymin) / (ymax - ymin)) * (H - T - B); };
    var fig = node("figure", null, "chart");
    fig.className = "chart";
    fig.appendChild(node("figcaption", name));
    var g = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": name + " by version: " + points.map(function (p) { return "v" + p[0] + " " + fmt(p[1]); }).join(", ") });
    [ymin, (ymin + ymax) / 2, ymax].forEach(function (y) {
      g.appendChild(svg("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), stroke: "#e3e7ee" }));
      g.appendChild(svg("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end", "font-size": 12, fill: "#5a6272" }, fmt(y)));
    });
    var ticks = points.map(function (p) { return p[0]; });
    ticks.forEach(function (x, i) {
      if (ticks.length > 10 && i % Math.ceil(ticks.length / 10)) return;
      g.appendChild(svg("text", { x: sx(x), y: H - 8, "text-anchor": "middle", "font-size": 12, fill: "#5a6272" }, "v" + x));
    });
    g.appendChild(svg("polyline", { fill: "none", stroke: "#2f6fde", "stroke-width": 2,
      points: points.map(function (p) { return sx(p[0]) + "," + sy(p[1]); }).join(" ") }));
    points.forEach(function (p) {
      var c = svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: p[0] === state.current ? 5 : 3.5,
        fill: p[0] === state.current ? "#1f7a3a" : "#2f6fde" });
      c.appendChild(svg("title", {}, "v" + p[0] + ": " + fmt(p[1])));
      g.appendChild(c);
    });
    fig.appendChild(g);
    return fig;
  }

  // --- loading

  function loadVersions() {
    return api("GET", "/admin/versions").then(function (body) {
      var v = normaliseVersions(body);
      state.versions = v.list;
      state.current = v.current;
      state.serving = v.serving;
      state.events = v.events;
      state.reward = v.reward;
      sectionError("versions-error", null);
      renderVersions();
      renderEvents();
    }, function (err) {
      if (authFailed(err)) throw err;
      state.versions = null;
      $("versions").querySelector("tbody").textContent = "";
      $("events").querySelector("tbody").textContent = "";
      sectionError("versions-error", err);
    }).then(renderCharts);
  }

  function loadStats() {
    return api("GET", "/admin/stats").then(function (body) {
      state.stats = body || {};
      sectionError("stats-error", null);
      renderStats();
    }, function (err) {
      if (authFailed(err)) throw err;
      state.stats = null;
      sectionError("stats-error", err);
    });
  }

  function loadAll() {
    if (!key()) { showLogin(""); return Promise.resolve(); }
    $("login").hidden = true;
    $("dashboard").hidden = false;
    return Promise.all([loadStats(), loadVersions()]).then(renderCharts, function () { /* login shown */ });
  }

  $("login-form").addEventListener("submit", function (e) {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("admin-key").value.trim());
    $("admin-key").value = "";
    loadAll();
  });
  $("refresh").addEventListener("click", function () { notice("", false); $("notice").className = ""; loadAll(); });
  $("forget-key").addEventListener("click", function () { sessionStorage.removeItem(KEY_STORE); showLogin(""); });
  loadAll();
})();
