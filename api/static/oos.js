// Ask before a destructive action: a button with data-confirm submits its form only if the
// user agrees. (An event listener, not an inline onclick: the Content-Security-Policy allows
// no inline script.)
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-confirm]");
  if (button && !button.disabled && !window.confirm(button.dataset.confirm)) {
    event.preventDefault();
  }
});

// Live pages (htmx polls them every 2 s; the charts refresh each minute) can be paused from
// the menu; the choice is kept in this browser (localStorage) until it is switched back.
const LIVE_PAUSED = "oos-live-paused";
window.oosLivePaused = () => localStorage.getItem(LIVE_PAUSED) === "1";

function showLive(button) {
  button.textContent = window.oosLivePaused() ? "Live updates: paused" : "Live updates: on";
  button.setAttribute("aria-pressed", String(window.oosLivePaused()));
}

document.addEventListener("DOMContentLoaded", () => {
  const button = document.getElementById("live-toggle");
  if (!button) return;
  showLive(button);
  button.addEventListener("click", () => {
    localStorage.setItem(LIVE_PAUSED, window.oosLivePaused() ? "0" : "1");
    showLive(button);
  });
});

document.addEventListener("htmx:beforeRequest", (event) => {
  const trigger = event.detail.elt.getAttribute("hx-trigger") || "";
  if (window.oosLivePaused() && trigger.startsWith("every")) {
    event.preventDefault();  // a poll while paused: the page stays as it is
  }
});
