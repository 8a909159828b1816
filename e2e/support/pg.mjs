// A throwaway PostgreSQL database per run, created and dropped with the psql client.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

async function psql(adminUrl, sql) {
  try {
    await run('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', adminUrl, '-c', sql], { timeout: 30_000 });
  } catch (e) {
    if (e.code === 'ENOENT') throw new Error('psql is not installed (Debian: apt-get install postgresql-client)');
    throw new Error(`psql failed: ${sql}: ${e.stderr || e.message}`);
  }
}

/** Creates database `name` next to the admin URL's and returns a URL that points at it. */
export async function createDatabase(adminUrl, name) {
  await psql(adminUrl, `CREATE DATABASE "${name}"`);
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  return url.toString();
}

export async function dropDatabase(adminUrl, name) {
  // WITH (FORCE): the broker may still hold pooled connections if it was killed.
  await psql(adminUrl, `DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`);
}
