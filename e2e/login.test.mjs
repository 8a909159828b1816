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
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

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
// The IdP's access-token lifetime (s). The broker refreshes a token this short at half its lifetime
// (SPEC: 30 s before expiry, at most half the lifetime), so forward-auth refreshes 5 s after a login.
const ACCESS_TOKEN_TTL = 10;

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
  }, { accessTokenTtl: ACCESS_TOKEN_TTL, rotateRefreshToken: true });
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

/** A short, printable stand-in for a token (messages never carry tokens themselves). */
function fingerprint(token) {
  return token ? `sha256:${createHash('sha256').update(token).digest('hex').slice(0, 12)}` : String(token);
}

/** The last `n` lines of the broker's log that match `pattern`, for failure messages. */
function brokerLogLines(pattern = /./, n = 15) {
  const lines = (env.broker?.logText() ?? '').split('\n').filter((line) => line && pattern.test(line));
  return lines.slice(-n).join('\n');
}

/** IdP events from index `since` on, one JSON line each, for failure messages. */
function idpEventsText(since = 0) {
  return env.idp.eventsSince(since).map((e) => JSON.stringify(e)).join('\n') || '(none)';
}

/** A failure message with what the IdP and the broker saw. */
function explain(message, { since = 0, logPattern = /./ } = {}) {
  return `${message}\n--- IdP events ---\n${idpEventsText(since)}\n--- broker log (${path.relative(repo, env.brokerLog)}) ---\n${brokerLogLines(logPattern)}`;
}

/** The browser's session cookie for the broker, as a `Cookie` header a server (the ingress) would forward. */
async function sessionCookieHeader(context) {
  const cookies = await context.cookies(env.brokerUrl);
  const cookie = cookies.find((c) => c.name === 'session' || c.name === '__Host-session');
  assert.ok(cookie, `no session cookie for ${env.brokerUrl}; cookies: ${cookies.map((c) => c.name).join(', ')}`);
  return `${cookie.name}=${cookie.value}`;
}

/** `GET /auth` as the ingress calls it: server side, with the browser's cookie. */
async function forwardAuth(cookie) {
  const startedAt = Date.now();
  const response = await fetch(`${env.brokerUrl}/auth`, {
    headers: { cookie },
    redirect: 'manual',
    signal: AbortSignal.timeout(20_000),
  });
  const body = await response.text();
  const authorization = response.headers.get('authorization');
  const token = authorization?.startsWith('Bearer ') ? authorization.slice('Bearer '.length) : null;
  return {
    status: response.status,
    token,
    subject: response.headers.get('x-auth-subject'),
    body,
    startedAt,
    ms: Date.now() - startedAt,
    describe: () => `${response.status} token=${fingerprint(token)} subject=${response.headers.get('x-auth-subject')} ${body.slice(0, 300)}`,
  };
}

/** `GET /session` from Node with a cookie. */
async function sessionStatus(cookie) {
  const response = await fetch(`${env.brokerUrl}/session`, { headers: { cookie }, signal: AbortSignal.timeout(20_000) });
  return { status: response.status, body: await response.text() };
}

async function idpDiscovery() {
  const response = await fetch(`${env.idp.issuer}/.well-known/openid-configuration`);
  assert.equal(response.status, 200, 'IdP discovery');
  return response.json();
}

/**
 * Logs `user` in from the SPA through the broker and the IdP's login form (and consent, if asked),
 * and returns the SPA's `GET /session` once back. `atIdpLoginForm` runs while the IdP's form is shown.
 */
