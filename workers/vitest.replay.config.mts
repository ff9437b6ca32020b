// The replay suite (test/replay/): vitest in real workerd, with env.AI answered from recordings by a
// `workers-ai-local --replay test/recordings` server (WORKERS_AI_LOCAL, default http://127.0.0.1:8787). The same
// suite records those answers when pointed at `workers-ai-local --upstream ... --record test/recordings`.
import { cloudflareTest } from "@cloudflare/vitest-pool-workers";
import { defineConfig } from "vitest/config";

const server = process.env.WORKERS_AI_LOCAL ?? "http://127.0.0.1:8787";

export default defineConfig({
  plugins: [
    cloudflareTest({
      remoteBindings: false,
      wrangler: { configPath: "./examples/wrangler.toml" },
      miniflare: { ai: { binding: "AI", remoteProxyConnectionString: new URL(server) } },
    }),
  ],
  test: { include: ["test/replay/**/*.spec.ts"], testTimeout: 60_000 },
});
