// End to end: a real browser (Debian Chromium driven by playwright-core) logs in and out of a small SPA
// through the real token-broker binary and a real, certified OpenID provider (oidc-provider), with the
// broker's real PostgreSQL and Redis. Everything listens on 127.0.0.1, on ports chosen at run time.
//
// Run by scripts/test (`node --test e2e/*.test.mjs`, after `npm ci` in e2e/ and `cargo build`).
// Inputs, all optional:
//   DATABASE_URL      admin URL; a database is created for this run and dropped afterwards
//   REDIS_URL         the broker's keys get a random prefix and are deleted afterwards
//   TOKEN_BROKER_BIN  default: target/debug/token-broker (or $CARGO_TARGET_DIR/debug/token-broker)
//   CHROMIUM          default: /usr/bin/chromium
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

import { startBroker } from './support/broker.mjs';
import { startIdp } from './support/idp.mjs';
import { createDatabase, dropDatabase } from './support/pg.mjs';
import { freePort } from './support/ports.mjs';
import { connectRedis, deleteKeysWithPrefix, keysWithPrefix } from './support/redis.mjs';
import { startSpa } from './support/spa.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '..');
const artifacts = path.join(here, 'artifacts');

const ADMIN_DATABASE_URL = process.env.DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/postgres';
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const BROKER_BIN = process.env.TOKEN_BROKER_BIN
  || path.join(process.env.CARGO_TARGET_DIR ? path.resolve(repo, process.env.CARGO_TARGET_DIR) : path.join(repo, 'target'), 'debug', 'token-broker');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

const CLIENT_ID = 'token-broker-e2e';
const CLIENT_SECRET = randomBytes(24).toString('base64url');
const RUN_ID = randomBytes(6).toString('hex');
const DATABASE_NAME = `token_broker_e2e_${RUN_ID}`;
const REDIS_PREFIX = `e2e-${RUN_ID}:`;

/** Everything started in before(), stopped in after() whatever happened in between. */
const env = {};
const cleanups = [];

const started = Date.now();
function log(message) {
  // node:test shows a test file's stdout lines as comments in its report.
  console.log(`[e2e +${((Date.now() - started) / 1000).toFixed(1)}s] ${message}`);
}

before(async () => {
  fs.mkdirSync(artifacts, { recursive: true });

  env.spa = await startSpa();
  cleanups.push(['SPA server', () => env.spa.close()]);

  const brokerPort = await freePort();
  env.brokerUrl = `http://127.0.0.1:${brokerPort}`;
  env.spa.setBroker(env.brokerUrl);

  env.idp = await startIdp({
    clientId: CLIENT_ID,
    clientSecret: CLIENT_SECRET,
    redirectUri: `${env.brokerUrl}/callback`,
    postLogoutRedirectUri: `${env.spa.origin}/`,
    backchannelLogoutUri: `${env.brokerUrl}/backchannel-logout`,
  });
  cleanups.push(['IdP', () => env.idp.close()]);
  log(`IdP ${env.idp.issuer}, broker ${env.brokerUrl}, SPA ${env.spa.origin}`);

  const databaseUrl = await createDatabase(ADMIN_DATABASE_URL, DATABASE_NAME);
  cleanups.push([`database ${DATABASE_NAME}`, () => dropDatabase(ADMIN_DATABASE_URL, DATABASE_NAME)]);

  env.redis = await connectRedis(REDIS_URL);
  cleanups.push([`Redis keys ${REDIS_PREFIX}*`, async () => {
    // Key names only (the broker hashes what it keys by); values may be secrets and are never printed.
    const left = await keysWithPrefix(env.redis, REDIS_PREFIX);
    const n = await deleteKeysWithPrefix(env.redis, REDIS_PREFIX);
    log(`deleted ${n} Redis key(s) with prefix ${REDIS_PREFIX}: ${left.map((k) => k.slice(REDIS_PREFIX.length)).join(', ')}`);
    env.redis.close();
  }]);

  log('database and Redis ready; starting the broker');
  env.brokerLog = path.join(artifacts, 'broker.log');
  env.broker = await startBroker({
    bin: BROKER_BIN,
    url: env.brokerUrl,
    logFile: env.brokerLog,
    env: {
      BROKER_LISTEN_ADDR: `127.0.0.1:${brokerPort}`,
      BROKER_PUBLIC_URL: env.brokerUrl,
      BROKER_OIDC_ISSUER: env.idp.issuer,
      BROKER_CLIENT_ID: CLIENT_ID,
      BROKER_CLIENT_SECRET: CLIENT_SECRET,
      BROKER_ALLOWED_ORIGINS: env.spa.origin,
      BROKER_POST_LOGOUT_REDIRECT_URL: `${env.spa.origin}/`,
      BROKER_ENCRYPTION_KEYS: randomBytes(32).toString('base64'),
      DATABASE_URL: databaseUrl,
      REDIS_URL,
      BROKER_REDIS_KEY_PREFIX: REDIS_PREFIX,
      BROKER_LOG_FORMAT: 'json',
      RUST_LOG: 'info',
    },
  });
  log('broker ready; starting the browser');
  cleanups.push(['broker', async () => {
    const exit = await env.broker.stop();
    log(`broker stopped: ${JSON.stringify(exit)}`);
  }]);

  env.browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // playwright-core starts Chromium with a fresh temporary profile (user-data-dir) of its own.
    // The background-networking flags keep Chromium from calling home: this machine has no network.
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  cleanups.push(['browser', () => env.browser.close()]);
  log('browser started');
});