async function logIn(page, user, stepTo, { atIdpLoginForm } = {}) {
  const startedAt = Date.now();
  stepTo(`${user}: the SPA loads and is logged out`);
  await page.goto(`${env.spa.origin}/`);
  let session = await sessionShown(page);
  assert.equal(session.status, '401', `GET /session before login: ${session.text}`);

  stepTo(`${user}: Log in leads to the IdP login form`);
  await page.click('#login');
  await page.waitForURL((url) => url.origin === env.idp.issuer, { timeout: 15_000 });
  await page.locator('input[name="login"]').waitFor({ timeout: 15_000 });
  if (atIdpLoginForm) await atIdpLoginForm();

  stepTo(`${user}: sign in at the IdP (and consent, if asked)`);
  await page.fill('input[name="login"]', user);
  await page.fill('input[name="password"]', 'any-password');
  await page.click('button[type="submit"]');
  const consent = page.locator('button:has-text("Continue")');
  await page.waitForURL((url) => url.origin === env.spa.origin || url.pathname.startsWith('/interaction/'), { timeout: 15_000 });
  if (new URL(page.url()).origin !== env.spa.origin && (await consent.count()) > 0) {
    await consent.click();
  }
  await page.waitForURL((url) => url.origin === env.spa.origin, { timeout: 15_000 });

  stepTo(`${user}: back on the SPA, logged in`);
  const landed = new URL(page.url());
  assert.equal(landed.searchParams.get('login_error'), null, `the broker reported login_error=${landed.searchParams.get('login_error')}`);
  assert.equal(landed.pathname, '/');
  session = await sessionShown(page);
  assert.equal(session.status, '200', `GET /session after login: ${session.text}`);
  assert.ok(session.json, `GET /session did not return JSON: ${session.text}`);
  assert.equal(session.json.authenticated, true);
  assert.equal(session.json.user?.sub, user);
  log(`${user} logged in (${Date.now() - startedAt} ms)`);
  return session;
}

/**
 * Runs a test body with step logging; pages come from `newPage()` (each in a browser context of its
 * own, closed afterwards). On failure: a screenshot and the HTML of each page, the step, the IdP's events.
 */
async function scenario(name, body) {
  const contexts = [];
  const pages = [];
  let step = 'start';
  const startedAt = Date.now();
  const stepTo = (stepName) => {
    step = stepName;
    log(`step: ${stepName}`);
  };
  const newPage = async () => {
    const context = await env.browser.newContext();
    contexts.push(context);
    const page = await context.newPage();
    pages.push(page);
    return page;
  };
  try {
    await body({ stepTo, newPage });
    log(`${name}: passed in ${((Date.now() - startedAt) / 1000).toFixed(1)} s`);
  } catch (error) {
    const shots = [];
    for (const [i, page] of pages.entries()) {
      const file = path.join(artifacts, `failure-${name}-${i + 1}-${step.replace(/[^a-z0-9]+/gi, '-')}.png`);
      await page.screenshot({ path: file, fullPage: true }).catch(() => {});
      fs.writeFileSync(file.replace(/\.png$/, '.html'), await page.content().catch(() => ''));
      shots.push(`${path.relative(repo, file)} (${page.url()})`);
    }
    log(`${name}: failed at step "${step}"; screenshots ${shots.join(', ')}; broker log ${path.relative(repo, env.brokerLog)}`);
    log(`IdP events: ${JSON.stringify(env.idp.events)}`);
    throw error;
  } finally {
    for (const context of contexts) await context.close().catch(() => {});
  }
}

test('a browser logs in through the broker and out again; no token reaches it', { timeout: 180_000 }, () => scenario('login', async ({ stepTo, newPage }) => {
  const page = await newPage();
  const context = page.context();

  await logIn(page, 'alice', stepTo, {
    atIdpLoginForm: async () => {
      // The pending login waits in Redis under the configured prefix (SPEC: pending logins live in Redis).
      const pending = await keysWithPrefix(env.redis, REDIS_PREFIX);
      assert.ok(pending.length > 0, `no Redis key starts with BROKER_REDIS_KEY_PREFIX=${REDIS_PREFIX} while a login is pending`);
    },
  });
  let session = await sessionShown(page);
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
  const mark = env.idp.events.length;
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
  assert.ok(await env.idp.waitForEvent('end_session.success', 5000, mark), explain('the IdP did not end its session', { since: mark }));
  // Revocation (RFC 7009) at logout is SPEC behaviour; say what was seen without failing on it here.
  const revoked = env.idp.events.some((e) => e.event === 'refresh_token.destroyed');
  log(`refresh token revoked at the IdP on logout: ${revoked ? 'yes' : 'no'}`);
  // "Yes, sign me out" also makes the IdP call the broker's back-channel logout for this (already ended)
  // session; the broker should simply accept it. Reported, not asserted (the back-channel test asserts).
  for (const e of env.idp.eventsSince(mark, 'backchannel.success', 'backchannel.error')) {
    log(`back-channel call after the RP-initiated logout: ${JSON.stringify(e)}`);
  }

  stepTo('no token or client secret in the broker log');
  const brokerLog = env.broker.logText();
  for (const secret of [...tokens, CLIENT_SECRET]) assert.ok(!brokerLog.includes(secret), 'the broker logged a token or the client secret');
}));

