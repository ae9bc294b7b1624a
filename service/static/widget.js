/*
 * alignd feedback widget: thumbs, A/B preference and ranking controls that POST /v1/feedback.
 *
 * No dependencies; served by alignd at /widget.js. Usage:
 *
 *   <script src="https://alignd.example/widget.js"></script>
 *   <script>
 *     AligndFeedback.attach(document.getElementById("answer"), {
 *       baseUrl: "https://alignd.example",   // where the API is ("" = this page's origin)
 *       apiKey: "sk-alignd-...",             // a feedback-only key ("key:user:feedback" in ALIGND_API_KEYS),
 *                                            // or getApiKey: () => key (may return a Promise)
 *       user: "u-42",                        // the `user` the chat request named, if it named one
 *       completionId: completion.id,         // the "id" of the chat completion
 *       choices: completion.choices.map(c => c.message.content),
 *     });
 *   </script>
 *
 * One choice gets thumbs up/down (and an optional comment), two get "which response do you prefer?" (A, B, tie,
 * both bad), three or more get a ranking (drag the items, or move them with the arrow buttons). Each vote carries a
 * `feedback_id` (a UUID) that is reused when the same vote is retried, so a retry after a lost answer is counted
 * once; a different vote later is a revision of the first. The element receives an `alignd:feedback` event with
 * {vote, response} after each saved vote.
 */
