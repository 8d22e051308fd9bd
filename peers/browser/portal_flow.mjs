// Drive Debian's chromium (headless) through a sequence of steps on the school portal, as a person would: open
// pages, fill in and send forms, follow redirects, and at chosen points run axe-core's WCAG 2.x A/AA rules and
// take screenshots. Prints one JSON document on stdout: {"results": [one record per step]}.
//
//   node portal_flow.mjs --steps <steps.json> [--chromium /usr/bin/chromium] [--timeout ms]
//
// steps.json: {"viewport": "desktop" | "phone", "steps": [step, ...]}; each step is one of
//   {"goto": URL}                       open URL; record {url, status, title, text}
//   {"fill": {SELECTOR: VALUE, ...}}    type into form fields
//   {"select": {SELECTOR: VALUE, ...}}  choose an option in a <select>
//   {"pause": NAME, "dir": DIR}         write DIR/NAME.paused, then wait (up to --timeout) for DIR/NAME.go: the test
//                                       changes something on the server side while this browser waits
//   {"click": SELECTOR}                 click (a link or a submit button) and wait for the page that follows;
//                                       record {url, status, title, text}
//   {"wait_url": REGEX}                 wait until the address matches (e.g. after a meta refresh)
//   {"check": LABEL, "screenshot": PNG, "print": bool}   axe-core violations, text, a full-page screenshot (and
//                                       one in print media); record {url, title, lang, text, violations,
//                                       csp_violations (what the page's Content-Security-Policy blocked so far)}
//   {"fetch": URL}                      a GET with the page's cookies (downloads); record {status, headers, body}
//   {"cookies": true}                   record the cookies: name, httpOnly, secure, sameSite (never values)
//
// Only loopback hosts load (every other request is aborted and listed in requests_blocked), as check_page.mjs.
// Exit codes: 0 every step ran; 1 a step failed (stdout still holds the records so far, with "error");
// 2 usage.

import { createRequire } from "node:module";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { chromium } from "playwright-core";

const require = createRequire(import.meta.url);
const AXE_SOURCE = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
const VIEWPORTS = {
  desktop: { width: 1280, height: 900, isMobile: false, deviceScaleFactor: 1 },
  phone: { width: 390, height: 844, isMobile: true, deviceScaleFactor: 2 },
};
const WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"];
const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]", "::1"]);
let timeoutMs = 30000;
const cspViolations = [];

