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

  // A password's show/hide button: a real button that says whether it is pressed.
  function wireReveal(button) {
    if (button.getAttribute("data-wired")) return;
    button.setAttribute("data-wired", "1");
    var input = document.getElementById(button.getAttribute("data-reveal"));
    if (!input) return;
    button.hidden = false;
    button.addEventListener("click", function () {
      var shown = input.type === "password";
      input.type = shown ? "text" : "password";
      button.setAttribute("aria-pressed", shown ? "true" : "false");
      button.firstChild.textContent = shown ? "Hide" : "Show";
    });
  }

  // Moments the server wrote in words ("just now", "for 15 more minutes") become this
  // customer's own clock time ("at 10:42", "until 10:57"); no UTC to convert in one's head.
  function localTime(el) {
    if (el.getAttribute("data-localised")) return;
    var when = new Date(el.getAttribute("datetime"));
    if (isNaN(when.getTime())) return;
    el.setAttribute("data-localised", "1");
    var clock = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    var sameDay = when.toDateString() === new Date().toDateString();
    var day = when.toLocaleDateString([], { day: "numeric", month: "short", year: sameDay ? undefined : "numeric" });
    var kind = el.getAttribute("data-local");
    var text = kind === "until" ? "until " + clock : "at " + clock;
    if (!sameDay) text = (kind === "until" ? "until " : "on ") + day + ", " + clock;
    else if (kind === "on") text = "today at " + clock;
    el.setAttribute("title", when.toLocaleString());
    el.textContent = text;
  }

  // "Print" beside the backup codes; "Are you sure?" before removing a way to sign in.
  function wirePrint(button) {
    if (button.getAttribute("data-wired")) return;
    button.setAttribute("data-wired", "1");
    button.hidden = false;
    button.addEventListener("click", function () { window.print(); });
  }

  function wireConfirm(form) {
    if (form.getAttribute("data-wired")) return;
    form.setAttribute("data-wired", "1");
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
    });
  }

  function enhance(root) {
    root.querySelectorAll("[data-print]").forEach(wirePrint);
    root.querySelectorAll("form[data-confirm]").forEach(wireConfirm);
    root.querySelectorAll("[data-countdown]").forEach(startCountdown);
    root.querySelectorAll("[data-code-input]").forEach(wireCodeInput);
    root.querySelectorAll("[data-reveal]").forEach(wireReveal);
    root.querySelectorAll("time[data-local]").forEach(localTime);
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
