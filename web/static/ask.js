/* The ask page: streams /api/rag/ask (NDJSON) token by token, then turns [n] into links to the cited
   passage. Model and document text only ever go into text nodes (never innerHTML). */
"use strict";
(function () {
  var form = document.getElementById("ask-form");
  if (!form) return;
  var api = window.appliance.api;
  var thread = document.getElementById("thread");
  var status = document.getElementById("ask-status");
  var list = document.getElementById("conversation-list");
  var button = document.getElementById("ask-button");
  var question = document.getElementById("question");
  var conversationId = null;

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function citationUrl(c) {
    var query = "chunk=" + encodeURIComponent(c.chunk_id);
    if (typeof c.start === "number" && typeof c.end === "number") query += "&start=" + c.start + "&end=" + c.end;
    return "/documents/" + encodeURIComponent(c.document_id) + "?" + query + "#passage";
  }

  function label(c) {
    var parts = [c.title];
    if (c.page !== null && c.page !== undefined) parts.push("page " + c.page);
    if (c.section) parts.push(c.section);
    return parts.join(", ");
  }

  function renderAnswer(p, text, citations) {
    var byNumber = {};
    (citations || []).forEach(function (c) { byNumber[String(c.number)] = c; });
    p.textContent = "";
    var pattern = /\[(\d+)\]/g, last = 0, match;
    while ((match = pattern.exec(text)) !== null) {
      if (match.index > last) p.appendChild(document.createTextNode(text.slice(last, match.index)));
      var c = byNumber[match[1]];
      if (c) {
        var link = el("a", "cite", match[0]);
        link.href = citationUrl(c);
        link.title = label(c);
        p.appendChild(link);
      } else {
        p.appendChild(document.createTextNode(match[0]));
      }
      last = pattern.lastIndex;
    }
    if (last < text.length) p.appendChild(document.createTextNode(text.slice(last)));
  }

  function renderSources(box, citations) {
    if (!citations || !citations.length) return;
    var ol = el("ol", "sources");
    ol.setAttribute("aria-label", "Sources");
    citations.forEach(function (c) {
      var li = el("li");
      li.value = c.number;
      var link = el("a", "source", label(c));
      link.href = citationUrl(c);
      li.appendChild(link);
      if (c.quote) li.appendChild(el("div", "quote", "“" + c.quote + "”"));
      ol.appendChild(li);
    });
    box.appendChild(ol);
  }

  function addMessage(role, text) {
    var box = el("div", "message " + role);
    box.appendChild(el("p", "who sr-only", role === "user" ? "You asked:" : "Answer:"));
    var p = el("p", "text", text || "");
    box.appendChild(p);
    thread.appendChild(box);
    return { box: box, p: p };
  }

  function showAnswer(message, final) {
    renderAnswer(message.p, final.answer || "", final.citations);
    renderSources(message.box, final.citations);
    if (final.mode === "not_found") showRefusal(message.box, final);
  }

  /* A refusal says why, and links the passage that came closest, for the asker to open and judge. */
  function showRefusal(box, final) {
    box.appendChild(el("p", "note", "No passage you may read answers this."));
    if (final.closest) {
      var closest = el("p", "note closest", "Closest passage, judged not to answer it: ");
      var link = el("a", "source", label(final.closest));
      link.href = citationUrl(final.closest);
      closest.appendChild(link);
      box.appendChild(closest);
    }
    if (final.reason) box.appendChild(el("p", "note reason", "Why: " + final.reason));
  }

  function chosenCollections() {
    return Array.prototype.map.call(form.querySelectorAll('input[name="collection"]:checked'), function (i) { return i.value; });
  }

  async function ask(text) {
    var collections = chosenCollections();
    if (!collections.length) { status.textContent = "Choose at least one collection."; return; }
    addMessage("user", text);
    var answer = addMessage("assistant", "");
    answer.box.setAttribute("aria-busy", "true");
    status.textContent = "Answering…";
    button.disabled = true;
    var body = { question: text, collections: collections, stream: true };
    if (conversationId) body.conversation_id = conversationId;
    try {
      var response = await api("POST", "/api/rag/ask", body);
      if (!response.ok) { answer.p.textContent = await window.appliance.errorText(response); answer.box.classList.add("failed"); return; }
      var reader = response.body.getReader(), decoder = new TextDecoder(), buffer = "", final = null;
      for (;;) {
        var chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true });
        var lines = buffer.split("\n");
        buffer = lines.pop();
        lines.forEach(function (line) {
          if (!line.trim()) return;
          var item = JSON.parse(line);
          if (item.error) { answer.p.appendChild(document.createTextNode("\n" + item.error)); return; }
          if (item.done) { final = item; return; }
          if (item.response) answer.p.appendChild(document.createTextNode(item.response));
        });
      }
      if (final) {
        showAnswer(answer, final);
        if (final.conversation_id) conversationId = final.conversation_id;
        loadConversations();
      }
    } catch (error) {
      answer.p.appendChild(document.createTextNode("\nThe answer was interrupted: " + error.message));
    } finally {
      answer.box.removeAttribute("aria-busy");
      status.textContent = "";
      button.disabled = false;
    }
  }

  async function loadConversations() {
    var response = await api("GET", "/api/rag/conversations");
    if (!response.ok) return;
    var data = await response.json();
    list.textContent = "";
    data.conversations.forEach(function (c) {
      var li = el("li");
      var open = el("button", "open", c.title);
      open.type = "button";
      if (c.id === conversationId) open.setAttribute("aria-current", "true");
      open.addEventListener("click", function () { openConversation(c.id); });
      var del = el("button", "del", "×");
      del.type = "button";
      del.setAttribute("aria-label", "Delete conversation: " + c.title);
      del.addEventListener("click", function () { deleteConversation(c); });
      li.appendChild(open);
      li.appendChild(del);
      list.appendChild(li);
    });
  }

  async function openConversation(id) {
    var response = await api("GET", "/api/rag/conversations/" + encodeURIComponent(id));
    if (!response.ok) { status.textContent = await window.appliance.errorText(response); return; }
    var data = await response.json();
    conversationId = id;
    thread.textContent = "";
    data.messages.forEach(function (m) {
      var message = addMessage(m.role === "user" ? "user" : "assistant", "");
      if (m.role === "user") message.p.textContent = m.content;
      else showAnswer(message, { answer: m.content, citations: m.citations });
    });
    loadConversations();
    question.focus();
  }

  async function deleteConversation(c) {
    if (!window.confirm("Delete the conversation “" + c.title + "”?")) return;
    var response = await api("DELETE", "/api/rag/conversations/" + encodeURIComponent(c.id));
    if (!response.ok) { status.textContent = await window.appliance.errorText(response); return; }
    if (c.id === conversationId) { conversationId = null; thread.textContent = ""; }
    loadConversations();
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var text = question.value.trim();
    if (!text) return;
    question.value = "";
    ask(text);
  });
  question.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  document.getElementById("new-conversation").addEventListener("click", function () {
    conversationId = null;
    thread.textContent = "";
    loadConversations();
    question.focus();
  });
  loadConversations();
})();
