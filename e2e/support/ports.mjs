// Free TCP ports on the loopback interface, chosen at run time.
import net from 'node:net';

/** Asks the kernel for a free port on 127.0.0.1 and releases it again. */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Starts `server` (an http.Server) on a kernel-chosen loopback port and returns that port. */
export async function listenOnFreePort(server) {
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  return server.address().port;
}

/** Closes an http.Server, dropping idle keep-alive connections so it does not linger. */
export async function closeServer(server) {
  if (!server?.listening) return;
  server.closeAllConnections?.();
  await new Promise((resolve) => server.close(() => resolve()));
}
