"""Checks every journey can call: browser problems (CSP violations, uncaught errors),
mobile layout (no sideways scroll, 44 px touch targets) and axe-core accessibility."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import BrowserContext, ConsoleMessage, Page, WebError

AXE_JS = Path(__file__).resolve().parent / "vendor" / "axe.min.js"
MIN_TARGET = 44  # CSS px, WCAG 2.5.5 and the app's own rule (static/app.css)


# --- CSP violations and uncaught errors ---------------------------------------------------


def is_csp_violation(text: str) -> bool:
    # Chromium words these "Refused to load/apply/execute ..." or "Executing inline script
    # violates the following Content Security Policy directive ...".
    return "Content Security Policy" in text or "Content-Security-Policy" in text or text.startswith("Refused to ")


@dataclass
class BrowserProblems:
    """Collects, from every context it watches, what a browser says went wrong."""

    csp_violations: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    console_errors: list[tuple[str, str]] = field(default_factory=list)  # (text, url)

    def watch(self, context: BrowserContext) -> None:
        context.on("console", self._on_console)
        context.on("weberror", self._on_web_error)

    def _on_console(self, message: ConsoleMessage) -> None:
        if is_csp_violation(message.text):
            self.csp_violations.append(message.text)
        if message.type == "error":
            self.console_errors.append((message.text, str(message.location.get("url", ""))))

    def _on_web_error(self, error: WebError) -> None:
        self.page_errors.append(str(error.error))

    def serious(self) -> list[str]:
        return [f"CSP violation: {t}" for t in self.csp_violations] + [f"page error: {t}" for t in self.page_errors]

    def forget(self) -> None:
        self.csp_violations.clear()
        self.page_errors.clear()
        self.console_errors.clear()


# --- mobile layout ------------------------------------------------------------------------

_MEASURE = """
() => {
  const main = document.querySelector("main");
  const found = [];
  for (const el of main.querySelectorAll("a[href], button, input:not([type=hidden]), select, textarea")) {
    const box = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    if ((box.width === 0 && box.height === 0) || style.visibility === "hidden") continue;
    // A link inside a sentence (its paragraph has text of its own) is "running text".
    const block = el.tagName === "A" ? el.closest("p, li, dd") : null;
    const own = block ? block.textContent.replace(el.textContent, "").trim() : "";
    found.push({
      what: `${el.tagName.toLowerCase()} "${(el.innerText || el.value || el.labels?.[0]?.innerText || el.name || "").trim().slice(0, 40)}"`,
      width: Math.round(box.width * 10) / 10,
      height: Math.round(box.height * 10) / 10,
      inRunningText: own.length > 0,
    });
  }
  return {
    scrollWidth: document.documentElement.scrollWidth,
    innerWidth: window.innerWidth,
    targets: found,
  };
}
"""


@dataclass
class Layout:
    scroll_width: int
    inner_width: int
    too_small: list[str]
    exempt: list[str]  # links in running text below the size (WCAG 2.5.5 allows them)


def measure_layout(page: Page) -> Layout:
    raw: dict[str, Any] = page.evaluate(_MEASURE)
    too_small: list[str] = []
    exempt: list[str] = []
    for t in raw["targets"]:
        if t["height"] >= MIN_TARGET and t["width"] >= MIN_TARGET:
            continue
        line = f"{t['what']} is {t['width']}x{t['height']} px"
        (exempt if t["inRunningText"] else too_small).append(line)
    return Layout(raw["scrollWidth"], raw["innerWidth"], too_small, exempt)


def assert_mobile_friendly(page: Page, where: str, exemptions: list[str] | None = None) -> None:
    """No horizontal scroll, and every visible control in <main> at least 44x44 px."""
    layout = measure_layout(page)
    assert layout.scroll_width <= layout.inner_width, (
        f"{where}: scrolls sideways (scrollWidth {layout.scroll_width} > innerWidth {layout.inner_width})")
    assert not layout.too_small, f"{where}: touch targets under {MIN_TARGET} px: {layout.too_small}"
    if exemptions is not None:
        exemptions.extend(f"{where}: {e}" for e in layout.exempt)


# --- accessibility (axe-core) -------------------------------------------------------------


def axe_violations(page: Page, impacts: tuple[str, ...] = ("serious", "critical")) -> list[dict[str, Any]]:
    """axe-core's violations of the given impacts for the page as it is now.

    Needs a context with bypass_csp=True: add_script_tag inlines the file, which the app's
    CSP (rightly) refuses.
    """
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.add_script_tag(path=AXE_JS)
    result: dict[str, Any] = page.evaluate("async () => await window.axe.run(document, {resultTypes: ['violations']})")
    return [v for v in result["violations"] if v.get("impact") in impacts]


def describe_violations(violations: list[dict[str, Any]]) -> str:
    lines = []
    for v in violations:
        lines.append(f"[{v['impact']}] {v['id']}: {v['help']} ({v['helpUrl']})")
        lines.extend(f"    {' '.join(map(str, node['target']))}: {node.get('failureSummary', '').strip()}" for node in v["nodes"][:5])
    return "\n".join(lines)


def assert_accessible(page: Page, state: str) -> None:
    violations = axe_violations(page)
    assert not violations, f"axe: serious or critical violations on {state}:\n{describe_violations(violations)}"
