// The operator page's only script: the chat box (streamed from /v1/chat/completions) and a refresh of the status
// panel. Same origin only; the browser repeats the page's Basic credentials, so no key is ever held here.
"use strict";

const $ = (id) => document.getElementById(id);
const turns = [];  // this browser's conversation: {role, content}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("conversation").appendChild(div);
  return div;
}

// Server-sent events: "data: {json}" blocks separated by a blank line, ending with "data: [DONE]".
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  $("chat-send").disabled = true;
  $("chat-status").textContent = "waiting for the model…";
  bubble("user", text);
  turns.push({ role: "user", content: text });
  const answer = bubble("assistant", "");
  const body = { messages: turns, stream: true, max_tokens: Number($("chat-max-tokens").value) || 256 };
  if ($("chat-model").value) body.model = $("chat-model").value;
  try {
    const response = await fetch(new URL("/v1/chat/completions", location.origin), {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || response.status + " " + response.statusText);
    }
    $("chat-status").textContent = "streaming…";
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) answer.textContent += delta.content;
    }
    turns.push({ role: "assistant", content: answer.textContent });
    $("chat-status").textContent = "done";
  } catch (error) {
    turns.pop();
    answer.className = "msg error";
    answer.textContent = String(error.message || error);
    $("chat-status").textContent = "";
  } finally {
    $("chat-send").disabled = false;
  }
}

async function refresh() {
  const panel = $("panel");
  try {
    const response = await fetch(new URL(panel.dataset.refresh, location.origin), { credentials: "same-origin" });
    if (response.ok) panel.innerHTML = await response.text();
  } catch (error) {
    // the device may be restarting; the next refresh tries again
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("chat").addEventListener("submit", send);
  $("chat-clear").addEventListener("click", () => { turns.length = 0; $("conversation").textContent = ""; });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("chat").requestSubmit();
  });
  setInterval(refresh, 15000);
});
