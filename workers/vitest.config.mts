// vitest in real workerd, with env.AI served by a running workers-ai-local server (WORKERS_AI_LOCAL, default
// http://127.0.0.1:8787): the one line that differs from a project using the cloud is the connection string.
import { cloudflareTest } from "@cloudflare/vitest-pool-workers";
import { defineConfig } from "vitest/config";

const server = process.env.WORKERS_AI_LOCAL ?? "http://127.0.0.1:8787";

export default defineConfig({
  plugins: [
    cloudflareTest({
      remoteBindings: false, // otherwise the pool starts a logged-in remote session for the AI binding
      wrangler: { configPath: "./examples/wrangler.toml" },
      miniflare: { ai: { binding: "AI", remoteProxyConnectionString: new URL(server) } },
    }),
  ],
  // test/replay/ runs against a replaying server: vitest.replay.config.mts.
  test: { include: ["test/*.spec.ts"], testTimeout: 60_000 },
});
