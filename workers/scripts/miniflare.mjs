// Serve a bundled Worker in Miniflare (real workerd) with its AI binding backed by workers-ai-local:
//   node scripts/miniflare.mjs WORKER_JS SERVER_URL PORT
// SERVER_URL is Miniflare's remoteProxyConnectionString: the server's base URL, or .../binding/<token>.
// Prints "ready <url>" once listening; stops on SIGTERM.
import { dirname } from "node:path";
import { Miniflare } from "miniflare";

const [scriptPath, serverUrl, port] = process.argv.slice(2);
const mf = new Miniflare({
  modules: true,
  scriptPath,
  modulesRoot: dirname(scriptPath), // module names are relative to it, and workerd refuses "../"
  compatibilityDate: "2026-04-21",
  host: "127.0.0.1",
  port: Number(port),
  ai: { binding: "AI", remoteProxyConnectionString: new URL(serverUrl) },
});
console.log(`ready ${await mf.ready}`);

process.on("SIGTERM", async () => {
  await mf.dispose();
  process.exit(0);
});
