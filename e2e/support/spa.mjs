// A tiny static single-page app, on its own origin, that talks to the broker the way a frontend would.
import http from 'node:http';

import { listenOnFreePort, closeServer } from './ports.mjs';

function page(brokerUrl, origin) {
  const login = `${brokerUrl}/login?return_to=${encodeURIComponent(`${origin}/`)}`;
  return `<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>token-broker e2e SPA</title></head>
<body>
  <h1>token-broker e2e SPA</h1>
  <p><a id="login" href="${login}">Log in</a> <button id="logout" type="button">Log out</button></p>
  <pre id="session" data-status="loading">loading…</pre>
  <pre id="error"></pre>
  <script>
    const broker = ${JSON.stringify(brokerUrl)};
    const out = document.getElementById('session');
    async function loadSession() {
      try {
        const response = await fetch(broker + '/session', { credentials: 'include' });
        const body = await response.text();
        out.textContent = response.status + '\\n' + body;
        out.dataset.status = String(response.status);
      } catch (e) {
        out.textContent = 'fetch failed: ' + e;
        out.dataset.status = 'error';
      }
    }
    document.getElementById('logout').addEventListener('click', async () => {
      try {
        const response = await fetch(broker + '/logout', {
          method: 'POST',
          credentials: 'include',
          headers: { Accept: 'application/json' },
        });
        const body = await response.json();
        if (!response.ok || !body.logout_url) throw new Error(response.status + ' ' + JSON.stringify(body));
        location = body.logout_url;
      } catch (e) {
        document.getElementById('error').textContent = 'logout failed: ' + e;
      }
    });
    loadSession();
  </script>
</body>
</html>
`;
}

/** Starts the SPA server; call `setBroker(url)` before the browser loads the page. */
export async function startSpa() {
  let brokerUrl = null;
  const server = http.createServer((req, res) => {
    const { pathname } = new URL(req.url, 'http://spa.invalid');
    if (req.method !== 'GET' || pathname !== '/' || !brokerUrl) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found');
      return;
    }
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
    res.end(page(brokerUrl, origin));
  });
  const port = await listenOnFreePort(server);
  const origin = `http://127.0.0.1:${port}`;
  return {
    origin,
    setBroker(url) {
      brokerUrl = url;
    },
    close: () => closeServer(server),
  };
}
