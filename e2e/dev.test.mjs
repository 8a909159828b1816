// End to end: `token-broker dev` in a real browser. The real binary runs alone — in-memory stores, the
// built-in development IdP at /dev-idp, the demo page at / — with no PostgreSQL, Redis or IdP of ours;
// Debian Chromium (playwright-core) logs in through the IdP's form, calls /auth from the page, logs out.
//
// Run by scripts/test (`node --test e2e/*.test.mjs`, after `npm ci` in e2e/ and `cargo build`).
// Inputs, all optional:
//   TOKEN_BROKER_BIN  default: target/debug/token-broker (or $CARGO_TARGET_DIR/debug/token-broker)
//   CHROMIUM          default: /usr/bin/chromium
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

import { startBroker } from './support/broker.mjs';
import { freePort } from './support/ports.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '..');
const artifacts = path.join(here, 'artifacts');

const BROKER_BIN = process.env.TOKEN_BROKER_BIN
  || path.join(process.env.CARGO_TARGET_DIR ? path.resolve(repo, process.env.CARGO_TARGET_DIR) : path.join(repo, 'target'), 'debug', 'token-broker');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const USER = 'dev-e2e.user';

const env = {};
const cleanups = [];

before(async () => {
  fs.mkdirSync(artifacts, { recursive: true });
  const port = await freePort();
  env.url = `http://127.0.0.1:${port}`;
  env.logFile = path.join(artifacts, 'dev-broker.log');
  env.broker = await startBroker({
    bin: BROKER_BIN,
    url: env.url,
    args: ['dev', '--listen-addr', `127.0.0.1:${port}`],
    logFile: env.logFile,
    // Nothing else: dev mode needs no database, Redis, IdP, key or client settings.
    env: { RUST_LOG: 'info' },
  });
  cleanups.push(() => env.broker.stop());

  env.browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  cleanups.push(() => env.browser.close());
});

after(async () => {
  for (const cleanup of cleanups.reverse()) {
    try {
      await cleanup();
    } catch (e) {
      console.error(`[e2e dev] cleanup failed: ${e.message ?? e}`);
    }
  }
});

/** Waits until the demo page's `#who` line matches `pattern`, and returns it. */
async function who(page, pattern) {
  try {
    await page.waitForFunction(
      ([source, flags]) => new RegExp(source, flags).test(document.getElementById('who')?.textContent ?? ''),
      [pattern.source, pattern.flags],
      { timeout: 15_000 },
    );
  } catch (e) {
    const text = await page.locator('#who').textContent().catch(() => '(no #who)');
    throw new Error(`#who is "${text}", not ${pattern} (at ${page.url()})`, { cause: e });
  }
  return page.locator('#who').textContent();
}

/** `fetch(path)` from the page: what a script on the broker's origin sees (status and two headers). */
function fetchFromPage(page, target) {
  return page.evaluate(async (target) => {
    const response = await fetch(target, { credentials: 'include' });
    return {
      status: response.status,
      authorization: response.headers.get('authorization'),
      subject: response.headers.get('x-auth-subject'),
    };
  }, target);
}

test('dev mode: log in through the built-in IdP, call /auth, log out — nothing but the binary', async (t) => {
  assert.match(env.broker.logText(), /DEVELOPMENT MODE, NOT FOR PRODUCTION/);
  assert.ok(env.broker.logText().includes(`Open ${env.url}/`), 'the banner does not print the URL to open');

  const context = await env.browser.newContext();
  const page = await context.newPage();
  let step = 'open the demo page';
  try {
    await page.goto(`${env.url}/`);
    await who(page, /^Not logged in\.$/);

    step = 'log in through the development IdP';
    await page.click('#login');
    await page.waitForURL((url) => url.pathname.startsWith('/dev-idp/'), { timeout: 15_000 });
    const form = await page.locator('body').textContent();
    for (const claim of ['sub', 'name', 'email']) {
      assert.ok(form.includes(claim), `the login form does not list the claim ${claim}`);
    }
    await page.fill('#username', USER);
    await page.click('button[name=signin]');
    await page.waitForURL(`${env.url}/`, { timeout: 15_000 });
    assert.equal(await who(page, /^Logged in as /), `Logged in as ${USER}.`);
    const session = await page.locator('#session').textContent();
    assert.ok(session.startsWith('200\n'), `GET /session: ${session}`);
    assert.equal(JSON.parse(session.slice(4)).user.sub, USER);
    assert.doesNotMatch(session, /token/i, 'GET /session shows a token');
    const cookies = await context.cookies(env.url);
    const cookie = cookies.find((c) => c.name === 'session');
    assert.ok(cookie?.httpOnly, `no HttpOnly session cookie: ${cookies.map((c) => c.name).join(', ')}`);
    assert.doesNotMatch(await page.evaluate(() => document.cookie), /(^|; )session=/);

    step = 'call /auth from the page';
    const auth = await fetchFromPage(page, '/auth');
    assert.equal(auth.status, 200, 'GET /auth with the session cookie');
    assert.match(auth.authorization ?? '', /^Bearer [\w.-]+$/, 'GET /auth has no Bearer token');
    assert.equal(auth.subject, USER);

    step = 'log out';
    await page.click('#logout');
    // The IdP's signed-out page sends the browser back to the demo page after a second.
    await page.waitForURL(`${env.url}/`, { timeout: 15_000 });
    await who(page, /^Not logged in\.$/);
    assert.ok(!(await context.cookies(env.url)).some((c) => c.name === 'session'), 'the session cookie is still there');
    const afterLogout = await fetchFromPage(page, '/auth');
    assert.equal(afterLogout.status, 401, 'GET /auth after logout');
    assert.equal(afterLogout.authorization, null);
  } catch (e) {
    fs.mkdirSync(artifacts, { recursive: true });
    const shot = path.join(artifacts, 'dev-failure.png');
    await page.screenshot({ path: shot, fullPage: true }).catch(() => {});
    t.diagnostic(`failed at step "${step}"; screenshot ${path.relative(repo, shot)}; broker log ${path.relative(repo, env.logFile)}`);
    throw e;
  } finally {
    await context.close();
  }
});

test('dev mode refuses to listen on anything but loopback', () => {
  const result = spawnSync(BROKER_BIN, ['dev', '--listen-addr', '0.0.0.0:0'], {
    env: { PATH: process.env.PATH, HOME: process.env.HOME ?? '/tmp' },
    encoding: 'utf8',
    timeout: 10_000,
  });
  assert.notEqual(result.status, 0, `dev on 0.0.0.0 exited with ${result.status}: ${result.stderr}`);
  assert.match(result.stderr, /loopback only/);
});
