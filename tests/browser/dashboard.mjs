// The fedgate dashboard in a real browser: headless Debian Chromium (driven by playwright-core,
// which never downloads a browser of its own) opens a gateway's admin page, waits for every
// cluster of the federation, keeps traffic flowing to a service, fails a backend (a command,
// e.g. `fedgate demo fail east/east-1`) and waits — bounded — for the failover to show up in
// the page's failover list. A screenshot is kept either way. Exit code 0 = seen, 1 = not.
//
//   node dashboard.mjs --url http://127.0.0.11:15000/ --clusters east,west,north \
//     --service demo/echo --traffic http://242.1.0.1:8080/ \
//     --fail '["fedgate","demo","fail","east/east-1","--dir","/tmp/demo"]'
//
// Options (all but --url and --clusters optional):
//   --url URL            the dashboard (a gateway's admin `/`)
//   --clusters a,b,c     cluster ids that must appear (elements with data-cluster="<id>")
//   --service NS/NAME    the service whose failover must appear (default demo/echo)
//   --traffic URL        HTTP GET sent every 100 ms while waiting for the failover
//   --fail JSON          argv (JSON array) of the command that makes the failover happen
//   --restore JSON       argv of the command that undoes it; then the explain view must go
//                        back to the best tier (no failover) within 20 s
//   --artifacts DIR      where screenshots go (default $FEDGATE_ARTIFACTS or
//                        <repo>/target/test-artifacts/browser)
//   --chromium PATH      the browser (default $CHROMIUM or /usr/bin/chromium)
//   --timeout-ms N       how long the failover may take to appear (default 10000)

import { execFile } from 'node:child_process';
import http from 'node:http';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const here = dirname(fileURLToPath(import.meta.url));

function fail(msg) {
  console.error(`dashboard.mjs: ${msg}`);
  process.exit(2);
}

const { values: opts } = parseArgs({
  options: {
    url: { type: 'string' },
    clusters: { type: 'string' },
    service: { type: 'string', default: 'demo/echo' },
    traffic: { type: 'string' },
    fail: { type: 'string' },
    restore: { type: 'string' },
    artifacts: { type: 'string' },
    chromium: { type: 'string' },
    'timeout-ms': { type: 'string', default: '10000' },
  },
});
if (!opts.url) fail('--url is required (a gateway admin URL, e.g. http://127.0.0.11:15000/)');
if (!opts.clusters) fail('--clusters is required (e.g. east,west,north)');
const clusters = opts.clusters.split(',').filter(Boolean);
const failoverTimeout = Number(opts['timeout-ms']);
if (!Number.isFinite(failoverTimeout) || failoverTimeout <= 0) fail('--timeout-ms must be a positive number');
function argvOption(name) {
  if (!opts[name]) return null;
  let argv;
  try {
    argv = JSON.parse(opts[name]);
  } catch (e) {
    fail(`--${name} must be a JSON array of strings: ${e.message}`);
  }
  if (!Array.isArray(argv) || argv.length === 0 || !argv.every((a) => typeof a === 'string')) {
    fail(`--${name} must be a non-empty JSON array of strings`);
  }
  return argv;
}
const failArgv = argvOption('fail');
const restoreArgv = argvOption('restore');
if (restoreArgv && !failArgv) fail('--restore needs --fail');
const chromiumPath = opts.chromium ?? process.env.CHROMIUM ?? '/usr/bin/chromium';
if (!existsSync(chromiumPath)) {
  fail(`no browser at ${chromiumPath}: install Debian's chromium (apt-get install chromium; scripts/install-test-deps.sh does)`);
}
const artifacts = resolve(opts.artifacts ?? process.env.FEDGATE_ARTIFACTS ?? join(here, '..', '..', 'target', 'test-artifacts', 'browser'));
mkdirSync(artifacts, { recursive: true });

let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch (e) {
  fail(`cannot load playwright-core (run \`npm ci\` in ${here}): ${e.message}`);
}

const log = (msg) => console.log(`[${new Date().toISOString()}] ${msg}`);

function run(argv) {
  return new Promise((res, rej) => {
    execFile(argv[0], argv.slice(1), { timeout: 20000 }, (err, stdout, stderr) => {
      if (err) rej(new Error(`${argv.join(' ')} failed: ${err.message}\n${stdout}${stderr}`));
      else res(`${stdout}${stderr}`.trim());
    });
  });
}

// One GET on a connection of its own (no keep-alive: every request is a new connection to
// the ClusterSetIP, so each one is routed, counted and can fail over); resolves to
// [status, body].
function getOnce(url) {
  return new Promise((res, rej) => {
    const req = http.get(url, { agent: false, timeout: 2000 }, (r) => {
      let body = '';
      r.setEncoding('utf8');
      r.on('data', (c) => { body += c; });
      r.on('end', () => res([r.statusCode, body.trim()]));
      r.on('error', rej);
    });
    req.on('timeout', () => req.destroy(new Error('timed out after 2 s')));
    req.on('error', rej);
  });
}

