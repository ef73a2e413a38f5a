// Progressive enhancement for the sign-in steps. Everything works without this file;
// with it: the resend countdown ticks, the code submits on the sixth digit, focus lands
// where it should after each swap, and a polite live region speaks only when it matters.
(function () {
  "use strict";

  function announce(text) {
    var region = document.getElementById("announcer");
    if (!region || !text) return;
    region.textContent = "";
    window.setTimeout(function () { region.textContent = text; }, 50);
  }

  function startCountdown(timer) {
    var seconds = parseInt(timer.getAttribute("data-countdown") || "0", 10);
    if (!seconds || timer.getAttribute("data-started")) return;
    timer.setAttribute("data-started", "1");
    var deadline = Date.now() + seconds * 1000;
    var button = document.getElementById("resend");
    var label = timer.querySelector("[data-seconds]");
    var tick = window.setInterval(function () {
      if (!document.body.contains(timer)) { window.clearInterval(tick); return; }
      var left = Math.max(0, Math.ceil((deadline - Date.now()) / 1000));
      if (label) label.textContent = String(left);
      if (left === 0) {
        window.clearInterval(tick);
        timer.textContent = "You can ask for a new code now.";
        if (button) button.disabled = false;
        announce("You can ask for a new code now.");
      }
    }, 250);
  }

  function wireCodeInput(input) {
    if (input.getAttribute("data-wired")) return;
    input.setAttribute("data-wired", "1");
    input.addEventListener("input", function () {
      var digits = input.value.replace(/[^0-9]/g, "");
      if (digits !== input.value && digits.length <= 6) input.value = digits;
      var form = input.form;
      if (digits.length === 6 && form && !form.getAttribute("data-sent")) {
        form.setAttribute("data-sent", "1");
        input.value = digits;
        if (form.requestSubmit) form.requestSubmit(); else form.submit();
      }
    });
  }

  function enhance(root) {
    root.querySelectorAll("[data-countdown]").forEach(startCountdown);
    root.querySelectorAll("[data-code-input]").forEach(wireCodeInput);
  }

  function placeFocus(root) {
    var target = root.querySelector("[aria-invalid='true']") || root.querySelector("[data-focus]") ||
      root.querySelector("[autofocus]") || root.querySelector("h1");
    if (target) {
      if (!target.hasAttribute("tabindex") && !/^(INPUT|BUTTON|A|SELECT|TEXTAREA)$/.test(target.tagName)) {
        target.setAttribute("tabindex", "-1");
      }
      target.focus({ preventScroll: false });
    }
  }

  document.addEventListener("DOMContentLoaded", function () { enhance(document); });
  document.body && enhance(document);

  document.addEventListener("htmx:afterSettle", function (event) {
    var root = event.detail.target || document;
    enhance(root);
    if (root.id === "main") {
      placeFocus(root);
      var step = root.querySelector("[data-announce]");
      if (step) announce(step.getAttribute("data-announce"));
    }
  });

  // A form sent again after an error may auto-submit again.
  document.addEventListener("htmx:afterRequest", function (event) {
    var form = event.detail.elt;
    if (form && form.removeAttribute) form.removeAttribute("data-sent");
  });
})();
