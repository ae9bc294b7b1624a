/*
 * The chat page (/): streamed answers from POST /v1/chat/completions (SSE), the policy version of each answer,
 * and feedback through the widget (/widget.js). A share of turns (?compare=0.3, default 0.2) is answered with two
 * responses side by side for a comparison; the "Responses" control asks for 2 or 3 (to rank) explicitly.
 */
(function () {
  "use strict";

  var KEY_STORE = "alignd.apiKey";
  var params = new URLSearchParams(location.search);
  var compareRate = clamp(parseFloat(params.get("compare") || "0.2"), 0, 1);
  var maxTokens = parseInt(params.get("max_tokens") || "", 10) || null;

  var $ = function (id) { return document.getElementById(id); };
  var conversation = $("conversation"), form = $("composer"), input = $("message"), sendBtn = $("send");
  var keyDialog = $("key-dialog"), keyForm = $("key-form"), keyInput = $("key-input"), keyError = $("key-error");
  var chatError = $("chat-error"), policyBadge = $("policy"), responses = $("responses");
  var history = [];  // messages sent with the next request: user turns and the preferred answer of each turn
  var busy = false;

  function clamp(x, lo, hi) { return isNaN(x) ? 0.2 : Math.min(hi, Math.max(lo, x)); }
  function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

  function askKey(message) {
    keyError.hidden = !message;
    keyError.textContent = message || "";
    keyInput.value = "";
    if (!keyDialog.open) keyDialog.showModal();
    keyInput.focus();
  }

  keyForm.addEventListener("submit", function (e) {
    var key = keyInput.value.trim();
    if (!key) { e.preventDefault(); return; }
    localStorage.setItem(KEY_STORE, key);
    keyError.hidden = true;
    chatError.hidden = true;
    setTimeout(function () { input.focus(); }, 0);
  });
  keyDialog.addEventListener("cancel", function (e) { if (!apiKey()) e.preventDefault(); });
  $("change-key").addEventListener("click", function () { askKey(""); });
  $("new-chat").addEventListener("click", function () {
    history = [];
    conversation.textContent = "";
    chatError.hidden = true;
    input.focus();
  });

  input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var text = input.value.trim();
    if (!text || busy) return;
    if (!apiKey()) { askKey("Enter an API key before sending a message."); return; }
    input.value = "";
    send(text);
  });

  function choiceCount() {
    var v = responses.value;
    if (v !== "auto") return parseInt(v, 10);
    return Math.random() < compareRate ? 2 : 1;
  }

  /** The API's error.message from a failed response, or a plain description. */
  function errorMessage(res) {
    return res.text().then(function (t) {
      try { return JSON.parse(t).error.message; } catch (e) { return "the server answered " + res.status; }
    });
  }

  function showError(message) {
    chatError.textContent = message;
    chatError.hidden = false;
  }

  function node(tag, className, text) {
    var e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function renderTurn(text, n) {
    var turn = node("article", "turn");
    turn.appendChild(node("div", "msg user", text));
    var answer = node("div", "answer streaming");
    var grid = node("div", "choices n" + n);
    var boxes = [];
    for (var i = 0; i < n; i++) {
      var box = node("div", "choice");
      if (n > 1) box.appendChild(node("h3", "", n === 2 ? "Response " + "AB"[i] : "Response " + (i + 1)));
      var t = node("div", "text");
      box.appendChild(t);
      grid.appendChild(box);
      boxes.push(t);
    }
    answer.appendChild(grid);
    var meta = node("div", "meta");
    answer.appendChild(meta);
    turn.appendChild(answer);
    conversation.appendChild(turn);
    turn.scrollIntoView({ block: "end" });
    return { turn: turn, answer: answer, boxes: boxes, meta: meta };
  }

  /** Parse an SSE body: calls onEvent(parsed JSON) for each `data:` line until [DONE]. */
  function readSSE(body, onEvent) {
    var reader = body.getReader(), decoder = new TextDecoder(), buffer = "";
    function pump() {
      return reader.read().then(function (r) {
        buffer += decoder.decode(r.value || new Uint8Array(), { stream: !r.done });
        var parts = buffer.split(/\r?\n\r?\n/);
        buffer = r.done ? "" : parts.pop();
        for (var p = 0; p < parts.length; p++) {
          var lines = parts[p].split(/\r?\n/), data = [];
          lines.forEach(function (l) { if (l.indexOf("data:") === 0) data.push(l.slice(5).replace(/^ /, "")); });
          if (!data.length) continue;
          var payload = data.join("\n");
          if (payload === "[DONE]") return;
          onEvent(JSON.parse(payload));
        }
        if (!r.done) return pump();
      });
    }
    return pump();
  }

  function send(text) {
    busy = true;
    sendBtn.disabled = true;
    chatError.hidden = true;
    var n = choiceCount();
    var view = renderTurn(text, n);
    var texts = new Array(n).fill("");
    var messages = history.concat([{ role: "user", content: text }]);
    var body = { model: "alignd", messages: messages, stream: true, n: n };
    if (maxTokens) body.max_tokens = maxTokens;
    var completionId = null, version = null, failed = null;

    fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: "Bearer " + apiKey() },
      body: JSON.stringify(body),
    }).then(function (res) {
      if (!res.ok) {
        return errorMessage(res).then(function (msg) {
          failed = msg;
          if (res.status === 401) {
            localStorage.removeItem(KEY_STORE);
            askKey(msg + " — enter a valid key and send again.");
          }
        });
      }
      version = res.headers.get("X-Policy-Version");
      return readSSE(res.body, function (ev) {
        if (ev.error) { failed = ev.error.message; return; }
        completionId = ev.id || completionId;
        if (!version && ev.system_fingerprint) version = ev.system_fingerprint.replace(/^alignd-v/, "");
        (ev.choices || []).forEach(function (c) {
          if (c.delta && c.delta.content) {
            texts[c.index] += c.delta.content;
            view.boxes[c.index].textContent = texts[c.index].replace(/^\s+/, "");  // models often open with a newline
          }
        });
      });
    }).catch(function (err) {
      failed = "could not reach the server (" + err.message + ")";
    }).then(function () {
      view.answer.classList.remove("streaming");
      if (failed) {
        view.answer.classList.add("failed");
        view.meta.textContent = "Not answered: " + failed;
        showError(failed);
        input.value = input.value || text;  // give the message back so it can be sent again
        return;
      }
      finish(view, text, texts, completionId, version);
    }).then(function () {
      busy = false;
      sendBtn.disabled = false;
      input.focus();
    });
  }

  function finish(view, text, texts, completionId, version) {
    texts.forEach(function (t, i) { if (!t.trim()) view.boxes[i].textContent = "(empty response)"; });
    history.push({ role: "user", content: text });
    var kept = { role: "assistant", content: texts[0] };
    if (texts[0]) history.push(kept);
    if (version) {
      policyBadge.hidden = false;
      policyBadge.textContent = "policy v" + version;
      var v = node("span", "badge", "policy v" + version);
      v.title = "X-Policy-Version / system_fingerprint alignd-v" + version;
      view.meta.appendChild(v);
    }
    var idSpan = node("span", "", completionId);
    idSpan.className = "completion-id";
    view.meta.appendChild(idSpan);
    view.answer.dataset.completionId = completionId;
    var slot = node("div", "feedback");
    view.answer.appendChild(slot);
    AligndFeedback.attach(slot, {
      completionId: completionId,
      choices: texts,
      getApiKey: apiKey,
      showChoices: false,  // the page shows the responses above the controls
      onVote: function (vote) {
        // The next request continues from the response the user preferred.
        var best = vote.type === "pairwise" && typeof vote.winner === "number" ? vote.winner
          : vote.type === "rank" ? vote.ranking[0] : 0;
        kept.content = texts[best] || kept.content;
      },
      onError: function (err) {
        if (err.status === 401) {
          localStorage.removeItem(KEY_STORE);
          askKey(err.message + " — enter a valid key, then vote again.");
        }
      },
    });
  }

  if (!apiKey()) askKey("");
  else input.focus();
})();
