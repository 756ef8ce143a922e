// keygate portal: copy buttons, the live view (Server-Sent Events) and the shared list's refresh.
"use strict";

document.addEventListener("click", (event) => {
  const button = event.target.closest("button.copy");
  if (!button) return;
  const text = document.getElementById(button.dataset.copy).textContent;
  const done = () => { const label = button.textContent; button.textContent = "Copied"; setTimeout(() => { button.textContent = label; }, 1500); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
  } else {
    fallbackCopy(text, done);
  }
});

function fallbackCopy(text, done) {
  const area = document.createElement("textarea");
  area.value = text;
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
  done();
}

for (const box of document.querySelectorAll("[data-live]")) {
  const state = box.querySelector(".live-state");
  const list = box.querySelector(".readings");
  const source = new EventSource(box.dataset.live);
  source.addEventListener("ready", () => { state.textContent = "Connected: readings appear here as they arrive."; });
  source.addEventListener("reading", (event) => {
    const reading = JSON.parse(event.data);
    const item = document.createElement("li");
    item.textContent = `${reading.at}: ${reading.payload}`;
    list.prepend(item);
    while (list.children.length > 50) list.lastElementChild.remove();
  });
  source.addEventListener("ended", (event) => { state.textContent = JSON.parse(event.data); source.close(); });
  source.onerror = () => { state.textContent = "Reconnecting…"; };
}

const shared = document.querySelector("[data-refresh]");
if (shared) {
  setInterval(async () => {
    try {
      const answer = await fetch(shared.dataset.refresh, { credentials: "same-origin" });
      if (answer.ok) shared.innerHTML = await answer.text();
    } catch (e) { /* offline for a moment: try again at the next tick */ }
  }, 2000);
}