after(async () => {
  // Reverse order: browser, broker, Redis keys, database, IdP, SPA.
  for (const [name, cleanup] of cleanups.reverse()) {
    try {
      await cleanup();
    } catch (e) {
      console.error(`[e2e] cleanup of ${name} failed: ${e.message ?? e}`);
    }
  }
  if (env.idp) fs.writeFileSync(path.join(artifacts, 'idp-events.json'), JSON.stringify(env.idp.events, null, 2));
  log('cleaned up');
});

/** Waits until the SPA's <pre id="session"> has loaded, and returns its HTTP status and parsed body. */
async function sessionShown(page) {
  const pre = page.locator('#session');
  await page.waitForFunction(() => document.getElementById('session')?.dataset.status !== 'loading', null, { timeout: 15_000 });
  const status = await pre.getAttribute('data-status');
  const text = await pre.textContent();
  const body = text.slice(text.indexOf('\n') + 1);
  let json = null;
  try {
    json = JSON.parse(body);
  } catch {
    // leave null: the assertion that reads it reports the raw text
  }
  return { status, text, json };
}

/** True when some key anywhere in a JSON value matches /token/i. */
function hasTokenField(value) {
  if (Array.isArray(value)) return value.some(hasTokenField);
  if (value && typeof value === 'object') {
    return Object.entries(value).some(([k, v]) => /token/i.test(k) || hasTokenField(v));
  }
  return false;
}