// Sends one GET every 100 ms until stopped; counts answers and failures.
function startTraffic(url) {
  const stats = { ok: 0, failed: 0, lastError: null, answers: new Map() };
  let stopped = false;
  const loop = (async () => {
    while (!stopped) {
      try {
        const [status, body] = await getOnce(url);
        if (status === 200) {
          stats.ok += 1;
          stats.answers.set(body, (stats.answers.get(body) ?? 0) + 1);
        } else {
          stats.failed += 1;
          stats.lastError = `HTTP ${status}`;
        }
      } catch (e) {
        stats.failed += 1;
        stats.lastError = e.message;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  return { stats, stop: async () => { stopped = true; await loop; } };
}

// Failover entries for `service` in the page's failover list (docs/dashboard.md: entries
// `li[data-testid="failover"][data-service="ns/name"]`; repeats of one event are merged and
// counted, so an entry's text changes when it happens again).
async function failoverEntries(page, service) {
  return page.evaluate((svc) => {
    const list = document.querySelector('[data-testid="failovers"]');
    if (!list) return null;
    return [...list.querySelectorAll('[data-testid="failover"]')]
      .filter((e) => e.dataset.service === svc && e.textContent.includes(svc))
      .map((e) => e.innerText.replace(/\s+/g, ' ').trim());
  }, service);
}

// True once every cluster card shows the wanted status (`local` for the page's own
// gateway, `up` for peers).
async function clusterStatuses(page) {
  return page.evaluate(() => Object.fromEntries(
    [...document.querySelectorAll('[data-cluster]')].map((e) => [e.dataset.cluster, e.dataset.status])));
}

async function waitFor(what, timeoutMs, check) {
  const start = Date.now();
  let last;
  for (;;) {
    last = await check();
    if (last.ok) return Date.now() - start;
    if (Date.now() - start > timeoutMs) throw new Error(`${what} not seen within ${timeoutMs} ms (last: ${last.seen})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const profile = mkdtempSync(join(tmpdir(), 'fedgate-chromium-'));
const pageErrors = [];
let context;
let page;
let traffic;
let exitCode = 1;
try {
  // A fresh profile, and no background traffic of Chromium's own (this network refuses it).
  context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath,
    headless: true,
    viewport: { width: 1400, height: 1000 },
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.on('pageerror', (e) => pageErrors.push(e.message));
  // Failed requests are reported with their URL below; the browser's own favicon probe
  // is no request of the page.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) pageErrors.push(`console: ${m.text()}`);
  });
  page.on('response', (r) => {
    if (r.status() >= 400 && new URL(r.url()).pathname !== '/favicon.ico') pageErrors.push(`HTTP ${r.status()} for ${r.url()}`);
  });
  page.on('requestfailed', (r) => {
    if (new URL(r.url()).pathname !== '/favicon.ico') pageErrors.push(`request failed: ${r.url()} (${r.failure()?.errorText})`);
  });

  const t0 = Date.now();
  log(`opening ${opts.url} in ${chromiumPath}`);
  await page.goto(opts.url, { waitUntil: 'load', timeout: 15000 });
  for (const id of clusters) {
    await page.locator(`[data-cluster="${id}"]`).first().waitFor({ state: 'visible', timeout: 15000 });
  }
  log(`all ${clusters.length} clusters (${clusters.join(', ')}) on the page after ${Date.now() - t0} ms`);
  // The page's own cluster is `local`, every other one `up` (connected, not draining).
  await waitFor('every cluster local or up', 15000, async () => {
    const st = await clusterStatuses(page);
    const ok = clusters.every((c) => st[c] === 'local' || st[c] === 'up')
      && clusters.filter((c) => st[c] === 'local').length === 1;
    return { ok, seen: JSON.stringify(st) };
  });
  const clusterTexts = await page.evaluate(() =>
    [...document.querySelectorAll('[data-cluster]')].map((e) => `${e.dataset.cluster}: ${e.innerText.replace(/\s+/g, ' ').trim()}`));
  for (const t of clusterTexts) log(`  ${t}`);

  // Every endpoint row names the path a connection takes: `local` for this cluster's
  // endpoints, `tunnel` for the others' (no peer is on a flat network here).
  const statuses = await clusterStatuses(page);
  const localId = Object.keys(statuses).find((c) => statuses[c] === 'local');
  await waitFor('endpoint rows, each with its path', 15000, async () => {
    const rows = await page.evaluate(() => [...document.querySelectorAll('[data-testid="endpoints"] tr[data-endpoint]')]
      .map((r) => ({ cluster: r.dataset.endpoint.split('/')[0], path: r.querySelector('td[data-path]')?.dataset.path ?? null })));
    const ok = rows.length > 0 && rows.some((r) => r.cluster !== localId)
      && rows.every((r) => r.path === (r.cluster === localId ? 'local' : 'tunnel'));
    return { ok, seen: JSON.stringify(rows.slice(0, 10)) };
  });

  if (failArgv) {
    const before = await failoverEntries(page, opts.service);
    if (before === null) throw new Error('no failover list on the page (an element with data-testid="failovers")');
    log(`failover entries for ${opts.service} before: ${before.length}`);
    if (opts.traffic) {
      traffic = startTraffic(opts.traffic);
      // Traffic flows before the failure, so the page has something to compare with.
      const start = Date.now();
      while (traffic.stats.ok < 3 && Date.now() - start < 5000) await new Promise((r) => setTimeout(r, 100));
      if (traffic.stats.ok === 0) throw new Error(`no answer from ${opts.traffic}: ${traffic.stats.lastError}`);
    }
    log(`failing: ${failArgv.join(' ')}`);
    const out = await run(failArgv);
    if (out) log(`  ${out.split('\n').join('\n  ')}`);
    const failedAt = Date.now();
    let after = before;
    const isNew = (entries) => entries.some((e) => !before.includes(e));
    while (Date.now() - failedAt < failoverTimeout) {
      after = (await failoverEntries(page, opts.service)) ?? [];
      if (isNew(after)) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    if (!isNew(after)) {
      throw new Error(`no failover of ${opts.service} on the page within ${failoverTimeout} ms of the failure`
        + (traffic ? ` (traffic: ${traffic.stats.ok} ok, ${traffic.stats.failed} failed, last error ${traffic.stats.lastError})` : ''));
    }
    log(`failover on the page ${Date.now() - failedAt} ms after the failure: ${after.find((e) => !before.includes(e))}`);

    // The explain view agrees: a new connection to the service would fail over.
    await page.selectOption('[data-testid="explain-service"]', opts.service);
    const explained = await waitFor(`explain view of ${opts.service} saying failover`, failoverTimeout, async () => {
      const seen = await page.evaluate((svc) => {
        const r = document.querySelector('[data-testid="explain-result"]');
        return {
          service: r?.dataset.service ?? null,
          failover: !!document.querySelector('[data-testid="explain-failover"]'),
          summary: document.querySelector('[data-testid="explain-summary"]')?.textContent ?? null,
          error: document.querySelector('[data-testid="explain-error"]')?.textContent ?? null,
        };
      }, opts.service);
      return { ok: seen.service === opts.service && seen.failover, seen: JSON.stringify(seen) };
    });
    const summary = await page.textContent('[data-testid="explain-summary"]');
    log(`explain view says failover after ${explained} ms: ${summary?.trim()}`);
    const shot = join(artifacts, 'dashboard-failover.png');
    await page.screenshot({ path: shot, fullPage: true });
    console.log(`screenshot: ${shot}`);

    if (restoreArgv) {
      log(`restoring: ${restoreArgv.join(' ')}`);
      const out = await run(restoreArgv);
      if (out) log(`  ${out.split('\n').join('\n  ')}`);
      // Back on the best tier once the endpoint is healthy and its ejection has run out.
      const back = await waitFor(`explain view of ${opts.service} back on the best tier`, 20000, async () => {
        const seen = await page.evaluate(() => ({
          failover: !!document.querySelector('[data-testid="explain-failover"]'),
          tier: document.querySelector('[data-testid="explain-tier"]')?.textContent ?? null,
          summary: document.querySelector('[data-testid="explain-summary"]')?.textContent ?? null,
        }));
        return { ok: !seen.failover && seen.tier !== null && seen.tier !== 'none', seen: JSON.stringify(seen) };
      });
      const summary = await page.textContent('[data-testid="explain-summary"]');
      log(`explain view back on the best tier ${back} ms after the restore: ${summary?.trim()}`);
      const restored = join(artifacts, 'dashboard-restored.png');
      await page.screenshot({ path: restored, fullPage: true });
      console.log(`screenshot: ${restored}`);
    }
    if (traffic) {
      // Let the page show the traffic after the failover too.
      await new Promise((r) => setTimeout(r, 1200));
      await traffic.stop();
      const answers = [...traffic.stats.answers].map(([a, n]) => `${n}x ${a}`).join('; ');
      const why = traffic.stats.failed ? `; last failure: ${traffic.stats.lastError}` : '';
      log(`traffic: ${traffic.stats.ok} ok, ${traffic.stats.failed} failed (${answers}${why})`);
      traffic = null;
    }
  }
  if (pageErrors.length) throw new Error(`errors in the page: ${pageErrors.join(' | ')}`);
  if (!failArgv) {
    const shot = join(artifacts, 'dashboard.png');
    await page.screenshot({ path: shot, fullPage: true });
    console.log(`screenshot: ${shot}`);
  }
  exitCode = 0;
} catch (e) {
  console.error(`dashboard.mjs: FAILED: ${e.message}`);
  if (pageErrors.length) console.error(`page errors: ${pageErrors.join(' | ')}`);
  if (page) {
    const shot = join(artifacts, 'dashboard-failure.png');
    try {
      await page.screenshot({ path: shot, fullPage: true });
      console.error(`screenshot of the failure: ${shot}`);
    } catch (se) {
      console.error(`no screenshot: ${se.message}`);
    }
  }
} finally {
  if (traffic) await traffic.stop();
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
process.exit(exitCode);