function usage(msg) {
  process.stderr.write(`${msg}\nusage: node portal_flow.mjs --steps STEPS.json [--chromium PATH] [--timeout MS]\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = { chromium: "/usr/bin/chromium", timeout: 30000 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--steps") args.steps = next();
    else if (a === "--chromium") args.chromium = next();
    else if (a === "--timeout") args.timeout = Number(next());
    else usage(`unknown argument ${a}`);
  }
  if (!args.steps) usage("--steps is required");
  return args;
}

function allowed(url) {
  let u;
  try {
    u = new URL(url);
  } catch {
    return false;
  }
  if (u.protocol === "data:" || u.protocol === "about:" || u.protocol === "mailto:") return true;
  if (u.protocol === "http:" || u.protocol === "https:" || u.protocol === "ws:") return LOOPBACK.has(u.hostname);
  return false;
}

async function pageRecord(page, response) {
  // A page that moves on by itself (a meta refresh) can be gone before it is read: then read the next one.
  for (let attempt = 0; ; attempt++) {
    try {
      return {
        url: page.url(),
        status: response && response.url() === page.url() ? response.status() : null,
        title: await page.title(),
        text: await page.evaluate(() => document.body ? document.body.innerText : ""),
      };
    } catch (err) {
      if (attempt >= 5 || !/context was destroyed|navigat/i.test(String(err))) throw err;
      await page.waitForLoadState("load");
    }
  }
}

async function run(page, context, step, blocked) {
  if (step.goto !== undefined) {
    const resp = await page.goto(step.goto, { waitUntil: "load" });
    return pageRecord(page, resp);
  }
  if (step.fill !== undefined) {
    for (const [selector, value] of Object.entries(step.fill)) await page.fill(selector, String(value));
    return { filled: Object.keys(step.fill) };
  }
  if (step.select !== undefined) {
    for (const [selector, value] of Object.entries(step.select)) await page.selectOption(selector, String(value));
    return { selected: Object.keys(step.select) };
  }
  if (step.pause !== undefined) {
    const base = resolve(step.dir, step.pause);
    writeFileSync(`${base}.paused`, "");
    const until = Date.now() + timeoutMs;
    while (!existsSync(`${base}.go`)) {
      if (Date.now() > until) throw new Error(`pause ${step.pause}: nobody said go`);
      await new Promise((r) => setTimeout(r, 50));
    }
    return { paused: step.pause };
  }
  if (step.click !== undefined) {
    const [resp] = await Promise.all([
      page.waitForNavigation({ waitUntil: "load" }).catch(() => null),
      page.click(step.click),
    ]);
    return pageRecord(page, resp);
  }
  if (step.wait_url !== undefined) {
    await page.waitForURL(new RegExp(step.wait_url), { waitUntil: "load" });
    return pageRecord(page, null);
  }
  if (step.check !== undefined) {
    // Through the DevTools protocol, not a <script>: the portal's Content-Security-Policy forbids inline script
    // (and the page keeps it: what the CSP blocks of the page's own is recorded in csp_violations).
    await page.evaluate(AXE_SOURCE);
    const axe = await page.evaluate(async (tags) => {
      // eslint-disable-next-line no-undef
      const r = await window.axe.run(document, { runOnly: { type: "tag", values: tags }, resultTypes: ["violations"] });
      return r.violations.map((v) => ({
        id: v.id, impact: v.impact, help: v.help,
        nodes: v.nodes.map((n) => ({ target: n.target, html: n.html.slice(0, 300), summary: n.failureSummary })),
      }));
    }, WCAG_TAGS);
    const rec = {
      label: step.check,
      ...(await pageRecord(page, null)),
      lang: await page.evaluate(() => document.documentElement.lang),
      violations: axe,
      csp_violations: [...cspViolations],
      requests_blocked: [...blocked],
    };
    if (step.screenshot) {
      mkdirSync(dirname(resolve(step.screenshot)), { recursive: true });
      await page.screenshot({ path: step.screenshot, fullPage: true });
      rec.screenshot = resolve(step.screenshot);
      if (step.print) {
        await page.emulateMedia({ media: "print" });
        rec.print_screenshot = resolve(step.screenshot).replace(/\.png$/i, "") + "-print.png";
        await page.screenshot({ path: rec.print_screenshot, fullPage: true });
        rec.print_text = await page.evaluate(() => document.body.innerText);
        await page.emulateMedia({ media: "screen" });
      }
    }
    return rec;
  }
  if (step.fetch !== undefined) {
    const resp = await page.request.get(step.fetch, { maxRedirects: 0 });
    const body = await resp.body();
    return { url: step.fetch, status: resp.status(), headers: resp.headers(), body: body.toString("utf8").slice(0, 20000),
      bytes: body.length };
  }
  if (step.cookies !== undefined) {
    const cookies = await context.cookies();
    return { cookies: cookies.map((c) => ({ name: c.name, httpOnly: c.httpOnly, secure: c.secure, sameSite: c.sameSite,
      path: c.path, domain: c.domain })) };
  }
  throw new Error(`unknown step ${JSON.stringify(Object.keys(step))}`);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  timeoutMs = args.timeout;
  const spec = JSON.parse(readFileSync(args.steps, "utf8"));
  const vp = VIEWPORTS[spec.viewport ?? "desktop"];
  if (!vp) usage(`viewport must be one of ${Object.keys(VIEWPORTS).join(", ")}`);
  for (const step of spec.steps ?? []) {
    for (const key of ["goto", "fetch"]) {
      if (step[key] !== undefined && !allowed(step[key])) usage(`refusing ${step[key]}: loopback addresses only`);
    }
  }
  const browser = await chromium.launch({
    executablePath: args.chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
      "--disable-default-apps", "--disable-sync", "--no-first-run", "--disable-features=Translate"],
  });
  const results = [];
  const blocked = [];
  let failed = null;
  try {
    const context = await browser.newContext({
      viewport: { width: vp.width, height: vp.height }, isMobile: vp.isMobile, hasTouch: vp.isMobile,
      deviceScaleFactor: vp.deviceScaleFactor, locale: "en-GB", timezoneId: "Europe/London",
      serviceWorkers: "block", acceptDownloads: false, ignoreHTTPSErrors: Boolean(spec.ignore_https_errors),
    });
    await context.route("**/*", (route) => {
      const u = route.request().url();
      if (allowed(u)) return route.continue();
      blocked.push(u);
      return route.abort("blockedbyclient");
    });
    const page = await context.newPage();
    page.on("console", (msg) => {
      if (/Content Security Policy/i.test(msg.text())) cspViolations.push(msg.text().slice(0, 300));
    });
    page.setDefaultTimeout(args.timeout);
    page.setDefaultNavigationTimeout(args.timeout);
    for (const [i, step] of (spec.steps ?? []).entries()) {
      try {
        results.push({ step: i, ...(await run(page, context, step, blocked)) });
      } catch (err) {
        failed = { step: i, error: String(err && err.message ? err.message : err), url: page.url() };
        break;
      }
    }
    await context.close();
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify({ results, requests_blocked: blocked, ...(failed ? { failed } : {}) }) + "\n");
  if (failed) {
    process.stderr.write(`portal_flow: step ${failed.step} failed: ${failed.error}\n`);
    process.exit(1);
  }
}

main().catch((err) => {
  process.stderr.write(`portal_flow: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
