// Runs the real token-broker binary as a child process and waits until it is ready.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * @param {object} options
 * @param {string} options.bin path to the token-broker binary
 * @param {string} options.url the broker's base URL (BROKER_PUBLIC_URL)
 * @param {Record<string,string>} options.env its environment (added to a minimal base)
 * @param {string} options.logFile where its stdout and stderr go
 * @param {number} [options.readyTimeoutMs]
 * @param {string[]} [options.args] its command line (default: `serve`; `dev` for dev mode)
 */
export async function startBroker({ bin, url, env, logFile, readyTimeoutMs = 60_000, args = ['serve'] }) {
  if (!fs.existsSync(bin)) {
    throw new Error(`broker binary ${bin} does not exist: run 'cargo build --bin token-broker' (scripts/test does)`);
  }
  const log = fs.openSync(logFile, 'w');
  const child = spawn(bin, args, {
    // A clean environment: only what the broker needs, so nothing from the developer's shell leaks in.
    env: { PATH: process.env.PATH, HOME: process.env.HOME ?? '/tmp', ...env },
    stdio: ['ignore', log, log],
  });
  fs.closeSync(log);

  let exited = null;
  const exitPromise = new Promise((resolve) => {
    child.once('exit', (code, signal) => {
      exited = { code, signal };
      resolve(exited);
    });
    child.once('error', (error) => {
      exited = { error };
      resolve(exited);
    });
  });

  const logText = () => {
    try {
      return fs.readFileSync(logFile, 'utf8');
    } catch {
      return '';
    }
  };

  const deadline = Date.now() + readyTimeoutMs;
  let last = 'no answer yet';
  while (true) {
    if (exited) {
      throw new Error(`the broker exited before it was ready (${JSON.stringify(exited)}); its output:\n${logText()}`);
    }
    try {
      const response = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(2000) });
      last = `${response.status} ${await response.text()}`;
      if (response.status === 200) break;
    } catch (e) {
      last = String(e.cause?.code ?? e.message ?? e);
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`the broker was not ready after ${readyTimeoutMs} ms (last /readyz: ${last}); its output:\n${logText()}`);
    }
    await sleep(200);
  }

  return {
    child,
    logText,
    /** SIGTERM (graceful drain), then SIGKILL after `graceMs`. */
    async stop(graceMs = 10_000) {
      if (exited) return exited;
      child.kill('SIGTERM');
      const result = await Promise.race([exitPromise, sleep(graceMs, null, { ref: false })]);
      if (result) return result;
      child.kill('SIGKILL');
      return exitPromise;
    },
  };
}