test('forward-auth (/auth) hands servers the access token, cached, and refreshes it once with a rotating IdP', { timeout: 120_000 }, () => scenario('refresh', async ({ stepTo, newPage }) => {
  const ttlMs = env.idp.accessTokenTtl * 1000;
  // The broker refreshes from half the lifetime on (tokens under a minute); it caches a token a moment
  // after the IdP issued it, so "issued + ttl/2" is a lower bound of the broker's refresh time.
  const dueAfter = (grant) => grant.at + ttlMs / 2;
  const refreshGrants = (since) => env.idp.eventsSince(since, 'grant.success', 'grant.error').filter((e) => e.grant_type === 'refresh_token');
  const waitUntilDue = async (grant, why) => {
    const until = dueAfter(grant) + 750;
    log(`waiting ${((until - Date.now()) / 1000).toFixed(1)} s until the access token is due for refresh (${why})`);
    await sleep(Math.max(0, until - Date.now()));
  };

  const page = await newPage();
  const start = env.idp.events.length;
  await logIn(page, 'carol', stepTo);
  const cookie = await sessionCookieHeader(page.context());
  const loginGrant = env.idp.eventsSince(start, 'grant.success').find((e) => e.grant_type === 'authorization_code');
  assert.ok(loginGrant, explain('no authorization_code grant at the IdP for this login', { since: start }));
  assert.equal(loginGrant.expires_in, env.idp.accessTokenTtl, 'the IdP did not use the configured access-token lifetime');
  const loginToken = env.idp.issued.accessTokens[loginGrant.access_token_index];

  stepTo('GET /auth (server side, with the session cookie): 200, Bearer <the login access token>, X-Auth-Subject');
  const first = await forwardAuth(cookie);
  assert.equal(first.status, 200, explain(`GET /auth after login: ${first.describe()}`, { since: start }));
  assert.ok(first.token, `GET /auth gave no Bearer token: ${first.describe()}`);
  assert.equal(first.subject, 'carol', `X-Auth-Subject: ${first.describe()}`);
  log(`GET /auth #1: ${first.status} in ${first.ms} ms, token ${fingerprint(first.token)}, ${((first.startedAt - loginGrant.at) / 1000).toFixed(1)} s after the login grant`);

  stepTo('GET /auth again at once: the same (cached) token, no refresh grant');
  const second = await forwardAuth(cookie);
  assert.equal(second.status, 200, explain(`GET /auth #2: ${second.describe()}`, { since: start }));
  log(`GET /auth #2: ${second.status} in ${second.ms} ms, token ${fingerprint(second.token)}`);
  let current = loginGrant;
  if (second.startedAt + second.ms < dueAfter(loginGrant) - 250) {
    assert.equal(first.token, loginToken, `GET /auth did not hand out the access token the IdP issued at login (${fingerprint(first.token)} vs ${fingerprint(loginToken)})`);
    assert.equal(second.token, first.token, explain('GET /auth right after another returned a different token: the token cache is not used', { since: start }));
    assert.deepEqual(refreshGrants(start), [], explain('a refresh grant before the token was due', { since: start }));
  } else {
    // A very slow machine: the token was already due. Carry on from whatever the IdP issued last.
    log(`the first /auth calls came too late to check the cache (token due ${((dueAfter(loginGrant) - first.startedAt) / 1000).toFixed(1)} s after #1); skipping those checks`);
    current = env.idp.eventsSince(start, 'grant.success').at(-1);
  }

  stepTo('once the token is due, 5 concurrent GET /auth: all 200 with one new token B, exactly one refresh grant');
  await waitUntilDue(current, 'login token');
  const burst = env.idp.events.length;
  const burstResults = await Promise.all(Array.from({ length: 5 }, () => forwardAuth(cookie)));
  await sleep(100); // let the IdP's events for the grant land
  log(`GET /auth x5 once due: ${burstResults.map((r) => `${r.status} ${fingerprint(r.token)} ${r.ms} ms`).join('; ')}`);
  let refreshes = refreshGrants(burst);
  for (const r of burstResults) assert.equal(r.status, 200, explain(`GET /auth when due: ${r.describe()}`, { since: burst }));
  assert.equal(refreshes.length, 1, explain(`expected exactly one refresh grant for 5 concurrent /auth calls, the IdP saw ${refreshes.length}`, { since: burst }));
  const refreshB = refreshes[0];
  assert.equal(refreshB.event, 'grant.success', explain('the IdP refused the refresh', { since: burst }));
  assert.ok(refreshB.rotated_refresh_token, 'the IdP did not rotate the refresh token (rotateRefreshToken is on)');
  const tokenB = env.idp.issued.accessTokens[refreshB.access_token_index];
  for (const r of burstResults) {
    assert.equal(r.token, tokenB, `a concurrent /auth did not get the refreshed token: ${r.describe()} vs B ${fingerprint(tokenB)}`);
  }
  assert.notEqual(tokenB, loginToken, 'the refreshed token equals the login token');
  assert.equal(env.idp.eventsSince(burst, 'refresh_token.consumed').length, 1, explain('the old refresh token was not consumed exactly once', { since: burst }));
  assert.deepEqual(env.idp.eventsSince(start, 'grant.error', 'grant.revoked'), [], explain('the IdP refused a grant or revoked one', { since: start }));
  log(`refresh grant ${((refreshB.at - current.at) / 1000).toFixed(1)} s after the previous token; B = ${fingerprint(tokenB)}`);

  stepTo('GET /auth right after: B again (cached), and the IdP\'s userinfo endpoint accepts B');
  const cached = await forwardAuth(cookie);
  assert.equal(cached.status, 200, explain(`GET /auth after the refresh: ${cached.describe()}`, { since: burst }));
  assert.equal(cached.token, tokenB, `GET /auth right after the refresh: ${cached.describe()}`);
  const discovery = await idpDiscovery();
  const userinfo = await fetch(discovery.userinfo_endpoint, { headers: { authorization: `Bearer ${tokenB}` } });
  const userinfoBody = await userinfo.text();
  assert.equal(userinfo.status, 200, `the IdP's userinfo refused the refreshed token: ${userinfo.status} ${userinfoBody}`);
  assert.equal(JSON.parse(userinfoBody).sub, 'carol', `userinfo: ${userinfoBody}`);
  assert.equal(refreshGrants(burst).length, 1, explain('another refresh grant after the refresh', { since: burst }));

  stepTo('once B is due, GET /auth refreshes again with the rotated refresh token (the broker stored it)');
  await waitUntilDue(refreshB, 'token B');
  const second2 = env.idp.events.length;
  const third = await forwardAuth(cookie);
  await sleep(100);
  refreshes = refreshGrants(second2);
  assert.equal(third.status, 200, explain(`GET /auth when B was due: ${third.describe()}`, { since: second2 }));
  assert.equal(refreshes.length, 1, explain(`expected one refresh grant, the IdP saw ${refreshes.length}`, { since: second2 }));
  assert.equal(refreshes[0].event, 'grant.success', explain('the IdP refused the second refresh (a spent refresh token presented again?)', { since: second2 }));
  const tokenC = env.idp.issued.accessTokens[refreshes[0].access_token_index];
  assert.equal(third.token, tokenC, `GET /auth did not hand out the second refreshed token: ${third.describe()}`);
  assert.notEqual(tokenC, tokenB);
  assert.deepEqual(env.idp.eventsSince(start, 'grant.error', 'grant.revoked'), [], explain('the IdP refused a grant or revoked one', { since: start }));

  stepTo('still no token in the browser or in the broker log');
  const tokens = [...env.idp.issued.accessTokens, ...env.idp.issued.refreshTokens, ...env.idp.issued.idTokens];
  const cookies = await page.context().cookies();
  const content = await page.content();
  const brokerLog = env.broker.logText();
  for (const token of tokens) {
    assert.ok(!cookies.some((c) => c.value.includes(token)), 'a cookie carries a token');
    assert.ok(!content.includes(token), 'the page contains a token');
    assert.ok(!brokerLog.includes(token), 'the broker logged a token');
  }
}));

