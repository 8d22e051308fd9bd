// Open one page in Debian's chromium (headless), run axe-core's WCAG 2.x A/AA rules on it, take a screenshot,
// and print one JSON document on stdout:
//   {title, text, lang, violations: [{id, impact, help, nodes: [target...]}], requests_blocked: [...],
//    screenshot, viewport, print?: {text, screenshot}}
//
//   node check_page.mjs --url <file path | file:// | http://127.0.0.1:...> --viewport desktop|phone
//                       --screenshot <png path> [--print] [--chromium /usr/bin/chromium] [--timeout ms]
//
// Only file: URLs and loopback hosts load: every other request is aborted and listed in requests_blocked,
// so a page that reaches out (fonts, CDNs, analytics) is caught, and no test ever leaves the machine.
// Exit codes: 0 the page was checked (violations are data, not a failure); 2 usage; 1 the page could not be
// opened or checked (message on stderr).

import { createRequire } from "node:module";
import { readFileSync, mkdirSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { chromium } from "playwright-core";

const require = createRequire(import.meta.url);
const AXE_SOURCE = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
const VIEWPORTS = {
  desktop: { width: 1280, height: 900, isMobile: false, deviceScaleFactor: 1 },
  phone: { width: 390, height: 844, isMobile: true, deviceScaleFactor: 2 },
};
const WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"];
const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]", "::1"]);

function usage(msg) {
  process.stderr.write(`${msg}\nusage: node check_page.mjs --url URL|PATH --viewport desktop|phone ` +
    `--screenshot PNG [--print] [--chromium PATH] [--timeout MS]\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = { viewport: "desktop", chromium: "/usr/bin/chromium", timeout: 30000, print: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--url") args.url = next();
    else if (a === "--viewport") args.viewport = next();
    else if (a === "--screenshot") args.screenshot = next();
    else if (a === "--chromium") args.chromium = next();
    else if (a === "--timeout") args.timeout = Number(next());
    else if (a === "--print") args.print = true;
    else usage(`unknown argument ${a}`);
  }
  if (!args.url) usage("--url is required");
  if (!args.screenshot) usage("--screenshot is required");
  if (!(args.viewport in VIEWPORTS)) usage(`--viewport must be one of ${Object.keys(VIEWPORTS).join(", ")}`);
  return args;
}

function toUrl(target) {
  if (/^(file|https?):/i.test(target)) return target;
  return pathToFileURL(resolve(target)).href;
}

function allowed(url) {
  let u;
  try {
    u = new URL(url);
  } catch {
    return false;
  }
  if (u.protocol === "file:" || u.protocol === "data:" || u.protocol === "about:") return true;
  if (u.protocol === "http:" || u.protocol === "https:" || u.protocol === "ws:") return LOOPBACK.has(u.hostname);
  return false;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const url = toUrl(args.url);
  if (!allowed(url)) usage(`refusing to open ${url}: only local files and loopback addresses`);
  const browser = await chromium.launch({
    executablePath: args.chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
      "--disable-default-apps", "--disable-sync", "--no-first-run", "--disable-features=Translate"],
  });
  const blocked = [];
  try {
    const vp = VIEWPORTS[args.viewport];
    const context = await browser.newContext({
      viewport: { width: vp.width, height: vp.height },
      isMobile: vp.isMobile,
      hasTouch: vp.isMobile,
      deviceScaleFactor: vp.deviceScaleFactor,
      locale: "en-GB",
      timezoneId: "Europe/London",
      serviceWorkers: "block",
    });
    await context.route("**/*", (route) => {
      const u = route.request().url();
      if (allowed(u)) return route.continue();
      blocked.push(u);
      return route.abort("blockedbyclient");
    });
    const page = await context.newPage();
    page.setDefaultTimeout(args.timeout);
    const resp = await page.goto(url, { waitUntil: "load", timeout: args.timeout });
    if (resp && !resp.ok() && !url.startsWith("file:")) throw new Error(`${url} answered HTTP ${resp.status()}`);

    await page.addScriptTag({ content: AXE_SOURCE });
    const axe = await page.evaluate(async (tags) => {
      // eslint-disable-next-line no-undef
      const r = await window.axe.run(document, { runOnly: { type: "tag", values: tags }, resultTypes: ["violations"] });
      return r.violations.map((v) => ({
        id: v.id, impact: v.impact, help: v.help, helpUrl: v.helpUrl,
        nodes: v.nodes.map((n) => ({ target: n.target, html: n.html.slice(0, 300), summary: n.failureSummary })),
      }));
    }, WCAG_TAGS);

    mkdirSync(dirname(resolve(args.screenshot)), { recursive: true });
    await page.screenshot({ path: args.screenshot, fullPage: true });
    const doc = {
      url,
      viewport: args.viewport,
      title: await page.title(),
      lang: await page.evaluate(() => document.documentElement.lang),
      text: await page.evaluate(() => document.body.innerText),
      violations: axe.map((v) => ({ ...v, nodes: v.nodes.map((n) => n.target) })),
      violation_details: axe,
      requests_blocked: blocked,
      screenshot: resolve(args.screenshot),
    };
    if (args.print) {
      await page.emulateMedia({ media: "print" });
      const printShot = resolve(args.screenshot).replace(/\.png$/i, "") + "-print.png";
      await page.screenshot({ path: printShot, fullPage: true });
      doc.print = { text: await page.evaluate(() => document.body.innerText), screenshot: printShot };
    }
    process.stdout.write(JSON.stringify(doc) + "\n");
    await context.close();
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  process.stderr.write(`check_page: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
