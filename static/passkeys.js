// Passkeys in the browser, with @simplewebauthn/browser (static/vendor, global SimpleWebAuthnBrowser).
// Driven by data attributes, so the templates hold no script (the CSP forbids inline script):
//   [data-needs-webauthn]  shown only where passkeys work;  [data-no-webauthn]  hidden there.
//   <button data-passkey-action="register|authenticate" data-options-url data-verify-url
//           [data-label-input="id of the label input"] [data-trust-input="id of a checkbox"]>
//           (without data-trust-input, a name=trust_device checkbox beside the button is sent)
//   [data-passkey-autofill data-options-url data-verify-url]  sign in from the username field's
//           autofill list (conditional UI) when an input whose autocomplete ends in "webauthn"
//           ("username webauthn", as @simplewebauthn/browser requires) is on the page.
//   [data-passkey-error role="alert" hidden]  where a refusal is shown: the nearest one.
// Every POST sends JSON with the CSRF token in X-CSRF-Token. The server answers {"redirect": url},
// {"post": url} or {"error": message}; the options URL answers with the options themselves
// (or one of those three).
(function () {
  "use strict";

  var lib = window.SimpleWebAuthnBrowser;
  var CANCELLED = "The passkey was not used. You can try again or choose another way.";
  var EXISTS = "This device already has a passkey for your account. There is no need to add it again.";
  var FAILED = "Passkeys did not work this time. You can try again or choose another way.";
  var TOO_MANY = "Too many attempts. Please wait a minute and try again.";
  var autofillPending = false;  // a conditional-UI request is waiting in the username field
  var ceremonyRunning = false;  // a button's ceremony: nothing may start over it

  // The first match inside el's closest ancestor that has one, else the page's first.
  function nearest(el, selector) {
    for (var node = el; node && node.querySelector; node = node.parentElement) {
      var found = node.querySelector(selector);
      if (found) return found;
    }
    return document.querySelector(selector);
  }

  function csrfToken(el) {
    var form = el.closest("form");
    var input = (form && form.querySelector("input[name=csrf_token]")) || nearest(el, "input[name=csrf_token]");
    if (input) return input.value;
    try {  // the token htmx sends (base.html puts it on <body hx-headers>)
      return JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRF-Token"] || "";
    } catch (e) {
      return "";
    }
  }

  async function postJSON(url, body, el) {
    var response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrfToken(el) },
      body: JSON.stringify(body)
    });
    try {
      return await response.json();
    } catch (e) {  // an error page, not an answer of ours
      return { error: response.status === 429 ? TOO_MANY : FAILED };
    }
  }

  function showError(el, message) {
    var box = nearest(el, "[data-passkey-error]");
    if (!box) return;
    box.textContent = "";
    box.hidden = false;
    // Set after a tick, so that the same message again is spoken again.
    window.setTimeout(function () { box.textContent = message; }, 50);
  }

  function clearError(el) {
    var box = nearest(el, "[data-passkey-error]");
    if (box) { box.textContent = ""; box.hidden = true; }
  }

  function postForm(url, el) {
    var form = document.createElement("form");
    form.method = "post";
    form.action = url;
    form.hidden = true;
    var input = document.createElement("input");
    input.type = "hidden";
    input.name = "csrf_token";
    input.value = csrfToken(el);
    form.appendChild(input);
    document.body.appendChild(form);
    form.submit();
  }

  function isAnswer(reply) {
    return Boolean(reply && (reply.redirect || reply.post || reply.error));
  }

  // What the server said. True: the page is going away.
  function follow(reply, el) {
    if (reply && reply.redirect) { window.location.assign(reply.redirect); return true; }
    if (reply && reply.post) { postForm(reply.post, el); return true; }
    showError(el, (reply && reply.error) || FAILED);
    return false;
  }

  function browserMessage(error) {
    var name = error && error.name;
    if (name === "NotAllowedError") return CANCELLED;  // cancelled, timed out, or no passkey chosen
    if (name === "InvalidStateError") return EXISTS;  // an excluded credential: registered already
    return FAILED;
  }

  function extras(button, action) {
    var body = {};
    var labelId = button.getAttribute("data-label-input");
    var label = labelId ? document.getElementById(labelId) : null;
    if (action === "register") body.label = label ? label.value : "";
    var trustId = button.getAttribute("data-trust-input");
    var trust = trustId ? document.getElementById(trustId)
      : (button.parentElement && button.parentElement.querySelector("input[type=checkbox][name=trust_device]"));
    if (trust) body.trust_device = trust.checked;
    return body;
  }

  async function ceremony(button, action) {
    var more = extras(button, action);
    var options = await postJSON(button.getAttribute("data-options-url"),
      action === "register" ? { label: more.label } : {}, button);
    if (isAnswer(options)) return follow(options, button);
    var optionsJSON = options.options || options;
    var credential;
    try {
      credential = action === "register"
        ? await lib.startRegistration({ optionsJSON: optionsJSON })
        : await lib.startAuthentication({ optionsJSON: optionsJSON });
    } catch (error) {
      if (error && error.name === "AbortError") return false;  // a newer ceremony took over
      showError(button, browserMessage(error));
      return false;
    }
    more.response = credential;
    return follow(await postJSON(button.getAttribute("data-verify-url"), more, button), button);
  }

  async function onClick(event) {
    var button = event.target.closest ? event.target.closest("[data-passkey-action]") : null;
    if (!button || !lib) return;
    event.preventDefault();
    if (button.disabled || ceremonyRunning) return;
    var action = button.getAttribute("data-passkey-action") === "register" ? "register" : "authenticate";
    if (autofillPending) lib.WebAuthnAbortService.cancelCeremony();  // the visible button wins over autofill
    clearError(button);
    ceremonyRunning = true;
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    var leaving = false;
    try {
      leaving = await ceremony(button, action);
    } catch (error) {  // the network, mostly
      showError(button, FAILED);
    } finally {
      ceremonyRunning = false;
      button.removeAttribute("aria-busy");
      if (!leaving) button.disabled = false;  // the page is going away: no second ceremony meanwhile
    }
  }

  // Conditional UI: the passkeys show in the username field's autofill list. Once per element:
  // an htmx swap that brings a new sign-in form (a wrong password) offers them again.
  async function startAutofill() {
    var el = document.querySelector("[data-passkey-autofill]");
    if (!el || el.getAttribute("data-autofill-started") || autofillPending || ceremonyRunning) return;
    if (!document.querySelector('input[autocomplete$="webauthn"]')) return;
    el.setAttribute("data-autofill-started", "1");
    try {
      if (!(await lib.browserSupportsWebAuthnAutofill())) return;
      var options = await postJSON(el.getAttribute("data-options-url"), {}, el);
      if (isAnswer(options)) { console.debug("passkey autofill: no options", options); return; }
      autofillPending = true;
      var credential;
      try {
        credential = await lib.startAuthentication({
          optionsJSON: options.options || options, useBrowserAutofill: true
        });
      } finally {
        autofillPending = false;
      }
      follow(await postJSON(el.getAttribute("data-verify-url"), { response: credential }, el), el);
    } catch (error) {
      console.debug("passkey autofill did not complete", error);
    }
  }

  function setup() {
    if (!lib || !lib.browserSupportsWebAuthn()) return;
    document.querySelectorAll("[data-needs-webauthn]").forEach(function (el) { el.hidden = false; });
    document.querySelectorAll("[data-no-webauthn]").forEach(function (el) { el.hidden = true; });
    startAutofill();
  }

  document.addEventListener("click", onClick);
  document.addEventListener("htmx:afterSettle", setup);
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", setup);
  else setup();
})();