test('a browser logs in through the broker and out again; no token reaches it', { timeout: 180_000 }, async () => {
  const context = await env.browser.newContext();
  const page = await context.newPage();
  let step = 'start';
  const stepTo = (name) => {
    step = name;
    log(`step: ${name}`);
  };

  try {
    stepTo('the SPA loads and is logged out');
    await page.goto(`${env.spa.origin}/`);
    let session = await sessionShown(page);
    assert.equal(session.status, '401', `GET /session before login: ${session.text}`);

    stepTo('Log in leads to the IdP login form');
    await page.click('#login');
    await page.waitForURL((url) => url.origin === env.idp.issuer, { timeout: 15_000 });
    await page.locator('input[name="login"]').waitFor({ timeout: 15_000 });
    // The pending login waits in Redis under the configured prefix (SPEC: pending logins live in Redis).
    const pending = await keysWithPrefix(env.redis, REDIS_PREFIX);
    assert.ok(pending.length > 0, `no Redis key starts with BROKER_REDIS_KEY_PREFIX=${REDIS_PREFIX} while a login is pending`);

    stepTo('sign in at the IdP (and consent, if asked)');
    await page.fill('input[name="login"]', 'alice');
    await page.fill('input[name="password"]', 'any-password');
    await page.click('button[type="submit"]');
    const consent = page.locator('button:has-text("Continue")');
    await page.waitForURL((url) => url.origin === env.spa.origin || url.pathname.startsWith('/interaction/'), { timeout: 15_000 });
    if (new URL(page.url()).origin !== env.spa.origin && (await consent.count()) > 0) {
      await consent.click();
    }
    await page.waitForURL((url) => url.origin === env.spa.origin, { timeout: 15_000 });

    stepTo('back on the SPA, logged in');
    const landed = new URL(page.url());
    assert.equal(landed.searchParams.get('login_error'), null, `the broker reported login_error=${landed.searchParams.get('login_error')}`);
    assert.equal(landed.pathname, '/');
    session = await sessionShown(page);
    assert.equal(session.status, '200', `GET /session after login: ${session.text}`);
    assert.ok(session.json, `GET /session did not return JSON: ${session.text}`);
    assert.equal(session.json.authenticated, true);
    assert.equal(session.json.user?.sub, 'alice');
    assert.ok(!Number.isNaN(Date.parse(session.json.expires_at)), `expires_at is not a date: ${session.json.expires_at}`);
    assert.equal(hasTokenField(session.json), false, `GET /session has a token field: ${session.text}`);
    log(`GET /session: ${session.text.replace('\n', ' ')}`);

    stepTo('the session cookie is HttpOnly and no token reached the browser');
    const { accessTokens, refreshTokens, idTokens } = env.idp.issued;
    assert.ok(accessTokens.length > 0 && idTokens.length > 0, 'the IdP issued no tokens: did the broker redeem the code?');
    assert.ok(refreshTokens.length > 0, 'the IdP issued no refresh token: the broker should ask for offline_access');
    const tokens = [...accessTokens, ...refreshTokens, ...idTokens];
    const cookies = await context.cookies();
    log(`cookies: ${cookies.map((c) => `${c.name}(${c.httpOnly ? 'HttpOnly,' : ''}${c.sameSite}${c.secure ? ',Secure' : ''})`).join(' ')}`);
    const sessionCookie = cookies.find((c) => c.name === 'session' || c.name === '__Host-session');
    assert.ok(sessionCookie, `no session cookie; cookies: ${cookies.map((c) => c.name).join(', ')}`);
    assert.equal(sessionCookie.httpOnly, true, 'the session cookie is not HttpOnly');
    assert.equal(sessionCookie.sameSite, 'Strict', 'the session cookie is not SameSite=Strict (the default)');
    for (const cookie of cookies) {
      for (const token of tokens) {
        assert.ok(!cookie.value.includes(token), `cookie ${cookie.name} carries a token`);
      }
    }
    const content = await page.content();
    for (const token of tokens) assert.ok(!content.includes(token), 'the page contains a token');
    const storage = await page.evaluate(() => JSON.stringify({ ...localStorage, ...sessionStorage }));
    for (const token of tokens) assert.ok(!storage.includes(token), 'web storage contains a token');

    stepTo('Log out leads to the IdP end-session page');
    await page.click('#logout');
    await page.waitForURL((url) => url.origin === env.idp.issuer, { timeout: 15_000 });
    const signOut = page.locator('button:has-text("Yes, sign me out")');
    await signOut.waitFor({ timeout: 15_000 });
    await signOut.click();
    await page.waitForURL((url) => url.origin === env.spa.origin, { timeout: 15_000 });

    stepTo('back on the SPA, logged out');
    session = await sessionShown(page);
    assert.equal(session.status, '401', `GET /session after logout: ${session.text}`);
    const after = await context.cookies();
    assert.equal(after.find((c) => c.name === sessionCookie.name), undefined, 'the session cookie was not cleared');
    assert.ok(await env.idp.waitForEvent('end_session.success'), 'the IdP did not end its session');
    // Revocation (RFC 7009) at logout is SPEC behaviour; say what was seen without failing on it here.
    const revoked = env.idp.events.some((e) => e.event === 'refresh_token.destroyed');
    log(`refresh token revoked at the IdP on logout: ${revoked ? 'yes' : 'no'}`);

    stepTo('no token or client secret in the broker log');
    const brokerLog = env.broker.logText();
    for (const secret of [...tokens, CLIENT_SECRET]) assert.ok(!brokerLog.includes(secret), 'the broker logged a token or the client secret');
  } catch (error) {
    const file = path.join(artifacts, `failure-${step.replace(/[^a-z0-9]+/gi, '-')}.png`);
    await page.screenshot({ path: file, fullPage: true }).catch(() => {});
    fs.writeFileSync(file.replace(/\.png$/, '.html'), await page.content().catch(() => ''));
    log(`failed at step "${step}" on ${page.url()}; screenshot ${path.relative(repo, file)}, broker log ${path.relative(repo, env.brokerLog)}`);
    log(`IdP events: ${JSON.stringify(env.idp.events)}`);
    throw error;
  } finally {
    await context.close();
  }
});
