// stepsource web UI: live regions over server-sent events, the version scrubber, confirmations.
// Every piece of HTML inserted here was rendered (and escaped) by the server.
"use strict";

function follow() {
  const live = document.body.dataset.live;
  const fragment = document.body.dataset.fragment;
  const region = document.getElementById("live");
  if (!live || !fragment || !region || !window.EventSource) return;
  const source = new EventSource(live);
  let busy = false;
  source.addEventListener("change", async () => {
    if (busy) return;
    busy = true;
    try {
      const response = await fetch(fragment, { headers: { "accept": "text/html" } });
      if (response.ok) {
        region.innerHTML = await response.text();
        region.dataset.updated = String(Date.now());
      }
    } finally {
      busy = false;
    }
  });
  window.addEventListener("beforeunload", () => source.close());
}

function scrubber() {
  const slider = document.getElementById("scrubber");
  const panel = document.getElementById("panel");
  const label = document.getElementById("scrub-label");
  if (!slider || !panel) return;
  let wanted = null;
  let loading = false;
  async function load(version) {
    wanted = version;
    if (loading) return;
    loading = true;
    try {
      while (wanted !== null) {
        const v = wanted;
        wanted = null;
        const response = await fetch(`${slider.dataset.url}?v=${v}&fragment=1`);
        if (response.ok) {
          panel.innerHTML = await response.text();
          history.replaceState(null, "", `${slider.dataset.url}?v=${v}`);
        }
      }
    } finally {
      loading = false;
    }
  }
  function show() {
    label.textContent = `${slider.value} / ${slider.max}`;
  }
  slider.addEventListener("input", show);
  slider.addEventListener("change", () => load(slider.value));
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target !== slider && target instanceof HTMLElement && target.matches("input, textarea, select")) return;
    if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
    event.preventDefault();
    const step = event.key === "ArrowRight" ? 1 : -1;
    const next = Math.min(Number(slider.max), Math.max(Number(slider.min), Number(slider.value) + step));
    if (String(next) === slider.value) return;
    slider.value = String(next);
    show();
    load(slider.value);
  });
}

function confirmations() {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
}

follow();
scrubber();
confirmations();
