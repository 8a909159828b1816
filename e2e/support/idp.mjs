// A real, OpenID-certified provider (panva/oidc-provider) in-process, as the broker's IdP.
//
// One confidential client, PKCE required, RFC 9207 `iss` in authorization responses (on by default),
// RP-initiated logout, revocation and back-channel logout enabled. The development interactions stay
// on: any login and password sign in. Consent is granted automatically for this first-party client,
// and the test still clicks through the consent page should one appear.
import http from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';

import Provider from 'oidc-provider';

import { listenOnFreePort, closeServer } from './ports.mjs';

/**
 * @param {object} client
 * @param {string} client.clientId
 * @param {string} client.clientSecret
 * @param {string} client.redirectUri
 * @param {string} client.postLogoutRedirectUri
 * @param {string} [client.backchannelLogoutUri]
 * @param {object} [options]
 * @param {number} [options.accessTokenTtl] access token lifetime in seconds (default 300); short in the
 *   e2e run so that forward-auth has to refresh within seconds
 * @param {boolean} [options.rotateRefreshToken] a new refresh token at every refresh, the old one
 *   spent (default true): a client that presents a spent one makes the library revoke the whole grant
 */
export async function startIdp(client, { accessTokenTtl = 300, rotateRefreshToken = true } = {}) {
  const server = http.createServer();
  const port = await listenOnFreePort(server);
  const issuer = `http://127.0.0.1:${port}`;

  const signingKey = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });

  /** Every token the IdP handed out, so the test can prove none of them reaches the browser. */
  const issued = { accessTokens: [], refreshTokens: [], idTokens: [] };
  /** Protocol events, in order, each with `at` (Date.now()), for assertions and for the failure log. */
  const events = [];
  const record = (entry) => {
    const withTime = { at: Date.now(), ...entry };
    events.push(withTime);
    return withTime;
  };

  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: client.clientId,
        client_secret: client.clientSecret,
        token_endpoint_auth_method: 'client_secret_basic',
        redirect_uris: [client.redirectUri],
        post_logout_redirect_uris: [client.postLogoutRedirectUri],
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        ...(client.backchannelLogoutUri
          ? { backchannel_logout_uri: client.backchannelLogoutUri, backchannel_logout_session_required: true }
          : {}),
      },
    ],
    jwks: { keys: [{ ...signingKey, kid: `e2e-${randomBytes(4).toString('hex')}`, alg: 'RS256', use: 'sig' }] },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    // The library requires PKCE only for public clients by default; a BFF must use it anyway
    // (SPEC: code_challenge S256 on every login), so the IdP insists on it.
    pkce: { required: () => true },
    claims: {
      acr: null,
      auth_time: null,
      iss: null,
      sid: null,
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name'],
    },
    // Like Keycloak and most IdPs, put the scope's claims in the ID token too.
    conformIdTokenClaims: false,
    // Explicit lifetimes (seconds), which also keeps the library from printing a notice for each default.
    ttl: {
      AccessToken: accessTokenTtl,
      AuthorizationCode: 60,
      Grant: 3600,
      IdToken: 300,
      Interaction: 600,
      RefreshToken: 3600,
      Session: 3600,
    },
    rotateRefreshToken,
    // The library refuses outgoing requests (back-channel logout) to special-use addresses such as
    // 127.0.0.1 as an SSRF guard; here the broker lives on loopback, so drop the guarded dispatcher.
    fetch: (url, options) => {
      const { dispatcher: _ssrfGuard, ...rest } = options;
      return globalThis.fetch(url, rest);
    },
    features: {
      devInteractions: { enabled: true },
      revocation: { enabled: true },
      backchannelLogout: { enabled: true },
      rpInitiatedLogout: { enabled: true },
    },
    async findAccount(_ctx, accountId) {
      return {
        accountId,
        async claims() {
          return { sub: accountId, email: `${accountId}@example.test`, email_verified: true, name: `E2E ${accountId}` };
        },
      };
    },
    // First-party client: grant what it asks for instead of showing a consent screen.
    async loadExistingGrant(ctx) {
      const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      if (grantId) return ctx.oidc.provider.Grant.find(grantId);
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope(ctx.oidc.params.scope ?? 'openid');
      await grant.save();
      return grant;
    },
    // Refresh tokens whenever the client may use them. The library drops `offline_access` from a request
    // without `prompt=consent` (OIDC Core §11 allows that), and the broker rightly does not force a consent
    // screen on every login; like Keycloak, this IdP then still issues a refresh token, one that ends with
    // the IdP session.
    async issueRefreshToken(_ctx, c) {
      return c.grantTypeAllowed('refresh_token');
    },
  });

  provider.on('grant.success', (ctx) => {
    const body = ctx.body ?? {};
    if (body.access_token) issued.accessTokens.push(body.access_token);
    if (body.refresh_token) issued.refreshTokens.push(body.refresh_token);
    if (body.id_token) issued.idTokens.push(body.id_token);
    record({
      event: 'grant.success',
      grant_type: ctx.oidc.params.grant_type,
      scope: body.scope,
      expires_in: body.expires_in,
      // Which token each is, without the token: index into `issued` (-1: none in this response).
      access_token_index: body.access_token ? issued.accessTokens.length - 1 : -1,
      rotated_refresh_token: Boolean(body.refresh_token && ctx.oidc.params.grant_type === 'refresh_token'),
    });
  });
  provider.on('grant.error', (ctx, err) => {
    record({ event: 'grant.error', grant_type: ctx?.oidc?.params?.grant_type, error: err?.message, detail: err?.error_description });
  });
  // Back-channel logout (the library awaits these before it answers the end-session confirmation).
  provider.on('backchannel.success', (_ctx, c, accountId, sid) => {
    record({ event: 'backchannel.success', client_id: c?.clientId, sub: accountId, sid });
  });
  provider.on('backchannel.error', (_ctx, err, c, accountId, sid) => {
    const entry = record({
      event: 'backchannel.error', client_id: c?.clientId, sub: accountId, sid,
      error: err?.message, cause: err?.cause ? String(err.cause.code ?? err.cause.message ?? err.cause) : undefined,
      status: err?.response?.status,
    });
    // The broker's answer says which check failed (problem+json `error_description`); read it in the background.
    err?.response?.text?.().then((text) => { entry.response_body = text.slice(0, 1000); }, () => {});
  });
  for (const name of [
    'authorization.success', 'authorization.error', 'revocation.error', 'refresh_token.consumed',
    'refresh_token.destroyed', 'grant.revoked', 'end_session.success', 'end_session.error', 'userinfo.error',
    'server_error',
  ]) {
    provider.on(name, (ctxOrErr, maybeErr, ...rest) => {
      const err = [ctxOrErr, maybeErr, ...rest].find((x) => x instanceof Error);
      record({ event: name, ...(err ? { error: err.message, detail: err.error_description } : {}) });
    });
  }

  server.on('request', provider.callback());

  return {
    issuer,
    issued,
    events,
    accessTokenTtl,
    /** Events from index `since` on (take `events.length` as a mark before a step). */
    eventsSince(since = 0, ...names) {
      return events.slice(since).filter((e) => names.length === 0 || names.includes(e.event));
    },
    /**
     * Resolves true when an event with one of these names (a string or an array) has been seen at or
     * after index `since`, or false after `timeoutMs`.
     */
    async waitForEvent(name, timeoutMs = 5000, since = 0) {
      const names = [name].flat();
      const deadline = Date.now() + timeoutMs;
      while (Date.now() < deadline) {
        if (events.slice(since).some((e) => names.includes(e.event))) return true;
        await new Promise((r) => setTimeout(r, 50));
      }
      return false;
    },
    close: () => closeServer(server),
  };
}
