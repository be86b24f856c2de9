// keyward console: the only script. Progressive: every page works without it.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // Copy buttons: data-copy names the input whose value to copy.
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const input = document.getElementById(button.dataset.copy);
      if (!input) return;
      input.select();
      try {
        await navigator.clipboard.writeText(input.value);
      } catch {
        document.execCommand("copy");
      }
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy"; }, 2000);
    });
  }
  // "Select all" checkboxes: data-select-all names the checkboxes they toggle.
  for (const all of document.querySelectorAll("input[data-select-all]")) {
    all.addEventListener("change", () => {
      const boxes = all.form.querySelectorAll(`input[type=checkbox][name="${all.dataset.selectAll}"]:not(:disabled)`);
      for (const box of boxes) box.checked = all.checked;
    });
  }
});

// A key is shown once. Chromium keeps even no-store pages in its back/forward cache, so Back
// would bring the key back: forget it when leaving, and reload (finding it gone) if restored.
window.addEventListener("pagehide", () => {
  const secret = document.getElementById("secret");
  if (secret) { secret.value = ""; secret.removeAttribute("value"); }
});
window.addEventListener("pageshow", (event) => {
  if (event.persisted && document.getElementById("secret")) location.reload();
});
