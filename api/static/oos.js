// Ask before a destructive action: a button with data-confirm submits its form only if the
// user agrees. (An event listener, not an inline onclick: the Content-Security-Policy allows
// no inline script.)
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-confirm]");
  if (button && !button.disabled && !window.confirm(button.dataset.confirm)) {
    event.preventDefault();
  }
});
