// 鱼病护理助手 chat page. Model output is always inserted as text (textContent), never as HTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const messages = $("messages"), input = $("input"), form = $("form"), send = $("send"), clearBtn = $("clear");
  let controller = null; // AbortController of the answer being streamed

  function basename(p) { return p ? String(p).replace(/\/+$/, "").split("/").pop() : ""; }

  function scrollDown() { messages.scrollTop = messages.scrollHeight; }

  function addMessage(role, text) {
    const empty = $("empty");
    if (empty) empty.hidden = true;
    const wrap = document.createElement("div");
    wrap.className = "msg " + role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "你" : "助手";
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.textContent = text;
    wrap.append(who, bubble);
    messages.append(wrap);
    scrollDown();
    return bubble;
  }

  function showError(bubble, text) {
    bubble.classList.add("error");
    bubble.textContent = (bubble.textContent ? bubble.textContent + "\n" : "") + "⚠ " + text;
  }

  function setBusy(busy) {
    document.body.dataset.busy = busy ? "1" : "";
    send.textContent = busy ? "停止" : "发送";
    send.classList.toggle("stop", busy);
    clearBtn.disabled = busy;
  }

  async function errorText(resp) {
    try { const j = await resp.json(); return j.error || ("HTTP " + resp.status); }
    catch (e) { return "HTTP " + resp.status; }
  }

  async function ask(question) {
    addMessage("user", question);
    const bubble = addMessage("assistant", "");
    bubble.classList.add("streaming");
    controller = new AbortController();
    setBusy(true);
    try {
      const resp = await fetch("/api/chat", {
        method: "POST", credentials: "same-origin", signal: controller.signal,
        headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
        body: JSON.stringify({ message: question, stream: true }),
      });
      if (!resp.ok) { showError(bubble, await errorText(resp)); return; }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            let data;
            try { data = JSON.parse(line.slice(5)); } catch (e) { continue; }
            if (typeof data.delta === "string") { bubble.textContent += data.delta; scrollDown(); }
            if (data.error) showError(bubble, data.error);
            if (data.done) bubble.parentElement.dataset.done = data.finish_reason || "stop";
          }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") showError(bubble, "已停止");
      else showError(bubble, "连接失败：" + e.message);
    } finally {
      bubble.classList.remove("streaming");
      if (!bubble.parentElement.dataset.done) bubble.parentElement.dataset.done = "error";
      controller = null;
      setBusy(false);
      input.focus();
    }
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (controller) { controller.abort(); return; }
    const q = input.value.trim();
    if (!q) return;
    input.value = "";
    autoGrow();
    ask(q);
  });

  input.addEventListener("keydown", (ev) => {
    // Enter sends, Shift+Enter is a new line; never while an IME is composing (Chinese input).
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
      ev.preventDefault();
      if (!controller) form.requestSubmit();
    }
  });

  function autoGrow() {
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight + 2, window.innerHeight * 0.4) + "px";
  }
  input.addEventListener("input", autoGrow);

  clearBtn.addEventListener("click", async () => {
    const resp = await fetch("/api/clear", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: "{}",
    });
    if (resp.ok) {
      for (const m of messages.querySelectorAll(".msg")) m.remove();
      $("empty").hidden = false;
    }
    input.focus();
  });

  async function loadHealth() {
    const info = $("model-info");
    try {
      const h = await (await fetch("/api/health")).json();
      const parts = [h.backend, basename(h.model)];
      parts.push(h.adapter ? "adapter " + basename(h.adapter) : "no adapter");
      if (h.template) parts.push("template " + h.template);
      info.textContent = parts.filter(Boolean).join(" · ");
      if (h.status !== "ok" && h.detail) info.textContent += " · ⚠ " + h.detail;
    } catch (e) { info.textContent = "服务器无响应"; }
  }

  async function loadHistory() {
    try {
      const h = await (await fetch("/api/history", { credentials: "same-origin" })).json();
      for (const m of h.messages || []) {
        const b = addMessage(m.role === "user" ? "user" : "assistant", m.content);
        b.parentElement.dataset.done = "history";
      }
    } catch (e) { /* an empty page is fine */ }
    document.body.dataset.ready = "1";
  }

  loadHealth();
  loadHistory();
  input.focus();
})();