(function (global) {
  "use strict";

  var STYLE_ID = "alignd-feedback-style";
  var CSS = [
    ".af{font:inherit;margin-top:.5rem;display:flex;flex-direction:column;gap:.4rem}",
    ".af [hidden]{display:none!important}",
    ".af-row{display:flex;flex-wrap:wrap;gap:.4rem;align-items:center}",
    ".af button{font:inherit;font-size:.9rem;padding:.35rem .7rem;border:1px solid #b9c0cc;border-radius:.45rem;",
    "background:#fff;color:#1d2330;cursor:pointer;min-height:2.2rem}",
    ".af button:hover{background:#f1f4f9}",
    ".af button:focus-visible{outline:3px solid #2f6fde;outline-offset:1px}",
    ".af button[aria-pressed=true]{background:#2f6fde;border-color:#2f6fde;color:#fff}",
    ".af button:disabled{opacity:.6;cursor:progress}",
    ".af svg{width:1.1em;height:1.1em;vertical-align:-.2em;margin-right:.3em;fill:none;stroke:currentColor;",
    "stroke-width:2;stroke-linecap:round;stroke-linejoin:round}",
    ".af-q{font-weight:600;font-size:.95rem}",
    ".af-pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(14rem,1fr));gap:.6rem}",
    ".af-pair>div{border:1px solid #d6dbe4;border-radius:.5rem;padding:.6rem;white-space:pre-wrap;",
    "overflow-wrap:anywhere}",
    ".af-pair h4{margin:0 0 .3rem;font-size:.85rem;color:#5a6272}",
    ".af-rank{list-style:none;margin:0;padding:0;display:flex;flex-direction:column;gap:.35rem}",
    ".af-rank li{display:flex;align-items:center;gap:.5rem;border:1px solid #d6dbe4;border-radius:.5rem;",
    "padding:.35rem .5rem;background:#fff;cursor:grab}",
    ".af-rank li.af-dragging{opacity:.5}",
    ".af-rank li.af-over{border-color:#2f6fde;box-shadow:0 0 0 2px #2f6fde33}",
    ".af-pos{font-weight:700;color:#2f6fde;min-width:1.4rem}",
    ".af-text{flex:1;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}",
    ".af-rank button{min-height:1.9rem;padding:.1rem .5rem}",
    ".af-status{font-size:.85rem;color:#5a6272;min-height:1.2em}",
    ".af-status.af-ok{color:#1f7a3a}",
    ".af-status.af-err{color:#b3261e}",
    ".af textarea{font:inherit;width:100%;box-sizing:border-box;min-height:3.5rem;padding:.4rem;",
    "border:1px solid #b9c0cc;border-radius:.45rem}",
    ".af-sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}",
  ].join("");

  function injectStyle() {
    if (document.getElementById(STYLE_ID)) return;
    var s = document.createElement("style");
    s.id = STYLE_ID;
    s.textContent = CSS;
    document.head.appendChild(s);
  }

  function uuid() {
    if (global.crypto && typeof global.crypto.randomUUID === "function") return global.crypto.randomUUID();
    // randomUUID exists only in secure contexts (https or localhost); plain-http pages get a v4 UUID built here.
    var b = new Uint8Array(16);
    global.crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "className") e.className = attrs[k];
      else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), attrs[k]);
      else e.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { e.appendChild(c); });
    return e;
  }

  // Thumb icons as inline SVG (Feather icons, MIT): emoji fonts are missing on many Linux desktops.
  var THUMB_UP = "M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7"
    + "a2 2 0 0 1 2-2h3";
  var THUMB_DOWN = "M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3zm7-13h2.67A2.31 2.31 0 0 1"
    + " 22 4v7a2.31 2.31 0 0 1-2.33 2H17";

  function icon(d) {
    var ns = "http://www.w3.org/2000/svg";
    var s = document.createElementNS(ns, "svg");
    s.setAttribute("viewBox", "0 0 24 24");
    s.setAttribute("aria-hidden", "true");
    var p = document.createElementNS(ns, "path");
    p.setAttribute("d", d);
    s.appendChild(p);
    return s;
  }

  function sameVote(a, b) {
    return !!a && !!b && JSON.stringify(a) === JSON.stringify(b);
  }

  /** Send one vote. Resolves to the API's JSON body; rejects with an Error whose message is the API's. */
  function post(opts, vote, feedbackId) {
    return Promise.resolve(opts.getApiKey ? opts.getApiKey() : opts.apiKey).then(function (key) {
      var body = Object.assign({ completion_id: opts.completionId, feedback_id: feedbackId }, vote);
      if (opts.user) body.user = opts.user;  // a completion requested for a named user takes only that user's votes
      var headers = { "Content-Type": "application/json" };
      if (key) headers.Authorization = "Bearer " + key;
      return fetch((opts.baseUrl || "").replace(/\/$/, "") + "/v1/feedback", {
        method: "POST", headers: headers, body: JSON.stringify(body),
      }).catch(function () {
        throw new Error("could not reach the server; your vote was not saved");
      }).then(function (res) {
        return res.text().then(function (text) {
          var data = null;
          try { data = text ? JSON.parse(text) : null; } catch (e) { /* not JSON: reported below */ }
          if (res.ok && data) return data;
          var msg = data && data.error && data.error.message ? data.error.message
            : "the server answered " + res.status + " " + res.statusText;
          var err = new Error(msg);
          err.status = res.status;
          throw err;
        });
      });
    });
  }

  function attach(element, options) {
    if (!element) throw new Error("AligndFeedback.attach: no element given");
    var opts = Object.assign({ baseUrl: "", choices: [""], showChoices: true }, options || {});
    if (!opts.completionId) throw new Error("AligndFeedback.attach: completionId is required");
    var n = Array.isArray(opts.choices) ? opts.choices.length : Number(opts.choices);
    var texts = Array.isArray(opts.choices) ? opts.choices : [];
    var labels = opts.labels || (n === 2 ? ["A", "B"] : Array.from({ length: n }, function (_, i) {
      return "Response " + (i + 1);
    }));
    injectStyle();

    var root = el("div", { className: "af", role: "group", "aria-label": "Feedback on this response" });
    var status = el("div", { className: "af-status", role: "status", "aria-live": "polite" });
    var retryBtn = el("button", { type: "button", text: "Retry", hidden: "" });
    var saved = null;      // the last vote the server accepted (without comment)
    var attempt = null;    // {vote, id} of the vote being sent or last failed: a retry of it reuses the id
    var comment = "";
    var pressables = [];   // [button, vote-matcher] pairs whose aria-pressed follows the saved vote

    function setStatus(text, kind) {
      status.textContent = text;
      status.className = "af-status" + (kind ? " af-" + kind : "");
    }

    function refreshPressed() {
      pressables.forEach(function (p) { p[0].setAttribute("aria-pressed", String(!!saved && p[1](saved))); });
    }

    function send(vote) {
      var full = Object.assign({}, vote, comment ? { comment: comment } : {});
      if (!attempt || !sameVote(attempt.vote, full)) attempt = { vote: full, id: uuid() };
      var current = attempt;
      var buttons = root.querySelectorAll("button");
      buttons.forEach(function (b) { b.disabled = true; });
      retryBtn.hidden = true;
      setStatus("Saving…");
      return post(opts, full, current.id).then(function (res) {
        var revised = saved !== null;
        saved = vote;
        attempt = null;
        setStatus((revised ? "Vote changed — saved" : "Saved") + " (revision " + res.revision + "). "
          + "You can change it.", "ok");
        root.dataset.revision = res.revision;
        refreshPressed();
        element.dispatchEvent(new CustomEvent("alignd:feedback", { detail: { vote: full, response: res } }));
        if (opts.onVote) opts.onVote(full, res);
      }, function (err) {
        setStatus("Not saved: " + err.message, "err");
        retryBtn.hidden = err.status >= 400 && err.status < 500 && err.status !== 408 && err.status !== 429;
        if (opts.onError) opts.onError(err);
      }).then(function () {
        buttons.forEach(function (b) { b.disabled = false; });
        if (rankList) updateRankButtons();
      });
    }

    retryBtn.addEventListener("click", function () { if (attempt) send(stripComment(attempt.vote)); });

    function stripComment(v) {
      var c = Object.assign({}, v);
      delete c.comment;
      return c;
    }

    function voteButton(label, vote, matcher, extra, iconPath) {
      var b = el("button", Object.assign({ type: "button", "aria-pressed": "false",
        onclick: function () { send(vote); } }, extra || {}));
      if (iconPath) b.appendChild(icon(iconPath));
      b.appendChild(document.createTextNode(label));
      pressables.push([b, matcher]);
      return b;
    }

    var rankList = null;
    var order = [];
    function updateRankButtons() {
      Array.prototype.forEach.call(rankList.children, function (li, pos) {
        li.querySelector(".af-pos").textContent = pos + 1 + ".";
        li.querySelector("[data-move=up]").disabled = pos === 0;
        li.querySelector("[data-move=down]").disabled = pos === order.length - 1;
      });
    }

    function moveItem(from, to) {
      if (to < 0 || to >= order.length || from === to) return;
      var item = order.splice(from, 1)[0];
      order.splice(to, 0, item);
      var li = rankList.children[from];
      rankList.removeChild(li);
      rankList.insertBefore(li, rankList.children[to] || null);
      updateRankButtons();
    }

    if (n <= 1) {
      root.appendChild(el("div", { className: "af-q", text: "Was this response helpful?" }));
      root.appendChild(el("div", { className: "af-row" }, [
        voteButton("Good", { type: "thumbs", choice: 0, value: "up" },
          function (v) { return v.value === "up"; }, { "aria-label": "Thumbs up: good response" }, THUMB_UP),
        voteButton("Bad", { type: "thumbs", choice: 0, value: "down" },
          function (v) { return v.value === "down"; }, { "aria-label": "Thumbs down: bad response" }, THUMB_DOWN),
      ]));
    } else if (n === 2) {
      root.appendChild(el("div", { className: "af-q", text: "Which response do you prefer?" }));
      if (opts.showChoices && texts.length === 2) {
        root.appendChild(el("div", { className: "af-pair" }, texts.map(function (t, i) {
          return el("div", {}, [el("h4", { text: "Response " + labels[i] }), document.createTextNode(t)]);
        })));
      }
      var outcomes = [[labels[0] + " is better", 0], [labels[1] + " is better", 1], ["Tie", "tie"],
        ["Both are bad", "both_bad"]];
      root.appendChild(el("div", { className: "af-row" }, outcomes.map(function (o) {
        return voteButton(o[0], { type: "pairwise", winner: o[1] }, function (v) { return v.winner === o[1]; });
      })));
    } else {
      order = Array.from({ length: n }, function (_, i) { return i; });
      root.appendChild(el("div", { className: "af-q", id: "af-rank-" + opts.completionId,
        text: "Rank the responses, best first (drag, or use the arrows)" }));
      rankList = el("ol", { className: "af-rank", "aria-labelledby": "af-rank-" + opts.completionId });
      var dragFrom = null;
      order.forEach(function (i) {
        var preview = texts[i] ? ": " + texts[i].replace(/\s+/g, " ").slice(0, 120) : "";
        var li = el("li", { draggable: "true", "data-choice": String(i) }, [
          el("span", { className: "af-pos" }),
          el("span", { className: "af-text", text: labels[i] + preview, title: texts[i] || "" }),
          el("button", { type: "button", "data-move": "up", "aria-label": "Move " + labels[i] + " up", text: "↑",
            onclick: function () { moveItem(order.indexOf(i), order.indexOf(i) - 1); } }),
          el("button", { type: "button", "data-move": "down", "aria-label": "Move " + labels[i] + " down",
            text: "↓", onclick: function () { moveItem(order.indexOf(i), order.indexOf(i) + 1); } }),
        ]);
        li.addEventListener("dragstart", function (e) {
          dragFrom = order.indexOf(i);
          li.classList.add("af-dragging");
          e.dataTransfer.effectAllowed = "move";
          e.dataTransfer.setData("text/plain", String(i));
        });
        li.addEventListener("dragend", function () { li.classList.remove("af-dragging"); });
        li.addEventListener("dragover", function (e) { e.preventDefault(); li.classList.add("af-over"); });
        li.addEventListener("dragleave", function () { li.classList.remove("af-over"); });
        li.addEventListener("drop", function (e) {
          e.preventDefault();
          li.classList.remove("af-over");
          if (dragFrom !== null) moveItem(dragFrom, order.indexOf(i));
          dragFrom = null;
        });
        rankList.appendChild(li);
      });
      root.appendChild(rankList);
      var submit = el("button", { type: "button", text: "Submit ranking",
        onclick: function () { send({ type: "rank", ranking: order.slice() }); } });
      root.appendChild(el("div", { className: "af-row" }, [submit]));
      updateRankButtons();
    }

    // An optional comment, sent with the vote: before a vote it rides along, after one it is saved as a revision.
    var commentBox = el("textarea", { "aria-label": "Comment (optional)", placeholder: "What was good or bad?",
      maxlength: "2000" });
    var commentRow = el("div", { hidden: "" }, [commentBox, el("div", { className: "af-row" }, [
      el("button", { type: "button", text: "Save comment", onclick: function () {
        comment = commentBox.value.trim();
        if (saved) send(saved);
        else setStatus("The comment will be sent with your vote.");
      } })])]);
    var commentToggle = el("button", { type: "button", text: "Add a comment", "aria-expanded": "false",
      onclick: function () {
        commentRow.hidden = !commentRow.hidden;
        commentToggle.setAttribute("aria-expanded", String(!commentRow.hidden));
        if (!commentRow.hidden) commentBox.focus();
      } });
    root.appendChild(el("div", { className: "af-row" }, [commentToggle, retryBtn]));
    root.appendChild(commentRow);
    root.appendChild(status);
    element.appendChild(root);

    return {
      element: root,
      /** The last saved vote, or null. */
      get vote() { return saved; },
      destroy: function () { if (root.parentNode) root.parentNode.removeChild(root); },
    };
  }

  global.AligndFeedback = { attach: attach, version: "1" };
})(window);