test('logout at the IdP reaches the broker by back-channel and ends that session only', { timeout: 120_000 }, () => scenario('backchannel', async ({ stepTo, newPage }) => {
  const discovery = await idpDiscovery();
  assert.equal(discovery.backchannel_logout_supported, true, 'the IdP does not advertise back-channel logout');
  assert.ok(discovery.end_session_endpoint, 'the IdP has no end_session_endpoint');

  // Another IdP session of the same user (another browser): the logout token names the first one's
  // `sid`, so this one must survive.
  const otherPage = await newPage();
  await logIn(otherPage, 'bob', stepTo);
  const otherCookie = await sessionCookieHeader(otherPage.context());
  const page = await newPage();
  await logIn(page, 'bob', stepTo);
  const cookie = await sessionCookieHeader(page.context());
  const before = await forwardAuth(cookie);
  assert.equal(before.status, 200, explain(`GET /auth before the IdP logout: ${before.describe()}`));

  stepTo('end the IdP session: end_session_endpoint without id_token_hint, "Yes, sign me out"');
  const mark = env.idp.events.length;
  const logoutStarted = Date.now();
  await page.goto(discovery.end_session_endpoint);
  const signOut = page.locator('button:has-text("Yes, sign me out")');
  await signOut.waitFor({ timeout: 15_000 });
  await signOut.click();
  // The library makes its back-channel calls before it answers the confirmation.
  assert.ok(await env.idp.waitForEvent('end_session.success', 15_000, mark), explain('the IdP did not end its session', { since: mark }));
  let calls = env.idp.eventsSince(mark, 'backchannel.success', 'backchannel.error');
  if (calls.some((e) => e.event === 'backchannel.error')) await sleep(300); // the broker's answer body is read in the background
  calls = env.idp.eventsSince(mark, 'backchannel.success', 'backchannel.error');
  log(`IdP logout done in ${Date.now() - logoutStarted} ms; back-channel: ${calls.map((e) => JSON.stringify(e)).join(' ') || 'none'}`);
  assert.equal(calls.length, 1, explain(`expected one back-channel logout call to the broker, the IdP made ${calls.length}`, { since: mark }));
  assert.equal(calls[0].event, 'backchannel.success', explain(
    `the broker refused the IdP's back-channel logout: ${calls[0].error ?? ''} ${calls[0].cause ?? ''} ${calls[0].response_body ?? ''}`,
    { since: mark, logPattern: /back-?channel|logout|error|warn/i },
  ));
  assert.ok(calls[0].sid, 'the logout token carried no sid (backchannel_logout_session_required is on)');
  const ended = brokerLogLines(/back-channel logout/i, 1);
  log(`broker: ${ended || '(no "back-channel logout" log line)'}`);

  stepTo('the broker ended the session: the SPA\'s GET /session and forward-auth are 401');
  await page.goto(`${env.spa.origin}/`);
  const shown = await sessionShown(page);
  assert.equal(shown.status, '401', explain(`GET /session (browser) after the back-channel logout: ${shown.text}`, { since: mark }));
  const sessionAfter = await sessionStatus(cookie);
  assert.equal(sessionAfter.status, 401, explain(`GET /session (cookie from Node) after the back-channel logout: ${sessionAfter.status} ${sessionAfter.body}`, { since: mark }));
  const auth = await forwardAuth(cookie);
  assert.equal(auth.status, 401, explain(`GET /auth after the back-channel logout: ${auth.describe()}`, { since: mark }));
  // The IdP revoked the grant too, so a refresh attempt would also end the session: make sure the 401
  // came from the back-channel logout and not from a refused refresh.
  const refreshAttempts = env.idp.eventsSince(mark, 'grant.success', 'grant.error').filter((e) => e.grant_type === 'refresh_token');
  assert.deepEqual(refreshAttempts, [], explain('the broker tried a refresh after the IdP logout (so the 401 proves nothing about the back-channel)', { since: mark }));

  stepTo('the other browser\'s session (another IdP session of bob) is still live');
  const otherSession = await sessionStatus(otherCookie);
  assert.equal(otherSession.status, 200, explain(`GET /session of the other session: ${otherSession.status} ${otherSession.body} (the back-channel logout ended more than the sid it named)`, { since: mark }));
  const otherAuth = await forwardAuth(otherCookie);
  assert.equal(otherAuth.status, 200, explain(`GET /auth of the other session: ${otherAuth.describe()}`, { since: mark }));
  assert.equal(otherAuth.subject, 'bob');
}));
